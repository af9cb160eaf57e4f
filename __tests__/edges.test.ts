/**
 * A hostile review of the connection layer, through the public API against a stand-in of this
 * file's own: end() and cancel() at awkward moments, onconnect hooks that misbehave, servers that
 * close at each step (TCP and WebSocket), FATAL errors before a close, connection loss in
 * transactions, notices right after startup, and secrets in what users see.
 */
import postgres from 'postgres'
import dsql, { type DsqlOptions } from '../lib'
import { startLocalDsql, type LocalDsql } from '../lib/local'
import { Handover } from '../lib/connect/handover'

let local: LocalDsql
const unhandled: unknown[] = []
const onUnhandled = (e: unknown) => unhandled.push(e)

beforeAll(async () => {
  process.on('unhandledRejection', onUnhandled)
  local = await startLocalDsql({ roles: ['appuser'] })
}, 60_000)

afterEach(async () => {
  local.setFaults({})
  await local.setLimits({ maxConnections: 10_000 })
  await local.startGateway()
  // A rejection nobody handled fails the test that caused it, not only the file.
  await sleep(20)
  expect(unhandled).toEqual([])
})

afterAll(async () => {
  await local?.stop()
  process.off('unhandledRejection', onUnhandled)
})

function open(options: DsqlOptions = {}) {
  return dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, ...options })
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** Resolves `promise`, or 'timed out' after a generous bound: a hang fails the test instead of the run. */
function within<T>(promise: Promise<T>, ms = 15_000): Promise<T | 'timed out'> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([promise, new Promise<'timed out'>((r) => (timer = setTimeout(() => r('timed out'), ms)))]).finally(() => clearTimeout(timer))
}

const failure = (p: Promise<unknown>) => p.then(() => new Error('expected a failure'), (e: unknown) => e)

/** Waits until `count` statements starting with `text` run on the server. */
async function running(text: string, count: number) {
  const probe = open({ max: 1 })
  try {
    for (let i = 0; i < 200; i++) {
      const [{ n }] = await probe`select count(*)::int as n from pg_stat_activity where query like ${text + '%'} and state = 'active'`
      if (n >= count) return
      await sleep(50)
    }
    throw new Error(`${text} never ran ${count} times`)
  } finally {
    await probe.end()
  }
}

/** A promise and its resolver: drives a hook's progress from the test. */
function gate() {
  let open: () => void = () => undefined
  const promise = new Promise<void>((r) => (open = r))
  return { promise, open }
}

