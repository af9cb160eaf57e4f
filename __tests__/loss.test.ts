/**
 * Connections lost under reserve(), begin and queued queries, against a stand-in of this file's
 * own (its gateway is stopped, backends are terminated): no crash, no hang, typed errors, the
 * pool slot comes back. postgres.js 3.4.9 alone crashes (nextWrite on a null socket) or hangs in
 * most of these (porsager/postgres issues 1199, 1208); and query.cancel() before a query is sent
 * (postgres.js alone then leaves the connection waiting for it: every later query hangs).
 */
import postgres from 'postgres'
import dsql, { DsqlConnectionError, type DsqlOptions } from '../lib'
import { startLocalDsql, type LocalDsql } from '../lib/local'
import { until } from './helpers/until'

let local: LocalDsql
let admin: postgres.Sql

beforeAll(async () => {
  local = await startLocalDsql()
  admin = open({ max: 1 })
}, 60_000)

afterEach(async () => {
  await local.startGateway()
})

afterAll(async () => {
  await admin?.end()
  await local?.stop()
})

function open(options: DsqlOptions = {}) {
  return dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, ...options })
}

/** Resolves `promise`, or 'timed out' after a generous bound: a hang fails the test instead of the run. */
function within<T>(promise: Promise<T>, ms = 15_000): Promise<T | 'timed out'> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([promise, new Promise<'timed out'>((r) => (timer = setTimeout(() => r('timed out'), ms)))]).finally(() => clearTimeout(timer))
}

const failure = (p: PromiseLike<unknown>) => Promise.resolve(p).then(() => new Error('expected a failure'), (e: unknown) => e)

/** Waits until a statement starting with `text` runs on the server; returns its backend's pid. Each test has its own text: backends of lost connections sleep on. */
async function running(text: string): Promise<number> {
  let pid = 0
  await until(`${text} runs`, async () => {
    const rows = await admin`select pid from pg_stat_activity where query like ${text + '%'} and state = 'active'`
    pid = rows[0]?.pid as number
    return rows.length > 0
  })
  return pid
}

const gone = (pid: number) => until(`backend ${pid} exits`, async () => (await admin`select 1 from pg_stat_activity where pid = ${pid}::int`).length === 0)
const terminate = (pid: number) => admin`select pg_terminate_backend(${pid}::int)`
const pidOf = async (sql: postgres.Sql | postgres.ReservedSql) => ((await sql`select pg_backend_pid() as pid`) as unknown as [{ pid: number }])[0].pid
const one = async (sql: postgres.Sql | postgres.ReservedSql, n: number) => [...((await within(sql`select ${n}::int as n`)) as postgres.RowList<postgres.Row[]>)]

