/**
 * How a connection is set up, on the wire: the schema rides in the StartupMessage
 * (`options=-c search_path=...`), falls back to a SET when a server refuses `options`, and the
 * client's writes per connection stay few (what a server that leaves Nagle on makes costly).
 */
import * as tls from 'node:tls'
import dsql, { DsqlConnectionError, type DsqlOptions } from '../lib'
import { forgetEndpoints, learnAuth, sendsTokenEarly } from '../lib/connect/startup'
import { resolveConfig } from '../lib/config'
import { startLocalDsql, type LocalDsql } from '../lib/local'

let local: LocalDsql

beforeAll(async () => {
  local = await startLocalDsql({ roles: ['appuser'], nagle: true })
}, 60_000)

// Each test starts with endpoints the connector has not met: its first connection waits to be asked for the token.
beforeEach(() => forgetEndpoints())
afterEach(() => local.setFaults({}))
afterAll(async () => local?.stop())

const options = (extra: DsqlOptions = {}): DsqlOptions => ({
  host: local.host,
  hostaddr: local.hostaddr,
  port: local.port,
  sslrootcert: local.caFile,
  credentials: local.credentials,
  ...extra,
})

/** The plaintext the client writes to the stand-in, one entry per write() on its TLS sockets. */
function recordClientWrites(): { writes: string[]; restore(): void } {
  const writes: string[] = []
  // The module object itself: `import * as` gives a copy whose properties cannot be redefined.
  const tlsModule = jest.requireActual<typeof tls>('node:tls')
  const connect = tlsModule.connect
  const spy = jest.spyOn(tlsModule, 'connect').mockImplementation((...args: unknown[]) => {
    const socket = (connect as (...a: unknown[]) => tls.TLSSocket)(...args)
    const write = socket.write
    socket.write = ((...w: unknown[]) => {
      writes.push(Buffer.from(w[0] as Buffer).toString('latin1'))
      return (write as (...a: unknown[]) => boolean).apply(socket, w)
    }) as typeof socket.write
    return socket
  })
  return { writes, restore: () => spy.mockRestore() }
}

/** The messages of one client write, by type ('startup' for the StartupMessage), e.g. ['startup', 'p']. */
function messagesOf(write: string): string[] {
  const bytes = Buffer.from(write, 'latin1')
  const types: string[] = []
  let at = 0
  if (bytes.length >= 8 && bytes.readUInt32BE(4) === 196608) {
    types.push('startup')
    at = bytes.readUInt32BE(0)
  }
  for (; at + 5 <= bytes.length; at += 1 + bytes.readUInt32BE(at + 1)) types.push(String.fromCharCode(bytes[at]))
  return types
}

/** A Flush message: type H, length 4, nothing else. */
const FLUSH = 'H\0\0\0\x04'

async function schemaOf(extra: DsqlOptions): Promise<{ schema: string | null; path: string }> {
  const sql = dsql(options({ max: 1, ...extra }))
  try {
    const [row] = await sql`select current_schema() as schema, current_setting('search_path') as path`
    return { schema: row.schema as string | null, path: row.path as string }
  } finally {
    await sql.end({ timeout: 2 })
  }
}

