/** `npx postgres-dsql`: token, psql and local, with their help and errors. */
import { chmodSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { main } from '../lib/cli'
import { DsqlConfigError } from '../lib'
import { WireClient } from './helpers/wire'
import { target } from './helpers/target'

let out = ''
let err = ''
const saved = { ...process.env }
beforeEach(() => {
  out = err = ''
  jest.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => ((out += String(chunk)), true))
  jest.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => ((err += String(chunk)), true))
  const t = target()
  process.env = { ...saved, AWS_ACCESS_KEY_ID: t.credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: t.credentials.secretAccessKey }
  delete process.env.AWS_PROFILE
  delete process.env.CLUSTER_ENDPOINT
  delete process.env.PGHOST
})
afterEach(() => {
  jest.restoreAllMocks()
  process.env = saved
})

test('--help lists the commands; an unknown command exits 2', async () => {
  expect(await main(['--help'])).toBe(0)
  expect(out).toMatch(/token .*\n.*psql .*\n.*local /)
  expect(await main(['nope'])).toBe(2)
  expect(err).toMatch(/Unknown command "nope"/)
  for (const command of ['token', 'psql', 'local']) {
    out = ''
    expect(await main([command, '--help'])).toBe(0)
    expect(out).toMatch(new RegExp(`^Usage: postgres-dsql ${command}`))
  }
})

test('token prints a token the stand-in accepts, for the right action', async () => {
  const t = target()
  expect(await main(['token', '--host', t.host])).toBe(0)
  const admin = out.trim()
  expect(admin).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnectAdmin&`))
  const client = await WireClient.connect({ port: t.port, servername: t.host, ca: t.ca, user: 'admin', password: admin })
  expect((await client.query('select current_user')).rows).toEqual([['admin']])
  await client.close()

  out = ''
  process.env.CLUSTER_ENDPOINT = t.host
  expect(await main(['token', '--user', 'appuser', '--expires-in', '60'])).toBe(0)
  expect(out).toMatch(/\?Action=DbConnect&.*X-Amz-Expires=60&/)
})

test('token without an endpoint is a config error that says what to pass', async () => {
  await expect(main(['token'])).rejects.toThrow(DsqlConfigError)
})

test('psql runs psql with a fresh token, verify-full and the endpoint as server name', async () => {
  const t = target()
  const dir = mkdtempSync(join(tmpdir(), 'fake-psql-'))
  const report = join(dir, 'report')
  writeFileSync(join(dir, 'psql'), `#!/bin/sh\nprintf '%s\\n' "$PGHOST" "$PGHOSTADDR" "$PGPORT" "$PGUSER" "$PGSSLMODE" "$PGSSLROOTCERT" "$PGPASSWORD" "$*" > "${report}"\nexit 3\n`)
  chmodSync(join(dir, 'psql'), 0o755)
  process.env.PATH = `${dir}:${saved.PATH}`
  const code = await main(['psql', '--host', t.host, '--hostaddr', '127.0.0.1', '--port', String(t.port), '--sslrootcert', t.caFile, '--', '-c', 'select 1'])
  expect(code).toBe(3)
  const [host, hostaddr, port, user, mode, rootcert, password, args] = readFileSync(report, 'utf8').split('\n')
  expect({ host, hostaddr, port, user, mode, rootcert, args }).toEqual({
    host: t.host, hostaddr: '127.0.0.1', port: String(t.port), user: 'admin', mode: 'verify-full', rootcert: t.caFile, args: '-c select 1',
  })
  expect(password).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnectAdmin&`))
})

test('psql says how to install psql when it is missing', async () => {
  process.env.PATH = mkdtempSync(join(tmpdir(), 'empty-path-'))
  expect(await main(['psql', '--host', target().host])).toBe(127)
  expect(err).toMatch(/psql is not installed/)
})
