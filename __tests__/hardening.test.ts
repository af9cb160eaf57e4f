/**
 * The connection's edges, against a stand-in of this file's own (its gateway is stopped and told
 * to misbehave): sql.end() during connect, cancel, onconnect hooks, bytes after the startup's
 * ReadyForQuery, servers closing early, a connection lost inside transactions, `pass`.
 */
import * as net from 'node:net'
import postgres from 'postgres'
import dsql, { DsqlConnectionError, DsqlCredentialsError, DsqlTlsError, type DsqlOptions } from '../lib'
import { startLocalDsql, type LocalDsql } from '../lib/local'

let local: LocalDsql
const unhandled: unknown[] = []
const onUnhandled = (e: unknown) => unhandled.push(e)

beforeAll(async () => {
  process.on('unhandledRejection', onUnhandled)
  local = await startLocalDsql({ roles: ['appuser'] })
}, 60_000)

afterEach(async () => {
  local.setFaults({})
  local.setLimits({ maxConnections: 10_000 })
  await local.startGateway()
})

afterAll(async () => {
  await local?.stop()
  process.off('unhandledRejection', onUnhandled)
  expect(unhandled).toEqual([])
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

/** Credentials that take `ms` to resolve: the first connection is still opening for that long. */
const slowCredentials = (ms: number) => async () => (await sleep(ms), local.credentials)

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

describe('sql.end()', () => {
  test('while connections are opening: it resolves, and the queries issued before it complete', async () => {
    const sql = open({ max: 2, credentials: slowCredentials(300) })
    // postgres.js sends a query once it is awaited (or executed): these are issued before end().
    const queries = Promise.all([sql`select 1 as n`, sql`select 2 as n`, sql`select 3 as n`])
    await sleep(50)
    const ended = sql.end()
    expect(await within(queries)).toEqual([[{ n: 1 }], [{ n: 2 }], [{ n: 3 }]])
    expect(await within(ended)).toBeUndefined()
  })

  test('while the connection being opened fails: it resolves, and the query fails typed', async () => {
    const credentials = async () => {
      await sleep(300)
      throw new Error('no identity today')
    }
    const sql = open({ max: 1, credentials })
    const query = failure(sql`select 1`)
    await sleep(50)
    const ended = sql.end()
    expect(await within(query)).toBeInstanceOf(DsqlCredentialsError)
    expect(await within(ended)).toBeUndefined()
  })

  test('end({ timeout }) lets the queries in flight finish, also on a connection still opening', async () => {
    const sql = open({ max: 1, credentials: slowCredentials(300) })
    const query = sql`select pg_sleep(0.5), 7 as n`.execute()
    await sleep(50)
    expect(await within(sql.end({ timeout: 10 }))).toBeUndefined()
    expect((await query)[0].n).toBe(7)
  })
})

describe('cancel', () => {
  test('at the connection limit: no session, no token, no pool slot', async () => {
    const sql = open({ max: 1 })
    try {
      const query = sql`select pg_sleep(20)`
      const outcome = failure(query)
      await running('select pg_sleep(20)', 1)
      // The pool's one connection is the only one the server admits now.
      local.setLimits({ maxConnections: 1 })
      const before = local.stats().authenticated
      const started = Date.now()
      await query.cancel()
      expect(await within(outcome)).toMatchObject({ code: '57014' })
      expect(Date.now() - started).toBeLessThan(10_000)
      expect(local.stats().authenticated).toBe(before)
    } finally {
      await sql.end({ timeout: 5 })
    }
  })

  test('after sql.end(): the cancel still goes out, and end() resolves', async () => {
    const sql = open({ max: 1 })
    const query = sql`select pg_sleep(20)`
    const outcome = failure(query)
    await running('select pg_sleep(20)', 1)
    const ended = sql.end({ timeout: 15 })
    await sleep(20)
    void query.cancel()
    expect(await within(outcome)).toMatchObject({ code: '57014' })
    expect(await within(ended)).toBeUndefined()
  })

  test('a cancel that cannot be delivered is logged, never an unhandled rejection', async () => {
    const warnings: string[] = []
    const sql = open({ max: 1, logger: { warn: (m) => warnings.push(m) } })
    try {
      const query = sql`select pg_sleep(1), 1 as n`.execute()
      await running('select pg_sleep(1)', 1)
      local.setFaults({ closeAt: 'accept' })
      // The returned promise is ignored, as callers usually do.
      void query.cancel()
      expect((await query)[0].n).toBe(1)
      for (let i = 0; i < 100 && warnings.length === 0; i++) await sleep(50)
      expect(warnings).toContain('dsql: could not send the cancel request')
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
})

describe('onconnect', () => {
  test('a query the hook did not await is answered before the first query of the pool', async () => {
    let hooked: Promise<unknown> | undefined
    const sql = open({ max: 1, onconnect: (s) => void (hooked = s.query("select 'hook' as who")) })
    try {
      expect([...(await sql`select 'user' as who`)]).toEqual([{ who: 'user' }])
      expect(await hooked).toEqual([{ who: 'hook' }])
    } finally {
      await sql.end()
    }
  })

  test('a hook that throws synchronously: its error, as cause of a typed error, not a TLS error', async () => {
    const mine = new Error('sync hook failure')
    const sql = open({
      onconnect: () => {
        throw mine
      },
    })
    const err = await failure(sql`select 1`)
    await sql.end()
    expect(err).toBeInstanceOf(DsqlConnectionError)
    expect(err).not.toBeInstanceOf(DsqlTlsError)
    expect(err).toMatchObject({ message: 'onconnect failed: sync hook failure', cause: mine })
  })

  test("parameters the hook's queries change reach sql.parameters and onparameter", async () => {
    const seen: [string, string][] = []
    const sql = open({ onconnect: async (s) => void (await s.query("set application_name = 'hooked'")), onparameter: (k, v) => seen.push([k, v]) })
    try {
      const [row] = await sql`select current_setting('application_name') as app`
      expect(row.app).toBe('hooked')
      expect(sql.parameters.application_name).toBe('hooked')
      expect(seen).toContainEqual(['application_name', 'hooked'])
    } finally {
      await sql.end()
    }
  })
})

describe('bytes the server sends right after the startup ReadyForQuery', () => {
  for (const afterReady of ['coalesced', 'split'] as const) {
    test(`${afterReady}: the notice and the parameter reach postgres.js, and queries get their own rows`, async () => {
      local.setFaults({ afterReady })
      const notices: string[] = []
      const sql = open({ max: 1, onnotice: (n) => notices.push(String(n.message)) })
      try {
        expect([...(await sql`select 1 as n`)]).toEqual([{ n: 1 }])
        expect([...(await sql`select 2 as n`)]).toEqual([{ n: 2 }])
        expect(notices).toEqual(['dsql_local fault: a notice right after ReadyForQuery'])
        expect(sql.parameters.dsql_local_fault).toBe('after-ready')
      } finally {
        await sql.end()
      }
    })

    test(`${afterReady}, with an onconnect hook: the parameter reaches postgres.js, and queries get their own rows`, async () => {
      local.setFaults({ afterReady })
      const sql = open({ max: 1, onconnect: async (s) => void (await s.query('select 1')) })
      try {
        expect([...(await sql`select 1 as n`)]).toEqual([{ n: 1 }])
        expect(sql.parameters.dsql_local_fault).toBe('after-ready')
      } finally {
        await sql.end()
      }
    })
  }
})

describe('a server that closes early', () => {
  for (const sslnegotiation of ['postgres', 'direct'] as const) {
    test(`before TLS (sslnegotiation ${sslnegotiation}): a quick, typed, retryable failure`, async () => {
      local.setFaults({ closeAt: 'accept' })
      const accepted = local.stats().accepted
      const sql = open({ sslnegotiation })
      const started = Date.now()
      const err = await within(failure(sql`select 1`))
      await sql.end()
      expect(err).toBeInstanceOf(DsqlConnectionError)
      expect(err).toMatchObject({ code: 'CONNECTION_CLOSED', retryable: true })
      expect((err as Error).message).toMatch(/closed the connection/)
      expect(Date.now() - started).toBeLessThan(8000)
      expect(local.stats().accepted - accepted).toBeGreaterThan(1)
    })
  }

  for (const closeAt of ['startup', 'password'] as const) {
    test(`at the ${closeAt} step: typed failure within connect_timeout; the pool works once the server does`, async () => {
      local.setFaults({ closeAt })
      const sql = open({ max: 2, connect_timeout: 2 })
      try {
        const errors = await within(Promise.all([failure(sql`select 1`), failure(sql`select 2`)]))
        for (const err of errors as unknown[]) expect(err).toMatchObject({ name: 'DsqlConnectionError', code: expect.stringMatching(/CONNECTION_CLOSED|CONNECT_TIMEOUT/) })
        local.setFaults({})
        const rows = await within(Promise.all([sql`select 1 as n`, sql`select 2 as n`]))
        expect((rows as unknown as { n: number }[][]).map(([r]) => r.n)).toEqual([1, 2])
      } finally {
        await sql.end({ timeout: 5 })
      }
    })
  }
})

describe('time-outs and unreachable endpoints', () => {
  test('connect_timeout: code CONNECT_TIMEOUT, as postgres.js reports it', async () => {
    const held: net.Socket[] = []
    const silent = net.createServer((s) => held.push(s.on('error', () => undefined)))
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r))
    try {
      const sql = open({ port: (silent.address() as net.AddressInfo).port, connect_timeout: 1 })
      const started = Date.now()
      const err = await within(failure(sql`select 1`))
      await sql.end()
      expect(err).toBeInstanceOf(DsqlConnectionError)
      expect(err).toMatchObject({ code: 'CONNECT_TIMEOUT', message: expect.stringMatching(/Timed out after 1s/) })
      expect(Date.now() - started).toBeLessThan(5000)
    } finally {
      held.forEach((s) => s.destroy())
      silent.close()
    }
  })

  test('a refused connection: a short bounded retry, one warning, an error naming host, port and address', async () => {
    const probe = net.createServer()
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r))
    const port = (probe.address() as net.AddressInfo).port
    await new Promise((r) => probe.close(r))
    const warnings: string[] = []
    const sql = open({ port, logger: { warn: (m) => warnings.push(m) } })
    const started = Date.now()
    const err = await within(failure(sql`select 1`))
    await sql.end()
    expect(Date.now() - started).toBeLessThan(8000)
    expect(err).toBeInstanceOf(DsqlConnectionError)
    expect(err).toMatchObject({ code: 'ECONNREFUSED' })
    expect((err as Error).message).toContain(`Connection refused by 127.0.0.1:${port}`)
    expect((err as Error).message).toContain(`host ${local.host}, port ${port}`)
    expect(warnings.length).toBeLessThanOrEqual(1)
  })

  test("a host that does not match the server's certificate says so, with the endpoint's shape", async () => {
    const sql = open({ host: `abcdefghijklmnopqrstuvwxyz.dsql.${local.region}.on.aws`, region: local.region })
    const err = await within(failure(sql`select 1`))
    await sql.end()
    expect(err).toBeInstanceOf(DsqlTlsError)
    expect((err as Error).message).toMatch(/abcdefghijklmnopqrstuvwxyz\.dsql\.[a-z0-9-]+\.on\.aws does not match the server's certificate/)
    expect((err as Error).message).toContain('<cluster-id>.dsql.<region>.on.aws')
    expect((err as Error).message).not.toContain('sslrootcert')
  })
})

describe('a connection lost inside transactions', () => {
  test('both transactions reject with CONNECTION_CLOSED, the process lives, the pool works afterwards', async () => {
    const sql = open({ max: 3, connect_timeout: 5 })
    try {
      const transactions = [1, 2].map((i) => failure(sql.begin((tx) => tx`select pg_sleep(3), ${i}::int as i`)))
      await running('select pg_sleep(3)', 2)
      await local.stopGateway()
      const errors = await within(Promise.all(transactions))
      for (const err of errors as unknown[]) expect(err).toMatchObject({ code: 'CONNECTION_CLOSED' })
      // postgres.js's nextWrite would throw a tick or more later: give it the chance.
      await sleep(200)
      await local.startGateway()
      const rows = await within(Promise.all([1, 2, 3, 4, 5, 6].map((i) => sql`select ${i}::int as i`)))
      expect((rows as unknown as { i: number }[][]).map(([r]) => r.i)).toEqual([1, 2, 3, 4, 5, 6])
      const committed = await within(sql.begin(async (tx) => [await tx`select 1 as a`, await tx`select 2 as b`]))
      expect(committed).toEqual([[{ a: 1 }], [{ b: 2 }]])
    } finally {
      await sql.end({ timeout: 5 })
    }
  }, 60_000)
})

describe('sql.options.pass', () => {
  test('mints a fresh token that the server accepts; sql.options holds no token', async () => {
    const sql = open({ user: 'appuser' })
    try {
      const pass = sql.options.pass as unknown as () => Promise<string>
      const token = await pass()
      expect(token).toMatch(new RegExp(`^${local.host.replace(/\./g, '\\.')}/\\?Action=DbConnect&`))
      const plain = postgres({ host: local.hostaddr, port: local.port, user: 'appuser', database: 'postgres', password: token, ssl: { ca: local.ca, servername: local.host }, max: 1 })
      try {
        const [row] = await plain`select current_user as u`
        expect(row.u).toBe('appuser')
      } finally {
        await plain.end()
      }
      expect(JSON.stringify(sql.options)).not.toContain('X-Amz-Signature')
    } finally {
      await sql.end()
    }
  })
})
