/**
 * Multi-Region clusters: a two-Region stand-in (one gateway, cluster id, certificate and token
 * scope per Region, one database behind both), driven explicitly: a Region stops and returns.
 */
import { DsqlSigner } from '@aws-sdk/dsql-signer'
import postgres from 'postgres'
import dsql, { DsqlCommitUnknownError, DsqlConnectionError, type DsqlOptions } from '../lib'
import { startLocalDsql, type LocalDsql, type LocalDsqlRegion } from '../lib/local'
import { until } from './helpers/until'

let local: LocalDsql

beforeAll(async () => {
  local = await startLocalDsql({ regions: ['us-east-1', 'us-east-2'], roles: ['appuser'] })
})
afterAll(() => local?.stop())

/** Plain postgres.js to one Region's endpoint, with a token signed for that endpoint and Region. */
function direct(r: LocalDsqlRegion, signedFor: LocalDsqlRegion = r) {
  const signer = new DsqlSigner({ hostname: signedFor.host, region: signedFor.region, credentials: local.credentials })
  return postgres({
    host: r.hostaddr, port: r.port, user: 'admin', database: 'postgres', max: 1, fetch_types: false, connect_timeout: 5,
    ssl: { ca: local.ca, servername: r.host },
    pass: () => signer.getDbConnectAdminAuthToken(),
  })
}

describe('two-Region stand-in', () => {
  test('each Region has its own endpoint, cluster id and port; the first is the single-Region API', () => {
    const [a, b] = local.regions
    expect(local.regions.map((r) => r.region)).toEqual(['us-east-1', 'us-east-2'])
    expect(a.host).toBe(`${a.clusterId}.dsql.us-east-1.on.aws`)
    expect(b.host).toBe(`${b.clusterId}.dsql.us-east-2.on.aws`)
    expect(a.clusterId).not.toBe(b.clusterId)
    expect(a.port).not.toBe(b.port)
    expect([local.host, local.port, local.region]).toEqual([a.host, a.port, a.region])
    expect(local.env.PGHOST).toBe(`${a.host},${b.host}`)
    expect(local.env.PGPORT).toBe(`${a.port},${b.port}`)
  })

  test('a row written in one Region is read in the other', async () => {
    const [a, b] = local.regions
    const east1 = direct(a)
    const east2 = direct(b)
    try {
      await east1`create table if not exists mr_rows (id int primary key, region text)`
      await east1`insert into mr_rows values (1, 'us-east-1')`
      expect(await east2`select id, region from mr_rows`).toEqual([{ id: 1, region: 'us-east-1' }])
    } finally {
      await east1`drop table if exists mr_rows`.catch(() => undefined)
      await Promise.all([east1.end(), east2.end()])
    }
  })

  test('a token is scoped to its Region and endpoint: one signed for the other Region is refused', async () => {
    const [a, b] = local.regions
    const wrong = direct(b, a)
    try {
      await expect(wrong`select 1`).rejects.toMatchObject({ code: '08006' })
    } finally {
      await wrong.end()
    }
  })

  test('stopRegion drops that Region\'s connections and refuses new ones; the other Region serves on; startRegion restores it', async () => {
    const [a, b] = local.regions
    const east1 = direct(a)
    const east2 = direct(b)
    try {
      await east1`select 1`
      await local.stopRegion('us-east-1')
      await expect(east1`select 1`).rejects.toMatchObject({ code: expect.stringMatching(/CONNECTION_CLOSED|ECONNREFUSED|CONNECTION_DESTROYED|CONNECT_TIMEOUT/) })
      expect(await east2`select 2 as two`).toEqual([{ two: 2 }])
      await local.startRegion('us-east-1')
      expect(await east1`select 3 as three`).toEqual([{ three: 3 }])
    } finally {
      await local.startRegion('us-east-1')
      await Promise.all([east1.end({ timeout: 1 }), east2.end({ timeout: 1 })])
    }
  })

  test('unknown Region names and region with regions are refused', async () => {
    await expect(local.stopRegion('eu-west-1')).rejects.toThrow(/No Region "eu-west-1".*us-east-1, us-east-2/)
    await expect(startLocalDsql({ region: 'us-east-1', regions: ['us-east-2'] })).rejects.toThrow(/not both/)
    await expect(startLocalDsql({ regions: ['us-east-1', 'us-east-1'] })).rejects.toThrow(/each Region once/)
  })
})