describe('the schema in the StartupMessage', () => {
  test('admin gets public, appuser myschema, a chosen schema that one, schema: false the default', async () => {
    expect(await schemaOf({})).toEqual({ schema: 'public', path: '"public"' })
    expect(await schemaOf({ user: 'appuser' })).toEqual({ schema: 'myschema', path: '"myschema"' })
    expect((await schemaOf({ schema: 'pg_catalog' })).schema).toBe('pg_catalog')
    expect((await schemaOf({ user: 'appuser', schema: false })).path).toBe('"$user", public')
  })

  test('a schema name with spaces and quotes survives the options escaping', async () => {
    const name = 'odd "name\\ here'
    const admin = dsql(options({ max: 1 }))
    try {
      await admin.unsafe(`create schema if not exists "${name.replace(/"/g, '""')}"`)
    } finally {
      await admin.end({ timeout: 2 })
    }
    expect((await schemaOf({ schema: name })).schema).toBe(name)
  })

  test('is sent as options; no SET goes out; two client writes to the first row, and Flushes', async () => {
    const recorded = recordClientWrites()
    try {
      expect(await schemaOf({ user: 'appuser' })).toEqual({ schema: 'myschema', path: '"myschema"' })
    } finally {
      recorded.restore()
    }
    const [startupMessage, query, ...after] = recorded.writes.filter((w) => w !== FLUSH)
    expect(startupMessage).toContain('options\0-c search_path="myschema"\0')
    expect(messagesOf(startupMessage)).toEqual(['startup', 'p'])
    expect(query).toContain('select current_schema()')
    expect(recorded.writes.join('')).not.toMatch(/SET search_path/i)
    // Then only postgres.js's Terminate.
    expect(after.map((w) => w[0])).toEqual(['X'])
  })

  test("with the user's own options, the schema's -c comes after them; the schema wins over a search_path parameter", async () => {
    const recorded = recordClientWrites()
    try {
      const sql = dsql(options({ max: 1, connection: { options: '-c TimeZone=Asia/Tokyo', search_path: 'pg_catalog' } }))
      try {
        const [row] = await sql`select current_schema() as s, current_setting('TimeZone') as tz`
        expect(row).toEqual({ s: 'public', tz: 'Asia/Tokyo' })
      } finally {
        await sql.end({ timeout: 2 })
      }
    } finally {
      recorded.restore()
    }
    expect(recorded.writes[0]).toContain('options\0-c TimeZone=Asia/Tokyo -c search_path="public"\0')
  })
})

describe('a server that refuses options in the StartupMessage', () => {
  test('the schema is selected with a SET instead, remembered for the next connections', async () => {
    local.setFaults({ refuseOptions: true })
    const warnings: string[] = []
    const sql = dsql(options({ user: 'appuser', max: 2, logger: { warn: (message) => warnings.push(message) } }))
    const recorded = recordClientWrites()
    try {
      const accepted = local.stats().accepted
      const [first] = await sql`select current_schema() as s`
      expect(first.s).toBe('myschema')
      // One connection refused, one that selected the schema with a SET.
      expect(local.stats().accepted - accepted).toBe(2)
      expect(warnings.filter((w) => /refused the schema in the startup message/.test(w))).toHaveLength(1)

      // A second connection (the first is reserved) goes straight to the SET.
      const reserved = await sql.reserve()
      recorded.writes.length = 0
      try {
        const [second] = await sql`select current_schema() as s, pg_backend_pid() as pid`
        const [mine] = await reserved`select pg_backend_pid() as pid`
        expect(second.s).toBe('myschema')
        expect(second.pid).not.toBe(mine.pid)
      } finally {
        reserved.release()
      }
      expect(local.stats().accepted - accepted).toBe(3)
      expect(warnings).toHaveLength(1)
      // This endpoint asked for the token before: it goes with the StartupMessage now.
      const [startupMessage, ...rest] = recorded.writes
      expect(startupMessage).not.toContain('options\0')
      expect(messagesOf(startupMessage)).toEqual(['startup', 'p'])
      const query = rest.find((w) => w !== FLUSH)!
      // The SET and the first query leave in one write.
      expect(query).toMatch(/^Q.{4}SET search_path = "myschema"\0[\s\S]*select current_schema\(\)/)
    } finally {
      recorded.restore()
      await sql.end({ timeout: 2 })
    }
  })

  test('schema: false sends no options, so nothing is refused', async () => {
    local.setFaults({ refuseOptions: true })
    const accepted = local.stats().accepted
    expect((await schemaOf({ schema: false })).path).toBe('"$user", public')
    expect(local.stats().accepted - accepted).toBe(1)
  })

  test("the user's own refused options fail with the server's words after one try with the schema by SET", async () => {
    local.setFaults({ refuseOptions: true })
    const sql = dsql(options({ max: 1, connection: { options: '-c TimeZone=UTC' } }))
    try {
      await expect(sql`select 1`).rejects.toThrow(/unsupported startup parameter: options/)
    } finally {
      await sql.end({ timeout: 2 })
    }
  })
})

