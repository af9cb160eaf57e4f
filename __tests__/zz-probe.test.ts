import dsql, { type DsqlOptions } from '../lib'
import { forgetEndpoints, sendsTokenEarly } from '../lib/connect/startup'
import { resolveConfig } from '../lib/config'
import { startLocalDsql, type LocalDsql } from '../lib/local'

let local: LocalDsql
beforeAll(async () => {
  local = await startLocalDsql({ roles: ['appuser'], nagle: true })
}, 60_000)
beforeEach(() => forgetEndpoints())
afterEach(() => local.setFaults({}))
afterAll(async () => local?.stop())
const options = (extra: DsqlOptions = {}): DsqlOptions => ({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, ...extra })

async function one(extra: DsqlOptions) {
  const sql = dsql(options({ max: 1, ...extra }))
  try {
    return await sql`select current_schema() as s, current_user as u`
  } finally {
    await sql.end({ timeout: 2 })
  }
}

test.each([
  ['sslnegotiation postgres', { sslnegotiation: 'postgres' as const }],
  ['websocket', { transport: 'websocket' as const }],
  ['onconnect', { onconnect: async (s: { query(q: string): Promise<unknown> }) => void (await s.query('select 1')) }],
  ['appuser', { user: 'appuser' }],
])('%s with faults', async (_name, extra) => {
  for (const faults of [{}, { refuseEarlyPassword: true }, { dropEarlyPassword: true }, { refuseOptions: true }, { refuseEarlyPassword: true, refuseOptions: true }, { authMethod: 'none' as const }]) {
    forgetEndpoints()
    local.setFaults(faults)
    const rows = await one(extra as DsqlOptions)
    expect(rows[0].u).toBe((extra as DsqlOptions).user ?? 'admin')
  }
})

test('early over websocket goes early', () => {
  const c = resolveConfig({ host: local.host, hostaddr: local.hostaddr, port: local.port, transport: 'websocket' })
  expect(sendsTokenEarly(c, 'admin')).toBe(true)
})