describe('dsql() over a multi-Region cluster', () => {
  const options = (extra: DsqlOptions = {}): DsqlOptions => ({
    host: local.regions.map((r) => r.host),
    hostaddr: local.regions.map((r) => r.hostaddr),
    port: local.regions.map((r) => r.port),
    sslrootcert: local.caFile,
    credentials: local.credentials,
    connect_timeout: 10,
    ...extra,
  })
  const logs = () => {
    const warned: string[] = []
    return { warned, logger: { warn: (m: string, f?: Record<string, unknown>) => void warned.push(`${m} ${String(f?.host ?? '')}`) } }
  }
  afterEach(async () => {
    for (const r of local.regions) await local.startRegion(r.region)
  })

  test('new connections go to the first endpoint, each signed for its own Region', async () => {
    const sql = dsql(options({ max: 1 }))
    try {
      expect(await sql`select current_user as u`).toEqual([{ u: 'admin' }])
      expect(sql.options.dsql.lastHost).toBe(local.regions[0].host)
      expect(sql.options.dsql.endpoints.map((e) => [e.host, e.region, e.downUntil])).toEqual(local.regions.map((r) => [r.host, r.region, undefined]))
      // The second Region's token is its own: a pool preferring it connects there.
      const second = dsql({ ...options({ max: 1 }), host: [...local.regions].reverse().map((r) => r.host), port: [...local.regions].reverse().map((r) => r.port) })
      expect(await second`select 1 as one`).toEqual([{ one: 1 }])
      expect(second.options.dsql.lastHost).toBe(local.regions[1].host)
      await second.end()
    } finally {
      await sql.end()
    }
  })

  test('a Region down: in-flight work fails typed, the next connection goes to the other Region at once, warned once; fail-back when it returns', async () => {
    const { warned, logger } = logs()
    const sql = dsql(options({ max: 1, logger }))
    const admin = dsql(options({ max: 1, host: local.regions[1].host, port: local.regions[1].port, hostaddr: local.regions[1].hostaddr }))
    try {
      const [{ pid }] = await sql`select pg_backend_pid() as pid`
      const inflight = sql`select pg_sleep(30)`.catch((e: unknown) => e)
      await until('the query runs', async () => (await admin`select 1 from pg_stat_activity where pid = ${pid} and state = 'active'`).length === 1)
      await local.stopRegion('us-east-1')
      const err = await inflight
      expect(err).toBeInstanceOf(DsqlConnectionError)
      expect((err as DsqlConnectionError).code).toBe('CONNECTION_CLOSED')
      await until('a connection on us-east-2', async () => sql.options.dsql.lastHost === local.regions[1].host || (await sql`select 1`.then(() => sql.options.dsql.lastHost === local.regions[1].host, () => false)))
      expect(await sql`select 2 as two`).toEqual([{ two: 2 }])
      expect(sql.options.dsql.lastHost).toBe(local.regions[1].host)
      expect(sql.options.dsql.endpoints[0].downUntil).toBeInstanceOf(Date)
      expect(warned.filter((w) => w.startsWith('dsql: endpoint failed'))).toEqual([`dsql: endpoint failed; new connections go to the next one ${local.regions[0].host}`])

      // Fail-back: once the cool-off is over, a new connection prefers the first Region again.
      await local.startRegion('us-east-1')
      await until('the cool-off ends', () => sql.options.dsql.endpoints[0].downUntil === undefined)
      const [{ pid: onB }] = await sql`select pg_backend_pid() as pid`
      await admin`select pg_terminate_backend(${onB})`
      await until('back on us-east-1', async () => (await sql`select 1`.then(() => true, () => false)) && sql.options.dsql.lastHost === local.regions[0].host)
      expect(sql.options.dsql.lastHost).toBe(local.regions[0].host)
    } finally {
      await Promise.all([sql.end({ timeout: 1 }), admin.end({ timeout: 1 })])
    }
  })

  test('every Region down: one typed error naming each endpoint and why, within connect_timeout', async () => {
    await Promise.all(local.regions.map((r) => local.stopRegion(r.region)))
    const sql = dsql(options({ max: 1, connect_timeout: 5 }))
    const started = Date.now()
    try {
      const err = await sql`select 1`.catch((e: unknown) => e)
      expect(err).toBeInstanceOf(DsqlConnectionError)
      const message = (err as Error).message
      for (const r of local.regions) expect(message).toContain(`${r.host} (${r.region})`)
      expect(message).toMatch(/No endpoint of the cluster could be reached/)
      expect(Date.now() - started).toBeLessThan(5000 + 5000)
    } finally {
      await sql.end({ timeout: 1 })
    }
  })

  test('with retry on: lost before COMMIT is retried on the other Region; lost while committing is DsqlCommitUnknownError, never applied twice', async () => {
    const sql = dsql(options({ max: 2, retry: { maxRetries: 20, deadlineMs: 20_000 } }))
    try {
      await sql`create table if not exists mr_ops (op text not null)`
      await sql`delete from mr_ops`
      let attempts = 0
      await sql.begin(async (tx) => {
        attempts++
        await tx`insert into mr_ops values ('before-commit')`
        // The first attempt loses its connection before its callback is done.
        if (attempts === 1) await local.stopRegion('us-east-1')
        await tx`select 1`
      })
      expect(attempts).toBeGreaterThanOrEqual(2)
      expect(await sql`select count(*)::int as n from mr_ops where op = 'before-commit'`).toEqual([{ n: 1 }])

      // Now on us-east-2: lose it once the callback is done, as its COMMIT goes out.
      await local.startRegion('us-east-1')
      let tries = 0
      const err = await sql
        .begin(async (tx) => {
          tries++
          await tx`insert into mr_ops values ('while-committing')`
          await local.stopRegion(sql.options.dsql.lastHost === local.regions[0].host ? 'us-east-1' : 'us-east-2')
        })
        .catch((e: unknown) => e)
      expect(err).toBeInstanceOf(DsqlCommitUnknownError)
      expect(tries).toBe(1)
      await Promise.all(local.regions.map((r) => local.startRegion(r.region)))
      const [{ n }] = await sql`select count(*)::int as n from mr_ops where op = 'while-committing'`
      expect(n).toBeLessThanOrEqual(1)
    } finally {
      await Promise.all(local.regions.map((r) => local.startRegion(r.region)))
      await sql`drop table if exists mr_ops`.catch(() => undefined)
      await sql.end({ timeout: 1 })
    }
  })

  test('failover under load: concurrent transactions with retry, one Region stopped mid-way: successes equal rows, no duplicates', async () => {
    const sql = dsql(options({ max: 4, connect_timeout: 30, retry: { maxRetries: 30, deadlineMs: 60_000 } }))
    try {
      await sql`create table if not exists mr_load (op int not null)`
      await sql`delete from mr_load`
      let done = 0
      let stopped = false
      let stoppedAt = 0
      let firstAfter = 0
      const run = async (op: number) => {
        try {
          await sql.begin(async (tx) => {
            await tx`insert into mr_load values (${op})`
          })
          if (stoppedAt && !firstAfter) firstAfter = Date.now()
          return 'ok'
        } catch (err) {
          if (err instanceof DsqlCommitUnknownError) return 'unknown'
          throw err
        } finally {
          if (++done === 20 && !stopped) {
            stopped = true
            stoppedAt = Date.now()
            void local.stopRegion('us-east-1')
          }
        }
      }
      const outcomes = await Promise.all(Array.from({ length: 60 }, (_, i) => run(i)))
      expect(stopped).toBe(true)
      // A generous bound against a hang, not a measurement (that is bench/failover.ts).
      expect(firstAfter - stoppedAt).toBeLessThan(15_000)
      const rows = await sql`select op, count(*)::int as n from mr_load group by op`
      expect(rows.every((r) => r.n === 1)).toBe(true)
      const ok = outcomes.map((o, i) => [o, i] as const).filter(([o]) => o === 'ok').map(([, i]) => i)
      const present = new Set(rows.map((r) => r.op as number))
      for (const i of ok) expect(present.has(i)).toBe(true)
      // Rows beyond the successes can only be commit-unknown ones that did commit.
      expect(rows.length - ok.length).toBeLessThanOrEqual(outcomes.filter((o) => o === 'unknown').length)
      expect(sql.options.dsql.lastHost).toBe(local.regions[1].host)
    } finally {
      await local.startRegion('us-east-1')
      await sql`drop table if exists mr_load`.catch(() => undefined)
      await sql.end({ timeout: 1 })
    }
  })
})