describe('the stand-in nagle switch', () => {
  test('is a boolean limit, changeable at run time; connections work either way', async () => {
    expect(() => local.setLimits({ nagle: 'yes' as unknown as boolean })).toThrow(/Invalid limit nagle/)
    await local.setLimits({ nagle: false })
    expect((await schemaOf({})).schema).toBe('public')
    await local.setLimits({ nagle: true })
    expect((await schemaOf({})).schema).toBe('public')
  })
})

/** postgres.js's first query, in one write: Parse, Describe, Bind, Execute, Sync. */
const QUERY = ['P', 'D', 'B', 'E', 'S']

/** One new client's select, with the writes its TLS sockets made. */
async function recordedSelect(extra: DsqlOptions = {}): Promise<string[]> {
  const recorded = recordClientWrites()
  try {
    const sql = dsql(options({ max: 1, ...extra }))
    try {
      expect((await sql`select 1 as n`)[0].n).toBe(1)
    } finally {
      await sql.end({ timeout: 2 })
    }
  } finally {
    recorded.restore()
  }
  return recorded.writes
}

describe('the token sent with the StartupMessage', () => {
  test('to a DSQL endpoint name from the first connection, in new clients too; then a Flush per server write until ReadyForQuery', async () => {
    for (let i = 0; i < 3; i++) {
      const [opening, ...rest] = await recordedSelect()
      // Startup and token in one write; the stand-in's TLS 1.3 session tickets (and a password
      // request that arrives alone) are each answered with a Flush, which asks nothing back;
      // then the query; then postgres.js's Terminate.
      expect(messagesOf(opening)).toEqual(['startup', 'p'])
      expect(rest.filter((w) => w === FLUSH).length).toBeGreaterThanOrEqual(1)
      expect(rest.filter((w) => w !== FLUSH).map(messagesOf)).toEqual([QUERY, ['X']])
    }
  })

  test('to any other endpoint name only once it asked for a cleartext password, per user; never after two failures', () => {
    const proxy = resolveConfig({ host: 'proxy.example.com', region: 'us-east-1', hostaddr: '127.0.0.1' })
    const cluster = resolveConfig({ host: local.host, hostaddr: local.hostaddr, port: local.port })
    expect(sendsTokenEarly(cluster, 'admin')).toBe(true)
    expect(sendsTokenEarly(proxy, 'admin')).toBe(false)
    learnAuth(proxy, 'admin', 'cleartext')
    expect(sendsTokenEarly(proxy, 'admin')).toBe(true)
    expect(sendsTokenEarly(proxy, 'appuser')).toBe(false)
    expect(sendsTokenEarly({ ...proxy, port: 5433 }, 'admin')).toBe(false)
    learnAuth(proxy, 'admin', 'early token failed')
    expect(sendsTokenEarly(proxy, 'admin')).toBe(false)
    learnAuth(proxy, 'admin', 'cleartext')
    expect(sendsTokenEarly(proxy, 'admin')).toBe(true)
    learnAuth(proxy, 'admin', 'early token failed')
    learnAuth(proxy, 'admin', 'cleartext')
    expect(sendsTokenEarly(proxy, 'admin')).toBe(false)
    // A DSQL name that asked for something else is not sent the token unasked either.
    learnAuth(cluster, 'admin', 'other')
    expect(sendsTokenEarly(cluster, 'admin')).toBe(false)
  })

  for (const authMethod of ['md5', 'sasl'] as const)
    test(`a server that now asks for ${authMethod}: one more connection that waits, then the typed error; never sent unasked again until asked`, async () => {
      local.setFaults({ authMethod })
      const accepted = local.stats().accepted
      const recorded = recordClientWrites()
      const sql = dsql(options({ max: 1 }))
      try {
        const err = await sql`select 1`.catch((e: unknown) => e)
        expect(err).toBeInstanceOf(DsqlConnectionError)
        expect((err as Error).message).toMatch(new RegExp(`asked for authentication method ${authMethod === 'md5' ? 5 : 10}; DSQL uses a cleartext IAM token`))
      } finally {
        recorded.restore()
        await sql.end({ timeout: 2 })
      }
      // The unasked token went once; the retry waited, was asked for another method, and sent nothing more.
      expect(local.stats().accepted - accepted).toBe(2)
      expect(recorded.writes.filter((w) => w !== FLUSH).map(messagesOf)).toEqual([['startup', 'p'], ['startup']])

      local.setFaults({})
      expect(messagesOf((await recordedSelect())[0])).toEqual(['startup'])
      expect(messagesOf((await recordedSelect())[0])).toEqual(['startup', 'p'])
    })

  test('a server that refuses an unasked token: the connection is opened again at once, waiting; after two refusals never again', async () => {
    await recordedSelect()
    local.setFaults({ refuseEarlyPassword: true })
    const opened = async () => {
      const accepted = local.stats().accepted
      const writes = await recordedSelect()
      return { connections: local.stats().accepted - accepted, opening: writes.filter((w) => messagesOf(w)[0] === 'startup').map(messagesOf) }
    }
    expect(await opened()).toEqual({ connections: 2, opening: [['startup', 'p'], ['startup']] })
    expect(await opened()).toEqual({ connections: 2, opening: [['startup', 'p'], ['startup']] })
    expect(await opened()).toEqual({ connections: 1, opening: [['startup']] })
    local.setFaults({})
    expect(await opened()).toEqual({ connections: 1, opening: [['startup']] })
  })

  test('a server that takes nothing before ReadyForQuery (no Flush either): the connection opened again, waiting, sends only what every driver sends', async () => {
    await recordedSelect()
    local.setFaults({ refuseUntilReady: true })
    const accepted = local.stats().accepted
    const writes = await recordedSelect()
    expect(local.stats().accepted - accepted).toBe(2)
    const opening = writes.filter((w) => messagesOf(w)[0] === 'startup')
    expect(opening.map(messagesOf)).toEqual([['startup', 'p'], ['startup']])
    // From the waiting connection's StartupMessage to its query: the password, and no Flush.
    const waiting = writes.slice(writes.indexOf(opening[1])).flatMap(messagesOf)
    expect(waiting).not.toContain('H')
    expect(waiting.slice(0, 2)).toEqual(['startup', 'p'])
  })

  test('a server that drops an unasked token and asks for it: the connection is opened again at once, waiting', async () => {
    local.setFaults({ dropEarlyPassword: true })
    const accepted = local.stats().accepted
    const started = Date.now()
    const writes = await recordedSelect()
    // The Flush that answers the password request arrives where the token was expected: the server
    // refuses it at once (the 10 s wait for an answer is only the backstop).
    expect(writes.filter((w) => messagesOf(w)[0] === 'startup').map(messagesOf)).toEqual([['startup', 'p'], ['startup']])
    expect(local.stats().accepted - accepted).toBe(2)
    expect(Date.now() - started).toBeLessThan(8000)
  })

  test('a wrong token sent unasked fails as when asked: DsqlTokenError, no second connection', async () => {
    await recordedSelect()
    const accepted = local.stats().accepted
    const wrong = { accessKeyId: local.credentials.accessKeyId, secretAccessKey: 'not-the-secret' }
    const sql = dsql(options({ max: 1, credentials: wrong }))
    try {
      await expect(sql`select 1`).rejects.toMatchObject({ name: 'DsqlTokenError' })
    } finally {
      await sql.end({ timeout: 2 })
    }
    expect(local.stats().accepted - accepted).toBe(1)
  })
})