describe('a reserved connection that is lost', () => {
  test('with a query in flight when the server goes away: the query fails typed, release() is safe, the slot comes back', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      const query = failure(reserved`select pg_sleep(20) as t1`)
      await running('select pg_sleep(20) as t1')
      await local.stopGateway()
      const err = await within(query)
      expect(err).toBeInstanceOf(DsqlConnectionError)
      expect(err).toMatchObject({ code: 'CONNECTION_CLOSED', retryable: true })
      expect(() => reserved.release()).not.toThrow()
      await local.startGateway()
      expect(await one(sql, 1)).toEqual([{ n: 1 }])
      expect(await one(sql, 2)).toEqual([{ n: 2 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })

  test('terminated while idle: a query on it fails typed (no hang, no crash), release() is safe, the pool works', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      const pid = await pidOf(reserved)
      await terminate(pid)
      await gone(pid)
      // postgres.js learns of the loss only from the socket: the query may still be sent, or not.
      const err = await within(failure(reserved`select 1`))
      expect(err).toMatchObject({ code: expect.stringMatching(/^(CONNECTION_CLOSED|57P01)$/) })
      const again = await within(failure(reserved`select 2`))
      expect(again).toBeInstanceOf(DsqlConnectionError)
      expect(again).toMatchObject({ code: 'CONNECTION_CLOSED', message: expect.stringContaining('reserve another') })
      reserved.release()
      reserved.release()
      expect(await one(sql, 3)).toEqual([{ n: 3 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })

  test('terminated while idle, then released without a query: the next query runs on a new connection', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      const pid = await pidOf(reserved)
      await terminate(pid)
      await gone(pid)
      reserved.release()
      // Our side may not have read the close yet: then that first query meets it, typed.
      let next = 0
      await until('the pool answers', async () => {
        const rows = await sql`select pg_backend_pid() as pid`.catch((e: unknown) => (expect(e).toMatchObject({ code: 'CONNECTION_CLOSED' }), []))
        next = (rows[0]?.pid as number) ?? 0
        return next !== 0
      })
      expect(next).not.toBe(pid)
      // The reserved sql stays unusable, typed.
      expect(await within(failure(reserved`select 1`))).toMatchObject({ code: 'CONNECTION_CLOSED' })
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })

  test('reserve() at the pool limit while the only connection is lost: it gets a working connection', async () => {
    const sql = open({ max: 1 })
    try {
      const busy = failure(sql`select pg_sleep(20) as t4`)
      const pid = await running('select pg_sleep(20) as t4')
      const reserving = sql.reserve()
      await terminate(pid)
      expect(await within(busy)).toMatchObject({ code: expect.stringMatching(/^(CONNECTION_CLOSED|57P01)$/) })
      const reserved = await within(reserving)
      if (reserved === 'timed out') throw new Error('reserve() never resolved')
      expect(await one(reserved, 4)).toEqual([{ n: 4 }])
      expect(await pidOf(reserved)).not.toBe(pid)
      reserved.release()
      expect(await one(sql, 5)).toEqual([{ n: 5 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })

  test('end({ timeout: 0 }) with a lost reserved connection never released resolves', async () => {
    const sql = open({ max: 2 })
    const reserved = await sql.reserve()
    const query = failure(reserved`select pg_sleep(20) as t5`)
    await running('select pg_sleep(20) as t5')
    await local.stopGateway()
    expect(await within(query)).toMatchObject({ code: 'CONNECTION_CLOSED' })
    expect(await within(sql.end({ timeout: 0 }))).toBeUndefined()
  })

  test('end() right after a lost reserved connection was released resolves', async () => {
    const sql = open({ max: 1 })
    const reserved = await sql.reserve()
    await reserved`begin`
    const query = failure(reserved`select pg_sleep(20) as t6`)
    await running('select pg_sleep(20) as t6')
    await local.stopGateway()
    expect(await within(query)).toMatchObject({ code: 'CONNECTION_CLOSED' })
    reserved.release()
    expect(await within(sql.end())).toBeUndefined()
  })

  test('a healthy reserved connection behaves as postgres.js: its session, then back to the pool', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      const pid = await pidOf(reserved)
      await reserved`begin`
      expect(await reserved.unsafe('select 7 as n')).toEqual([{ n: 7 }])
      await reserved`commit`
      reserved.release()
      expect(await pidOf(sql)).toBe(pid)
    } finally {
      await sql.end()
    }
  })
})

describe('sql.begin lost mid-transaction', () => {
  test('the transaction rejects typed, a new query works, and end() without a timeout resolves', async () => {
    const sql = open({ max: 1 })
    const tx = failure(sql.begin((t) => t`select pg_sleep(20) as t8`))
    await running('select pg_sleep(20) as t8')
    await local.stopGateway()
    expect(await within(tx)).toMatchObject({ code: 'CONNECTION_CLOSED' })
    await local.startGateway()
    expect(await one(sql, 6)).toEqual([{ n: 6 }])
    const lost = failure(sql.begin((t) => t`select pg_sleep(20) as t8b`))
    await running('select pg_sleep(20) as t8b')
    await local.stopGateway()
    expect(await within(lost)).toMatchObject({ code: 'CONNECTION_CLOSED' })
    // Called before the lost connection closed: postgres.js 3.4.9 alone waits for it forever.
    expect(await within(sql.end())).toBeUndefined()
  })
})

describe('a transaction whose callback goes on after the loss', () => {
  test('its later queries fail typed (no crash), the transaction rejects, the pool works', async () => {
    const sql = open({ max: 1 })
    try {
      let later: unknown
      let release: () => void = () => undefined
      const resume = new Promise<void>((r) => (release = r))
      const tx = failure(
        sql.begin(async (t) => {
          await t`select pg_sleep(20) as t11`.catch(() => undefined)
          // The callback swallowed the error and goes on later, as callbacks that catch do.
          await resume
          later = await failure(t`select 1`)
          return 'committed?'
        }),
      )
      await running('select pg_sleep(20) as t11')
      await local.stopGateway()
      await local.startGateway()
      // A pool query meanwhile reconnects the slot only once the transaction has let it go.
      const other = sql`select 12::int as n`
      release()
      expect(await within(tx)).toMatchObject({ code: 'CONNECTION_CLOSED' })
      expect(later).toMatchObject({ code: 'CONNECTION_CLOSED' })
      expect([...((await within(other)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 12 }])
      expect(await one(sql, 13)).toEqual([{ n: 13 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })

  test('a query on the transaction after it rejected is refused, typed', async () => {
    const sql = open({ max: 1 })
    try {
      let keep: postgres.TransactionSql | undefined
      const tx = failure(
        sql.begin(async (t) => {
          keep = t
          await t`select pg_sleep(20) as t12`
        }),
      )
      await running('select pg_sleep(20) as t12')
      await local.stopGateway()
      expect(await within(tx)).toMatchObject({ code: 'CONNECTION_CLOSED' })
      await local.startGateway()
      expect(await within(failure(keep!`select 1`))).toMatchObject({ code: 'TRANSACTION_OVER', message: expect.stringContaining('CONNECTION_CLOSED') })
      expect(await one(sql, 14)).toEqual([{ n: 14 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })
})

describe('a reserved connection lost inside its own transaction', () => {
  test('release() lets it go: the pool works again', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      await reserved`begin`
      const query = failure(reserved`select pg_sleep(20) as t13`)
      await running('select pg_sleep(20) as t13')
      await local.stopGateway()
      expect(await within(query)).toMatchObject({ code: 'CONNECTION_CLOSED' })
      await local.startGateway()
      reserved.release()
      // The lost connection closes a moment after release(): a query meanwhile may meet it, typed.
      let rows: unknown
      await until('the pool answers again', async () => (rows = await sql`select 15::int as n`.catch((e: unknown) => void expect(e).toMatchObject({ code: 'CONNECTION_CLOSED' }))) !== undefined)
      expect([...(rows as postgres.Row[])]).toEqual([{ n: 15 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })
})

describe('queries queued behind a lost one', () => {
  test('they fail typed and the slot works again', async () => {
    const sql = open({ max: 1 })
    try {
      // A query with parameters is described first: postgres.js queues the next one meanwhile.
      const first = failure(sql`select pg_sleep(${20}) as t9`)
      const pid = await running("select pg_sleep($1) as t9")
      const queued = failure(sql`select 1`)
      await terminate(pid)
      // The queued one goes to the slot's next connection, where postgres.js fails it with the
      // FATAL error it kept (as it does alone), or it fails with the loss: typed, either way.
      expect(await within(first)).toMatchObject({ code: expect.stringMatching(/^(CONNECTION_CLOSED|57P01)$/) })
      expect(await within(queued)).toMatchObject({ code: expect.stringMatching(/^(CONNECTION_CLOSED|57P01)$/) })
      // postgres.js alone, handed the lost connection for the queued query, never wrote on that slot again.
      expect(await one(sql, 7)).toEqual([{ n: 7 }])
    } finally {
      expect(await within(sql.end())).toBeUndefined()
    }
  })
})

describe('query.cancel() before postgres.js has sent the query', () => {
  test('on a reserved connection, right after creating it: 57014, and the connection serves the next query', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      const cancelled = reserved`select 1 as n`
      void cancelled.cancel()
      expect(await within(failure(cancelled))).toMatchObject({ code: '57014' })
      const executed = reserved`select 2 as n`.execute()
      void executed.cancel()
      expect(await within(failure(executed))).toMatchObject({ code: '57014' })
      // postgres.js alone leaves the reserved connection waiting for the cancelled query: this hung.
      expect(await one(reserved, 3)).toEqual([{ n: 3 }])
      reserved.release()
      expect(await one(sql, 4)).toEqual([{ n: 4 }])
    } finally {
      await sql.end()
    }
  })

  test('on the pool and in a transaction, cancelled at once: 57014, and the next query runs (postgres.js alone hangs it)', async () => {
    const sql = open({ max: 1 })
    try {
      expect(await one(sql, 0)).toEqual([{ n: 0 }])
      const created = sql`select 1 as n`
      void created.cancel()
      expect(await within(failure(created))).toMatchObject({ code: '57014' })
      const executed = sql.unsafe('select 2 as n').execute()
      void executed.cancel()
      expect(await within(failure(executed))).toMatchObject({ code: '57014' })
      expect(await one(sql, 3)).toEqual([{ n: 3 }])
      const inside = await within(
        sql.begin(async (t) => {
          const q = t`select 4 as n`
          void q.cancel()
          await failure(q)
          return [...(await t`select 5::int as n`)]
        }),
      )
      expect(inside).toEqual([{ n: 5 }])
      expect(await one(sql, 6)).toEqual([{ n: 6 }])
    } finally {
      await sql.end()
    }
  })

  test('queued behind another query: 57014, and the queries after it run', async () => {
    const sql = open({ max: 1 })
    try {
      // Described first (it has a parameter): postgres.js queues the next query until it is done.
      const first = sql`select pg_sleep(${0.3}) as t10`.execute()
      await running('select pg_sleep($1) as t10')
      const queued = sql`select 1 as n`.execute()
      const after = sql`select 2 as n`.execute()
      // postgres.js takes a query a microtask after execute(): from then on it is queued.
      await new Promise((resolve) => setImmediate(resolve))
      void queued.cancel()
      expect(await within(failure(queued))).toMatchObject({ code: '57014' })
      expect(await within(first)).toEqual([{ t10: '' }])
      expect([...((await within(after)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 2 }])
      expect(await one(sql, 5)).toEqual([{ n: 5 }])
    } finally {
      await sql.end()
    }
  })
})

describe('the guarded sql and reserved sql', () => {
  test("a `debug` function sees the user's queries on a reserved connection, not the reserve probe", async () => {
    const seen: string[] = []
    const sql = open({ max: 1, debug: (_connection: number, query: string) => void seen.push(query) })
    try {
      const reserved = await sql.reserve()
      expect(await reserved`select 7 as n`).toEqual([{ n: 7 }])
      reserved.release()
      expect(seen).toEqual(['select 7 as n'])
    } finally {
      await sql.end()
    }
  })

  test('keep the members of a function: constructor, toString, prototype (not those of a plain object)', async () => {
    const sql = open({ max: 1 })
    try {
      const reserved = await sql.reserve()
      reserved.release()
      for (const s of [sql, reserved]) {
        expect(s.constructor).toBe(Function)
        expect(s.toString).toBe(Function.prototype.toString)
        expect(Object.getPrototypeOf(s)).toBe(Function.prototype)
        expect((s as unknown as { __proto__: unknown }).__proto__).toBe(Function.prototype)
      }
    } finally {
      await sql.end()
    }
  })
})

describe("a query's error names where it was written", () => {
  test('through the sql from dsql(), a reserved sql and a transaction, as postgres.js does', async () => {
    const sql = open({ max: 2 })
    const lastLine = (e: Error) => (e.stack ?? '').split('\n').pop() ?? ''
    try {
      // The caller's line: the query below it is written on that same line.
      const line = () => `loss.test.ts:${/loss\.test\.ts:(\d+)/.exec((new Error().stack ?? '').split('\n')[2])?.[1]}:`
      const fromPool = [line(), await sql`select nonsense_pool`.catch(lastLine)]
      const reserved = await sql.reserve()
      const fromReserved = [line(), await reserved`select nonsense_reserved`.catch(lastLine)]
      reserved.release()
      let fromTransaction: unknown[] = []
      // The failed statement fails the transaction too: only what the callback saw matters here.
      await sql
        .begin(async (tx) => (fromTransaction = [line(), await tx`select nonsense_tx`.catch(lastLine)]))
        .catch(() => undefined)
      for (const [expected, got] of [fromPool, fromReserved, fromTransaction]) expect(String(got)).toContain(String(expected))
    } finally {
      await sql.end({ timeout: 2 })
    }
  })
})