describe('sql.end() at awkward moments', () => {
  test('twice, concurrently and after it resolved: every call resolves', async () => {
    const sql = open({ max: 2 })
    expect([...(await sql`select 1 as n`)]).toEqual([{ n: 1 }])
    expect(await within(Promise.all([sql.end(), sql.end({ timeout: 1 })]))).toEqual([undefined, undefined])
    expect(await within(sql.end())).toBeUndefined()
  })

  test('end({ timeout: 0 }) while connecting: resolves, the query issued before fails typed, nothing unhandled', async () => {
    const slow = async () => (await sleep(300), local.credentials)
    const sql = open({ max: 1, credentials: slow })
    const query = failure(sql`select 1 as n`)
    await sleep(50)
    expect(await within(sql.end({ timeout: 0 }))).toBeUndefined()
    const outcome = await within(query)
    // postgres.js either ran it before the timeout or destroyed it: never a hang.
    expect(outcome).not.toBe('timed out')
  })

  test('during onconnect: end() resolves once the hook finishes, and the query issued before runs', async () => {
    const hook = gate()
    let entered = false
    const sql = open({ max: 1, onconnect: async () => ((entered = true), await hook.promise) })
    const query = sql`select 7 as n`.execute()
    for (let i = 0; i < 200 && !entered; i++) await sleep(20)
    expect(entered).toBe(true)
    const ended = sql.end({ timeout: 10 })
    hook.open()
    expect([...((await within(query)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 7 }])
    expect(await within(ended)).toBeUndefined()
  })

  test('during a cancel: end() resolves and the cancelled query fails with 57014', async () => {
    const sql = open({ max: 1 })
    const query = sql`select pg_sleep(20)`
    const outcome = failure(query)
    await running('select pg_sleep(20)', 1)
    const cancelled = query.cancel()
    const ended = sql.end({ timeout: 10 })
    expect(await within(outcome)).toMatchObject({ code: '57014' })
    expect(await within(Promise.all([cancelled, ended]))).not.toBe('timed out')
  })
})

describe('query.cancel() at awkward moments', () => {
  test('on a finished query, and racing the completion of one in flight: no error, nothing unhandled, the pool works', async () => {
    const sql = open({ max: 1 })
    try {
      const done = sql`select 1 as n`
      await done
      await within(Promise.resolve(done.cancel()))
      for (let i = 0; i < 5; i++) {
        const racing = sql`select pg_sleep(0.01), ${i}::int as n`.execute()
        // Sent by now (a query still queued in postgres.js is cancelled by postgres.js itself).
        await sleep(5)
        const cancel = Promise.resolve(racing.cancel())
        const outcome = await failure(racing)
        // Either it completed or it was cancelled: both are fine, a hang or another error is not.
        if (!(outcome instanceof Error && outcome.message === 'expected a failure')) expect(outcome).toMatchObject({ code: '57014' })
        await within(cancel)
        // PostgreSQL's own race: a cancel that reaches the backend after its query finished may
        // cancel the next one (the protocol cannot say which query it meant). Once, at most.
        const next = () => sql`select ${i}::int as n`
        const after = await within(next().catch((e: { code?: string }) => (e.code === '57014' ? next() : Promise.reject(e as Error))))
        expect([...(after as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: i }])
      }
    } finally {
      await sql.end({ timeout: 5 })
    }
  })

  test('over WebSocket at the connection limit: no session, no pool slot', async () => {
    const sql = open({ max: 1, transport: 'websocket' })
    try {
      const query = sql`select pg_sleep(20)`
      const outcome = failure(query)
      await running('select pg_sleep(20)', 1)
      await local.setLimits({ maxConnections: 1 })
      const before = local.stats().authenticated
      await within(Promise.resolve(query.cancel()))
      expect(await within(outcome)).toMatchObject({ code: '57014' })
      expect(local.stats().authenticated).toBe(before)
    } finally {
      await sql.end({ timeout: 5 })
    }
  })

  test('over WebSocket after sql.end(): the cancel goes out, and end() resolves', async () => {
    const sql = open({ max: 1, transport: 'websocket' })
    const query = sql`select pg_sleep(20)`
    const outcome = failure(query)
    await running('select pg_sleep(20)', 1)
    const ended = sql.end({ timeout: 15 })
    await sleep(20)
    void query.cancel()
    expect(await within(outcome)).toMatchObject({ code: '57014' })
    expect(await within(ended)).toBeUndefined()
  })
})

describe('onconnect hooks that misbehave', () => {
  test('a hook that never resolves is bounded by connect_timeout: CONNECT_TIMEOUT, and end() resolves', async () => {
    const sql = open({ max: 1, connect_timeout: 1, onconnect: () => new Promise<void>(() => undefined) })
    const started = Date.now()
    const err = await within(failure(sql`select 1`))
    expect(err).toMatchObject({ code: 'CONNECT_TIMEOUT' })
    expect(Date.now() - started).toBeLessThan(12_000)
    expect(await within(sql.end())).toBeUndefined()
  })

  test('a hook that rejects after connect_timeout: one typed failure, the late rejection is not unhandled', async () => {
    const sql = open({ max: 1, connect_timeout: 1, onconnect: () => sleep(1500).then(() => Promise.reject(new Error('late'))) })
    const err = await within(failure(sql`select 1`))
    expect(err).toMatchObject({ code: 'CONNECT_TIMEOUT' })
    await sleep(1000)
    await within(sql.end())
  })

  test('a hook that throws a non-Error: a typed error that quotes it', async () => {
    const sql = open({
      onconnect: () => {
        throw 'plain string'
      },
    })
    const err = await failure(sql`select 1`)
    await sql.end()
    expect(err).toMatchObject({ name: 'DsqlConnectionError', message: 'onconnect failed: plain string' })
  })

  test('a hook query that fails, un-awaited, its error caught by the hook: the connection serves the pool', async () => {
    const sql = open({ max: 1, onconnect: (s) => void s.query('select * from no_such_table').catch(() => undefined) })
    try {
      // The hook swallowed its own error: the connection is fine and serves the pool's query.
      expect([...(await sql`select 1 as n`)]).toEqual([{ n: 1 }])
    } finally {
      await sql.end()
    }
  })
})

describe('notices', () => {
  test('a notice right after startup reaches onnotice with an onconnect hook too, as without one', async () => {
    for (const afterReady of ['coalesced', 'split'] as const) {
      local.setFaults({ afterReady })
      const notices: string[] = []
      const sql = open({ max: 1, onnotice: (n) => notices.push(String(n.message)), onconnect: async (s) => void (await s.query('select 1')) })
      try {
        expect([...(await sql`select 1 as n`)]).toEqual([{ n: 1 }])
        expect({ afterReady, notices }).toEqual({ afterReady, notices: ['dsql_local fault: a notice right after ReadyForQuery'] })
      } finally {
        await sql.end()
      }
    }
  })
})

describe('a server that closes at each startup step', () => {
  for (const transport of ['tcp', 'websocket'] as const)
    for (const closeAt of ['accept', 'startup', 'password'] as const)
      test(`${transport}, at ${closeAt}: a typed failure within connect_timeout, then the pool works`, async () => {
        local.setFaults({ closeAt })
        const sql = open({ max: 1, connect_timeout: 2, transport })
        try {
          const err = await within(failure(sql`select 1`))
          expect(err).toMatchObject({ name: 'DsqlConnectionError', retryable: true })
          local.setFaults({})
          expect([...((await within(sql`select 2 as n`)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 2 }])
        } finally {
          await sql.end({ timeout: 5 })
        }
      })
})

describe('a FATAL error, then the server closes the connection', () => {
  test('pg_terminate_backend: the query fails with 57P01, and the next query on the slot succeeds', async () => {
    const sql = open({ max: 1 })
    const admin = open({ max: 1 })
    try {
      const [{ pid }] = await sql`select pg_backend_pid() as pid`
      const query = failure(sql`select pg_sleep(20)`)
      await running('select pg_sleep(20)', 1)
      await admin`select pg_terminate_backend(${pid}::int)`
      expect(await within(query)).toMatchObject({ code: '57P01' })
      // postgres.js keeps the FATAL error for the slot's next connection unless told otherwise.
      expect([...((await within(sql`select 3 as n`)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 3 }])
    } finally {
      await Promise.all([sql.end({ timeout: 5 }), admin.end()])
    }
  })

  test('inside sql.begin: the transaction rejects, the process lives, the pool works', async () => {
    const sql = open({ max: 1 })
    const admin = open({ max: 1 })
    try {
      let pid = 0
      const tx = failure(
        sql.begin(async (t) => {
          ;[{ pid }] = await t`select pg_backend_pid() as pid`
          await t`select pg_sleep(20)`
        }),
      )
      await running('select pg_sleep(20)', 1)
      await admin`select pg_terminate_backend(${pid}::int)`
      expect(await within(tx)).toMatchObject({ code: expect.stringMatching(/^(57P01|CONNECTION_CLOSED)$/) })
      await sleep(100)
      expect([...((await within(sql`select 8 as n`)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 8 }])
    } finally {
      await Promise.all([sql.end({ timeout: 5 }), admin.end()])
    }
  })

  test('over WebSocket: the query fails with 57P01, and the next query on the slot succeeds', async () => {
    const sql = open({ max: 1, transport: 'websocket' })
    const admin = open({ max: 1 })
    try {
      const [{ pid }] = await sql`select pg_backend_pid() as pid`
      const query = failure(sql`select pg_sleep(20)`)
      await running('select pg_sleep(20)', 1)
      await admin`select pg_terminate_backend(${pid}::int)`
      expect(await within(query)).toMatchObject({ code: '57P01' })
      expect([...((await within(sql`select 9 as n`)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 9 }])
    } finally {
      await Promise.all([sql.end({ timeout: 5 }), admin.end()])
    }
  })
})

describe('connection loss in transactions', () => {
  test('inside sql.begin with more statements queued: no stale ROLLBACK reaches the next connection', async () => {
    const sql = open({ max: 1 })
    try {
      const tx = failure(sql.begin((t) => [t`select pg_sleep(20)`, t`select 1`, t`select 2`]))
      await running('select pg_sleep(20)', 1)
      await local.stopGateway()
      expect(await within(tx)).toMatchObject({ code: 'CONNECTION_CLOSED' })
      await sleep(100)
      await local.startGateway()
      // A queued ROLLBACK would run first on the new connection and answer this query with nothing.
      expect([...((await within(sql`select 5 as n`)) as postgres.RowList<postgres.Row[]>)]).toEqual([{ n: 5 }])
      const [{ status }] = await sql`select 'ok' as status`
      expect(status).toBe('ok')
    } finally {
      await sql.end({ timeout: 5 })
    }
  })

  test('max_lifetime expiring mid-transaction: the transaction commits, then the connection is replaced', async () => {
    const sql = open({ max: 1, max_lifetime: 1 })
    try {
      const result = await within(
        sql.begin(async (t) => {
          const [{ pid }] = await t`select pg_backend_pid() as pid`
          await t`select pg_sleep(1.5)`
          const [{ again }] = await t`select pg_backend_pid() as again`
          return pid === again
        }),
      )
      expect(result).toBe(true)
      expect([...(await sql`select 6 as n`)]).toEqual([{ n: 6 }])
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
})

describe('secrets stay secret', () => {
  const secrets = { accessKeyId: 'AKIDEDGESEDGES', secretAccessKey: 'edges/secret/KEY/abcdefghijklmnop', sessionToken: 'EDGESsessionTOKENxyz0123456789' }
  const leaks = (text: string) => [/X-Amz-Signature/i, /X-Amz-Security-Token/i, new RegExp(secrets.secretAccessKey), new RegExp(secrets.sessionToken)].filter((r) => r.test(text))

  function dump(err: unknown): string {
    const seen: string[] = []
    for (let e = err as { message?: string; stack?: string; cause?: unknown } | undefined, i = 0; e && i < 5; e = e.cause as typeof e, i++)
      seen.push(String(e.message), String(e.stack), JSON.stringify(e, Object.getOwnPropertyNames(e)))
    return seen.join('\n')
  }

  for (const transport of ['tcp', 'websocket'] as const)
    test(`${transport}: rejected credentials, logger output and sql.options carry no token, signature or key`, async () => {
      const logged: string[] = []
      const log = (m: string, f?: object) => logged.push(m + JSON.stringify(f ?? {}))
      const sql = open({ max: 1, transport, credentials: secrets, logger: { debug: log, warn: log, error: log } })
      const err = await failure(sql`select 1`)
      const pass = sql.options.pass as unknown as () => Promise<string>
      const token = await pass()
      await sql.end()
      expect(err).toMatchObject({ name: 'DsqlTokenError' })
      expect(token).toMatch(/X-Amz-Signature/)
      expect(leaks(dump(err))).toEqual([])
      expect(leaks(logged.join('\n'))).toEqual([])
      expect(leaks(JSON.stringify(sql.options))).toEqual([])
      expect(dump(err)).not.toContain(token)
    })

  test('sql.options.pass failing (credentials that throw): its error carries no secret', async () => {
    const sql = open({
      credentials: async () => {
        throw new Error('no identity')
      },
    })
    const err = await failure((sql.options.pass as unknown as () => Promise<string>)())
    await sql.end()
    expect(err).toMatchObject({ name: 'DsqlCredentialsError' })
    expect(leaks(dump(err))).toEqual([])
  })
})

describe('end() after a lost connection', () => {
  test('a query sent just as the server went away fails typed, and end() still resolves', async () => {
    const sql = open({ connect_timeout: 3 })
    await sql`select 1`
    // The server closes; the client has not read the FIN yet when the next query goes out.
    await local.stopGateway()
    const lost = await sql`select 1`.then(() => 'ok', (e: { code?: string }) => e.code)
    // CONNECTION_CLOSED when it went out on the old connection; ECONNREFUSED if the FIN came first.
    expect(['CONNECTION_CLOSED', 'ECONNREFUSED']).toContain(lost)
    await local.startGateway()
    expect(await sql`select 2 as two`).toEqual([{ two: 2 }])
    expect(await within(sql.end())).toBeUndefined()
  })
})

describe('a close while postgres.js holds a write', () => {
  test("the slot's next connection opens at once (postgres.js 3.4.9 would leave it waiting on a cancelled timer)", async () => {
    // Each hand-over's transport, and what postgres.js wrote to it: this test closes two at once.
    type Duplex = import('node:stream').Duplex
    const transports = new Map<Handover, { stream: Duplex; wrote: string }>()
    const proto = Handover.prototype as unknown as {
      attach(this: Handover, session: { stream: Duplex }): void
      send(this: Handover, chunk: Buffer, callback: () => void): void
    }
    const { attach, send } = proto
    const spies = [
      jest.spyOn(proto, 'attach').mockImplementation(function (this: Handover, session) {
        transports.set(this, { stream: session.stream, wrote: '' })
        return attach.call(this, session)
      }),
      jest.spyOn(proto, 'send').mockImplementation(function (this: Handover, chunk, callback) {
        const seen = transports.get(this)
        if (seen) seen.wrote += chunk.toString('latin1')
        return send.call(this, chunk, callback)
      }),
    ]
    const sql = open({ max: 2, connect_timeout: 20 })
    try {
      await Promise.all([sql`select pg_sleep(0.2)`, sql`select pg_sleep(0.2)`])
      expect(transports.size).toBe(2)
      const busy = failure(sql`select pg_sleep(30)`)
      await running('select pg_sleep(30)', 1)
      const sleeping = (x: { wrote: string }) => Number(x.wrote.includes('pg_sleep(30)'))
      const [a, b] = [...transports.values()].filter((x) => x.wrote.includes('pg_sleep(0.2)')).sort((x, y) => sleeping(y) - sleeping(x))
      // Both connections close in one turn of the event loop (as when a Region goes away): the
      // busy one first. Its query's failure issues the next query, which postgres.js writes to
      // the other, idle connection on a setImmediate; that connection's close comes before it.
      const next = busy.then(() => failure(sql`select 'next'`))
      const closed: string[] = []
      a.stream.once('close', () => closed.push('busy'))
      b.stream.once('close', () => closed.push('idle'))
      // libuv runs the close callbacks of one turn last-closed first.
      b.stream.destroy()
      a.stream.destroy()
      expect(await busy).toMatchObject({ code: 'CONNECTION_CLOSED' })
      expect(await next).toMatchObject({ code: 'CONNECTION_CLOSED' })
      expect(closed).toEqual(['busy', 'idle'])
      // Both slots open again; without the fix one never sends its StartupMessage (CONNECT_TIMEOUT).
      const again = await within(Promise.all([sql`select pg_sleep(0.1), 3 as n`, sql`select pg_sleep(0.1), 4 as n`]).catch((e: Error) => e.message))
      expect(again).toEqual([[{ pg_sleep: '', n: 3 }], [{ pg_sleep: '', n: 4 }]])
    } finally {
      spies.forEach((spy) => spy.mockRestore())
      await sql.end({ timeout: 1 })
    }
  })
})