describe('failures that are not the unasked token', () => {
  /** Waits for what the test drives (client writes), with a generous bound. */
  const until = async (done: () => boolean) => {
    for (const bound = Date.now() + 10_000; !done(); await new Promise((resolve) => setTimeout(resolve, 5)))
      if (Date.now() > bound) throw new Error('timed out waiting')
  }
  const cluster = () => resolveConfig({ host: local.host, hostaddr: local.hostaddr, port: local.port })

  test('a cluster waking up refuses for now: the token still goes unasked, and no connection is opened again at once for it', async () => {
    await local.setLimits({ wakingUp: true })
    const recorded = recordClientWrites()
    const openings = () => recorded.writes.filter((w) => messagesOf(w)[0] === 'startup').map(messagesOf)
    const sql = dsql(options({ max: 1, connect_timeout: 30 }))
    try {
      const answer = sql`select 1 as n`.then((rows) => rows[0].n as number, (e: Error) => e)
      // Two refused attempts, then the cluster is up.
      await until(() => openings().length >= 2)
      await local.setLimits({ wakingUp: false })
      expect(await answer).toBe(1)
    } finally {
      recorded.restore()
      await sql.end({ timeout: 2 })
      await local.setLimits({ wakingUp: false })
    }
    // Every attempt (with backoff between them) sent the token unasked: none was opened again at once, waiting.
    expect(openings()).toEqual(openings().map(() => ['startup', 'p']))
    expect(sendsTokenEarly(cluster(), 'admin')).toBe(true)
  })

  test("a client's database the server refuses: one connection per attempt, and another client of the same user keeps sending the token unasked", async () => {
    const bad = dsql(options({ max: 1, database: 'other' }))
    try {
      for (let i = 0; i < 3; i++) {
        const accepted = local.stats().accepted
        await expect(bad`select 1`).rejects.toThrow(/database "other" does not exist/)
        expect(local.stats().accepted - accepted).toBe(1)
      }
    } finally {
      await bad.end({ timeout: 2 })
    }
    expect(sendsTokenEarly(cluster(), 'admin')).toBe(true)
    expect(messagesOf((await recordedSelect())[0])).toEqual(['startup', 'p'])
  })
})

