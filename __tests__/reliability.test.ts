/**
 * Riding through DSQL's limits and faults against stand-ins configured to produce them:
 * connection-rate storms, the connection duration limit, an outage, and credential rotation.
 */
import dsql, { DsqlConnectionError, type DsqlOptions } from '../lib'
import { startLocalDsql, type LocalDsql, type LocalDsqlOptions } from '../lib/local'
import { until } from './helpers/until'

async function withLocal<R>(options: LocalDsqlOptions, run: (local: LocalDsql, connect: (o?: DsqlOptions) => ReturnType<typeof dsql>) => Promise<R>): Promise<R> {
  const local = await startLocalDsql(options)
  const connect = (o: DsqlOptions = {}) =>
    dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, ...o })
  try {
    return await run(local, connect)
  } finally {
    await local.stop()
  }
}

/**
 * Runs `query` back to back on `workers` workers until `done()` (a state, not a time); counts
 * successes and failures. The bound only keeps a broken test from running forever.
 */
async function load(done: () => boolean, workers: number, query: () => Promise<unknown>) {
  const result = { ok: 0, failed: [] as unknown[] }
  const deadline = Date.now() + 90_000
  await Promise.all(
    Array.from({ length: workers }, async () => {
      while (!done() && Date.now() < deadline) {
        await query().then(() => result.ok++, (e: unknown) => result.failed.push(e))
        await new Promise((r) => setTimeout(r, 20))
      }
    }),
  )
  expect(done()).toBe(true)
  return result
}

const RATE = { perSecond: 50, burst: 20 }

test('storm: 300 concurrent queries on a pool of 300 while new connections are refused (53400): all succeed', async () => {
  await withLocal({ connectionRate: RATE }, async (local, connect) => {
    const warnings: unknown[] = []
    // A generous connect_timeout: the rate-limit retries must outlast a slow, shared machine.
    const sql = connect({ max: 300, connect_timeout: 60, logger: { warn: (_m, f) => warnings.push(f) } })
    try {
      // No connection at all for a moment: every one of the 300 is refused at least once.
      local.setLimits({ connectionRate: { perSecond: 0, burst: 0 } })
      const queries = Promise.all(Array.from({ length: 300 }, (_, i) => sql`select ${i}::int as i, pg_backend_pid() as pid`))
      queries.catch(() => undefined) // awaited below; not unhandled if the wait fails first
      await until('300 connections refused', () => local.stats().rejected >= 300, 60_000)
      expect(local.stats().authenticated).toBe(0)
      local.setLimits({ connectionRate: RATE })
      const rows = await queries
      expect(rows.map(([r]) => r.i)).toEqual(Array.from({ length: 300 }, (_, i) => i))
      expect(warnings.length).toBeGreaterThan(0)
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
}, 120_000)

test('a cluster that is waking up: the connection is retried until it answers', async () => {
  await withLocal({}, async (local, connect) => {
    const warnings: string[] = []
    const sql = connect({ logger: { warn: (_m, f) => warnings.push(String((f as { message?: string }).message)) } })
    try {
      local.setLimits({ wakingUp: true })
      const query = sql`select 1 as one`
      query.catch(() => undefined) // awaited below; not unhandled if the wait fails first
      await until('two connection attempts refused', () => local.stats().rejected >= 2)
      local.setLimits({ wakingUp: false })
      const [row] = await query
      expect(row.one).toBe(1)
      expect(warnings.some((w) => /waking up/.test(w))).toBe(true)
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
}, 120_000)

test('expiry: load against a 4 s connection limit until every connection was replaced twice: no failed query', async () => {
  await withLocal({ maxConnectionDurationSecs: 4 }, async (local, connect) => {
    const sql = connect({ max: 4, max_lifetime: 3 })
    try {
      const result = await load(() => local.stats().authenticated >= 12, 4, () => sql`select 1`)
      expect(result.failed).toEqual([])
      expect(result.ok).toBeGreaterThan(0)
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
}, 120_000)

test('outage: queries fail within connect_timeout with a clear error, then all succeed without user action', async () => {
  await withLocal({}, async (local, connect) => {
    const sql = connect({ max: 3, connect_timeout: 2, idle_timeout: 1 })
    try {
      await sql`select 1`
      await local.stopGateway()
      const started = Date.now()
      const errors = await Promise.all([1, 2, 3, 4].map(() => sql`select 1`.then(() => null, (e: unknown) => e)))
      // Bounded by connect_timeout (2 s), not by the default 30 s; generous for a loaded machine.
      expect(Date.now() - started).toBeLessThan(15_000)
      for (const e of errors) {
        expect(e).toBeInstanceOf(Error)
        expect(e instanceof DsqlConnectionError || (e as { code?: string }).code === 'CONNECTION_CLOSED').toBe(true)
      }
      expect(errors.some((e) => e instanceof DsqlConnectionError && /ECONNREFUSED/.test(e.message))).toBe(true)
      await local.startGateway()
      const rows = await Promise.all([1, 2, 3, 4, 5].map((i) => sql`select ${i}::int as i`))
      expect(rows.map(([r]) => r.i)).toEqual([1, 2, 3, 4, 5])
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
}, 120_000)

test('rotation: credentials that expire every 3 s are refreshed; every connection authenticates', async () => {
  await withLocal({}, async (local, connect) => {
    let resolutions = 0
    const credentials = async () => {
      resolutions++
      return { ...local.credentials, expiration: new Date(Date.now() + 3000) }
    }
    const sql = connect({ credentials, max: 2, max_lifetime: 1 })
    try {
      const result = await load(() => resolutions > 3 && local.stats().authenticated > 10, 2, () => sql`select 1`)
      expect(result.failed).toEqual([])
      expect(result.ok).toBeGreaterThan(0)
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
}, 120_000)

test('sql.end() while a connection is being opened leaves no connection behind', async () => {
  await withLocal({ latencyMs: 200 }, async (local, connect) => {
    const sql = connect({ max: 2 })
    const pending = sql`select 1`.catch((e: unknown) => e)
    await new Promise((r) => setTimeout(r, 50))
    await sql.end({ timeout: 0 })
    await pending
    await until('no connection open at the gateway', () => local.stats().open === 0)
    expect(local.stats().open).toBe(0)
  })
}, 120_000)