describe('a server that asks for no password', () => {
  test('the session that holds the unasked token is not handed over: the connection is opened again, waiting, and the query runs', async () => {
    local.setFaults({ authMethod: 'none' })
    const accepted = local.stats().accepted
    const writes = await recordedSelect()
    expect(writes.filter((w) => messagesOf(w)[0] === 'startup').map(messagesOf)).toEqual([['startup', 'p'], ['startup']])
    expect(local.stats().accepted - accepted).toBe(2)
    // It asked for nothing: no token goes unasked to it again.
    expect(messagesOf((await recordedSelect())[0])).toEqual(['startup'])
  })
})

describe('the fallback in the log', () => {
  test('a warning once per endpoint when a server does not take the unasked token, not one per connection', async () => {
    local.setFaults({ refuseEarlyPassword: true })
    const warnings: string[] = []
    const logger = { warn: (message: string) => warnings.push(message) }
    for (let i = 0; i < 3; i++) {
      const sql = dsql(options({ max: 1, logger }))
      try {
        expect((await sql`select 1 as n`)[0].n).toBe(1)
      } finally {
        await sql.end({ timeout: 2 })
      }
    }
    expect(warnings.filter((w) => /token sent with the startup message/.test(w))).toHaveLength(1)
  })

  test('what the fallback logs and throws holds no token, signature or key', async () => {
    const logged: string[] = []
    const log = (message: string, fields?: unknown) => void logged.push(`${message} ${JSON.stringify(fields)}`)
    const logger = { debug: log, info: log, warn: log, error: log }
    for (const fault of [{ refuseEarlyPassword: true }, { dropEarlyPassword: true }, { authMethod: 'none' as const }, { authMethod: 'md5' as const }]) {
      forgetEndpoints()
      local.setFaults(fault)
      const sql = dsql(options({ max: 1, logger }))
      try {
        await sql`select 1`.catch((e: Error) => logged.push(`${e.message} ${e.stack} ${String((e as { cause?: unknown }).cause)}`))
      } finally {
        await sql.end({ timeout: 2 })
      }
    }
    expect(logged.join('\n')).toMatch(/did not take the IAM token/)
    expect(logged.join('\n')).not.toMatch(/X-Amz-Signature|X-Amz-Credential|Action=DbConnect/i)
    expect(logged.join('\n')).not.toContain(local.credentials.secretAccessKey)
  })
})

describe('failures of the unasked token, in a row', () => {
  const until = async (done: () => boolean) => {
    for (const bound = Date.now() + 10_000; !done(); await new Promise((resolve) => setTimeout(resolve, 5)))
      if (Date.now() > bound) throw new Error('timed out waiting')
  }

  /** One client whose connections the server closes after the token, until two were closed. */
  async function closedTwice(): Promise<string[][]> {
    local.setFaults({ closeAt: 'password' })
    const recorded = recordClientWrites()
    const openings = () => recorded.writes.filter((w) => messagesOf(w)[0] === 'startup').map(messagesOf)
    const sql = dsql(options({ max: 1, connect_timeout: 30 }))
    try {
      const answer = sql`select 1 as n`.then((rows) => rows[0].n as number, (e: Error) => e)
      await until(() => openings().length >= 2)
      local.setFaults({})
      expect(await answer).toBe(1)
      return openings()
    } finally {
      recorded.restore()
      local.setFaults({})
      await sql.end({ timeout: 2 })
    }
  }

  test('an unasked token the server took again forgives an earlier failure (a server that closed once, in a deploy)', async () => {
    // The first connection sent the token unasked and was closed; the one opened at once waited.
    expect((await closedTwice()).slice(0, 2)).toEqual([['startup', 'p'], ['startup']])
    expect(messagesOf((await recordedSelect())[0])).toEqual(['startup', 'p'])
    // Days later, another close: one failure in a row, not two in the process's life.
    expect((await closedTwice()).slice(0, 2)).toEqual([['startup', 'p'], ['startup']])
    expect(messagesOf((await recordedSelect())[0])).toEqual(['startup', 'p'])
  })
})

describe('a server that drops an unasked token and waits for it, passing over Flushes', () => {
  test('with connect_timeout under 10 s the connection is still opened again in time, waiting, and the query runs', async () => {
    local.setFaults({ dropEarlyPassword: 'ignoring flushes' })
    const accepted = local.stats().accepted
    const writes = await recordedSelect({ connect_timeout: 6 })
    expect(writes.filter((w) => messagesOf(w)[0] === 'startup').map(messagesOf)).toEqual([['startup', 'p'], ['startup']])
    expect(local.stats().accepted - accepted).toBe(2)
  })
})

describe('the fallback on each negotiation and transport, and with a hook', () => {
  const faults = [{}, { refuseEarlyPassword: true }, { dropEarlyPassword: true }, { refuseOptions: true }, { refuseEarlyPassword: true, refuseOptions: true }, { authMethod: 'none' as const }]
  test.each([
    ['an SSLRequest', { sslnegotiation: 'postgres' as const }],
    ['the WebSocket transport', { transport: 'websocket' as const }],
    ['an onconnect hook', { onconnect: async (s: { query(q: string): Promise<unknown> }) => void (await s.query('select 1')) }],
    ['appuser, whose schema is not public', { user: 'appuser' }],
  ])('%s: every fault of an unasked token ends in a session with the right user and schema', async (_name, extra) => {
    for (const fault of faults) {
      forgetEndpoints()
      local.setFaults(fault)
      const sql = dsql(options({ max: 1, ...(extra as DsqlOptions) }))
      try {
        const [row] = await sql`select current_user as u, current_schema() as s`
        const user = (extra as DsqlOptions).user ?? 'admin'
        expect({ fault, ...row }).toEqual({ fault, u: user, s: user === 'admin' ? 'public' : 'myschema' })
      } finally {
        await sql.end({ timeout: 2 })
      }
    }
  })
})

describe('Flushes stop at ReadyForQuery', () => {
  test.each(['coalesced', 'split'] as const)('with a notice right after ReadyForQuery (%s): no Flush after the hand-over, and the query answered in order', async (afterReady) => {
    local.setFaults({ afterReady })
    const notices: string[] = []
    const writes = await recordedSelect({ onnotice: (n) => notices.push(n.message) })
    const firstQuery = writes.findIndex((w) => messagesOf(w)[0] === 'P')
    expect(firstQuery).toBeGreaterThan(0)
    expect(writes.slice(firstQuery).filter((w) => w === FLUSH)).toEqual([])
    expect(notices).toEqual(['dsql_local fault: a notice right after ReadyForQuery'])
  })
})
