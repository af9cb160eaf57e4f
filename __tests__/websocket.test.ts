/**
 * The WebSocket transport against the stand-in's WSS (same port, HTTP upgrade after direct TLS):
 * real TLS, real SigV4 tokens, real PostgreSQL, carried in WebSocket binary messages by `ws`.
 * A TCP relay in front of the stand-in (hostaddr points at it) shows what went over the wire
 * and lets a test cut or stall the connection at a chosen moment.
 */
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import * as https from 'node:https'
import * as net from 'node:net'
import { inspect } from 'node:util'
import selfsigned from 'selfsigned'
import { WebSocketServer } from 'ws'
import dsql, { DsqlConfigError, DsqlConnectionError, DsqlTlsError, DsqlTokenError, type DsqlOptions } from '../lib'
import { resolveConfig } from '../lib/config'
import { webSocketImpl, WebSocketStream } from '../lib/connect/websocket'
import { websocket } from '../samples/websocket'
import { connectOptions, target } from './helpers/target'

type Sql = ReturnType<typeof dsql>

const ws = (extra: DsqlOptions = {}): Sql => dsql(connectOptions({ transport: 'websocket', onnotice: () => undefined, ...extra }))

async function using<R>(options: DsqlOptions, run: (sql: Sql) => Promise<R>): Promise<R> {
  const sql = ws(options)
  try {
    return await run(sql)
  } finally {
    await sql.end({ timeout: 2 })
  }
}

async function waitFor(check: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const until = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > until) throw new Error('condition not reached')
    await new Promise((r) => setTimeout(r, 20))
  }
}

/** A TCP relay to the stand-in: records the client's first bytes, and can cut or stall connections. */
async function relay() {
  const pairs = new Set<{ client: net.Socket; server: net.Socket }>()
  const firstChunks: Buffer[] = []
  let stalled = false
  const server = net.createServer((client) => {
    const upstream = net.connect(target().port, '127.0.0.1')
    const pair = { client, server: upstream }
    pairs.add(pair)
    client.once('data', (chunk: Buffer) => firstChunks.push(chunk))
    client.on('data', (chunk: Buffer) => stalled || upstream.write(chunk))
    upstream.on('data', (chunk: Buffer) => stalled || client.write(chunk))
    const close = () => {
      pairs.delete(pair)
      client.destroy()
      upstream.destroy()
    }
    client.on('close', close).on('error', close)
    upstream.on('close', close).on('error', close)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return {
    port: (server.address() as net.AddressInfo).port,
    firstChunks,
    open: () => pairs.size,
    /** Drops every connection at the TCP level: no close frame, as a network failure would. */
    cut: () => pairs.forEach((p) => (p.client.destroy(), p.server.destroy())),
    /** Stops forwarding, both ways, without closing: a dead path. */
    stall: () => (stalled = true),
    close: () => new Promise<void>((r) => (pairs.forEach((p) => p.client.destroy()), server.close(() => r()))),
  }
}

describe('sessions over WebSocket', () => {
  test('admin and a non-admin role, each with its schema, and the bytes went as HTTP/1.1 over TLS', async () => {
    const proxy = await relay()
    try {
      for (const [user, schema] of [['admin', 'public'], ['appuser', 'myschema']]) {
        const [row] = await using({ user, port: proxy.port }, (sql) => sql`select current_user, current_schema(), current_database() as db`)
        expect(row).toEqual({ current_user: user, current_schema: schema, db: 'postgres' })
      }
      // The ClientHello is in the clear: the WebSocket client offers HTTP/1.1, never "postgresql".
      expect(proxy.firstChunks.length).toBeGreaterThanOrEqual(2)
      for (const hello of proxy.firstChunks) {
        expect(hello[0]).toBe(0x16)
        expect(hello.includes('http/1.1')).toBe(true)
        expect(hello.includes('postgresql')).toBe(false)
        expect(hello.includes(target().host)).toBe(true)
      }
    } finally {
      await proxy.close()
    }
  })

  test('a multi-megabyte result and a multi-megabyte parameter', async () => {
    await using({}, async (sql) => {
      const rows = await sql`select i, repeat(chr(64 + i), 1024 * 1024) as big from generate_series(1, 5) as i`
      expect(rows.map((r) => r.big.length)).toEqual([1, 2, 3, 4, 5].map(() => 1024 * 1024))
      expect(rows.map((r) => r.big[12345])).toEqual(['A', 'B', 'C', 'D', 'E'])
      const param = 'xyz'.repeat(1024 * 1024)
      const [{ n, tail }] = await sql`select length(${param}::text) as n, right(${param}::text, 4) as tail`
      expect(n).toBe(3 * 1024 * 1024)
      expect(tail).toBe('zxyz')
    })
  })

  test('200 concurrent queries on a pool of 3', async () => {
    await using({ max: 3 }, async (sql) => {
      const results = await Promise.all(Array.from({ length: 200 }, (_, i) => sql`select ${i}::int * 2 as v, pg_backend_pid() as pid`))
      expect(results.map(([r]) => r.v)).toEqual(Array.from({ length: 200 }, (_, i) => i * 2))
      const pids = new Set(results.map(([r]) => r.pid))
      expect(pids.size).toBeGreaterThan(1)
      expect(pids.size).toBeLessThanOrEqual(3)
    })
  })

  test('an OCC conflict is retried by sql.begin', async () => {
    const other = dsql(connectOptions({ onnotice: () => undefined }))
    const warnings: unknown[] = []
    await using({ retry: { maxRetries: 3, baseDelayMs: 1 }, logger: { warn: (_m, f) => warnings.push(f) } }, async (sql) => {
      await sql`drop table if exists ws_occ`
      await sql`create table ws_occ (id int primary key, value int not null)`
      await sql`insert into ws_occ values (1, 0)`
      let attempts = 0
      await sql.begin(async (tx) => {
        attempts++
        const [{ value }] = await tx`select value from ws_occ where id = 1`
        // Only the first attempt is overtaken: another session commits in between.
        if (attempts === 1) await other`update ws_occ set value = value + 100 where id = 1`
        await tx`update ws_occ set value = ${value + 1} where id = 1`
      })
      const [{ value }] = await sql`select value from ws_occ where id = 1`
      expect(attempts).toBe(2)
      expect(value).toBe(101)
      expect(warnings.length).toBe(1)
      await sql`drop table ws_occ`
    }).finally(() => other.end())
  })

  test('onconnect runs on each new WebSocket connection', async () => {
    const seen: string[] = []
    await using({ max: 2, onconnect: async (s) => void seen.push((await s.query('select current_schema() as s'))[0].s ?? '') }, async (sql) => {
      await Promise.all([sql`select pg_sleep(0.2)`, sql`select pg_sleep(0.2)`])
    })
    expect(seen).toEqual(['public', 'public'])
  })

  test('a query cancelled with .cancel(): the CancelRequest goes over a new WebSocket', async () => {
    await using({ max: 1 }, async (sql) => {
      const query = sql`select pg_sleep(30)`
      const outcome = query.catch((e: unknown) => e)
      const watch = dsql(connectOptions())
      try {
        await waitFor(async () => (await watch`select 1 from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'`).length === 1)
      } finally {
        await watch.end()
      }
      query.cancel()
      expect(await outcome).toMatchObject({ code: '57014' })
      const [{ one }] = await sql`select 1 as one`
      expect(one).toBe(1)
    })
  })
})

describe('failures over WebSocket', () => {
  test('bad credentials: DsqlTokenError at once, no secret in it', async () => {
    const credentials = { accessKeyId: target().credentials.accessKeyId, secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYWRONGKEYxx' }
    const sql = ws({ credentials, connect_timeout: 10 })
    const started = Date.now()
    const err = await sql`select 1`.catch((e: unknown) => e)
    await sql.end()
    expect(err).toBeInstanceOf(DsqlTokenError)
    expect((err as Error).message).toMatch(/rejected the IAM token for user "admin"/)
    expect(Date.now() - started).toBeLessThan(5000)
    const text = inspect(err, { depth: 8, showHidden: true }) + String((err as Error).stack)
    expect(text).not.toContain(credentials.secretAccessKey)
    expect(text).not.toMatch(/X-Amz-Signature=[0-9a-f]/)
  })

  test('without the stand-in CA the WebSocket TLS does not verify: DsqlTlsError', async () => {
    // Nor in PGSSLROOTCERT, which jest's global setup sets for every test file (dsql() reads it at once).
    const { PGSSLROOTCERT, ...env } = process.env
    process.env = env
    const sql = dsql({ ...connectOptions({ transport: 'websocket', connect_timeout: 5 }), sslrootcert: undefined })
    process.env.PGSSLROOTCERT = PGSSLROOTCERT
    const err = await sql`select 1`.catch((e: unknown) => e)
    await sql.end()
    expect(err).toBeInstanceOf(DsqlTlsError)
    expect((err as Error).message).toMatch(/did not verify .*No token was sent/)
  })

  test('the connection cut mid-query: a typed error, and the pool recovers', async () => {
    const proxy = await relay()
    try {
      // postgres.js learns of the loss from the error at once, and of the close a moment later:
      // the next query waits for that close, as a retrying application does.
      let closed!: () => void
      const gone = new Promise<void>((resolve) => (closed = resolve))
      await using({ max: 1, port: proxy.port, onclose: () => closed() }, async (sql) => {
        const [{ pid }] = await sql`select pg_backend_pid() as pid`
        const query = sql`select pg_sleep(30)`.catch((e: unknown) => e)
        const watch = dsql(connectOptions())
        try {
          await waitFor(async () => (await watch`select 1 from pg_stat_activity where pid = ${pid} and state = 'active'`).length === 1)
        } finally {
          await watch.end()
        }
        proxy.cut()
        const err = await query
        expect(err).toBeInstanceOf(DsqlConnectionError)
        expect((err as Error).message).toMatch(/WebSocket .* closed \(code 1006\)/)
        await gone
        const [{ again }] = await sql`select pg_backend_pid() as again`
        expect(again).not.toBe(pid)
      })
    } finally {
      await proxy.close()
    }
  })

  test('keep-alive: a stalled WebSocket is closed while idle; a live one is kept', async () => {
    const proxy = await relay()
    try {
      await using({ max: 1, port: proxy.port, keep_alive: 1 }, async (sql) => {
        const [{ pid }] = await sql`select pg_backend_pid() as pid`
        // Pings every second are answered: the connection stays across several intervals.
        await new Promise((r) => setTimeout(r, 3500))
        expect(proxy.open()).toBe(1)
        const [{ same }] = await sql`select pg_backend_pid() as same`
        expect(same).toBe(pid)
        proxy.stall()
        await waitFor(() => proxy.open() === 0)
      })
    } finally {
      await proxy.close()
    }
  })
})

test('keep-alive judges only a server that has answered pings', async () => {
  const listeners: Record<string, ((e: object) => void)[]> = {}
  let pings = 0
  let onPong = () => {}
  const socket = {
    binaryType: 'arraybuffer', readyState: 1, bufferedAmount: 0,
    send: () => undefined, close: () => undefined, terminate: () => undefined,
    addEventListener: (type: string, listener: (e: object) => void) => void (listeners[type] ??= []).push(listener),
    ping: () => void pings++,
    on: (_event: 'pong', listener: () => void) => void (onPong = listener),
  }
  const stream = new WebSocketStream(socket, resolveConfig({ host: target().host }, {}))
  const closed = new Promise<unknown>((resolve) => stream.on('error', resolve))
  stream.setKeepAlive(true, 20)
  await waitFor(() => pings >= 5)
  // Never answered: the server may not do pings; the connection is kept.
  expect(stream.destroyed).toBe(false)
  onPong()
  // Answered once, then silent: a dead connection.
  expect(await closed).toBeInstanceOf(DsqlConnectionError)
  expect(stream.destroyed).toBe(true)
})

describe("the stand-in's WSS, on its PostgreSQL port", () => {
  test("DSQL's dialect applies over WebSocket too", async () => {
    await using({}, async (sql) => {
      await expect(sql`listen jobs`).rejects.toMatchObject({ code: '0A000', message: 'unsupported statement: Listen' })
      await expect(sql`create temp table scratch (a int)`).rejects.toMatchObject({ code: '0A000' })
    })
  })

  test('HTTPS without an upgrade gets 426; a client without SNI is refused as over TCP', async () => {
    const t = target()
    const status = await new Promise<number | undefined>((resolve, reject) =>
      https.get({ host: '127.0.0.1', port: t.port, servername: t.host, ca: t.ca, path: '/', headers: { host: t.host } }, (res) => {
        res.resume()
        resolve(res.statusCode)
      }).on('error', reject),
    )
    expect(status).toBe(426)
    // An address as host: `ws` sends no SNI. The stand-in answers DSQL's refusal inside the WebSocket, as it does over TCP.
    const { WebSocket } = await import('ws')
    const socket = new WebSocket(`wss://127.0.0.1:${t.port}/`, { rejectUnauthorized: false })
    const reply = await new Promise<Buffer>((resolve, reject) => {
      const params = Buffer.from('user\0admin\0\0', 'latin1')
      const header = Buffer.alloc(8)
      header.writeUInt32BE(8 + params.length, 0)
      header.writeUInt32BE(196608, 4)
      socket.on('open', () => socket.send(Buffer.concat([header, params])))
      socket.on('message', (data: Buffer) => resolve(data))
      socket.on('error', reject)
    })
    socket.close()
    expect(reply.toString('latin1')).toContain('unable to accept connection, sni was not received')
  })
})

describe('what the client sends', () => {
  test('wss://host:port/ with Host and SNI for the endpoint, no subprotocol; StartupMessage in a binary message', async () => {
    const host = target().host
    const pems = await selfsigned.generate([{ name: 'commonName', value: host }], { keySize: 2048, extensions: [{ name: 'subjectAltName', altNames: [{ type: 2, value: host }] }] } as never)
    const server = https.createServer({ key: pems.private, cert: pems.cert })
    const wss = new WebSocketServer({ server })
    const seen: { url?: string; host?: string; protocol?: string; sni?: string; first?: Buffer; binary?: boolean } = {}
    wss.on('connection', (socket, req) => {
      Object.assign(seen, { url: req.url, host: req.headers.host, protocol: req.headers['sec-websocket-protocol'], sni: (req.socket as unknown as { servername: string }).servername })
      socket.once('message', (data: Buffer, binary: boolean) => {
        Object.assign(seen, { first: data, binary })
        // A refusal the connector does not retry: FATAL 28000.
        const fields = Buffer.from('SFATAL\0C28000\0Mgo away\0\0', 'latin1')
        const error = Buffer.alloc(5)
        error.write('E', 0, 'latin1')
        error.writeUInt32BE(fields.length + 4, 1)
        socket.send(Buffer.concat([error, fields]))
      })
    })
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
    const port = (server.address() as net.AddressInfo).port
    const sql = dsql({ ...connectOptions({ transport: 'websocket', port, connect_timeout: 5 }), sslrootcert: undefined, ssl: { ca: pems.cert } })
    try {
      await expect(sql`select 1`).rejects.toBeInstanceOf(DsqlTokenError)
      expect(seen).toMatchObject({ url: '/', host: `${host}:${port}`, protocol: undefined, sni: host, binary: true })
      // Length, protocol 3.0, then user=admin among the parameters.
      expect(seen.first!.readUInt32BE(4)).toBe(196608)
      expect(seen.first!.toString('latin1')).toContain('user\0admin\0')
    } finally {
      await sql.end()
      wss.close()
      server.close()
    }
  })
})

describe('choosing and loading the WebSocket', () => {
  const config = (o: DsqlOptions = {}, env: NodeJS.ProcessEnv = {}) => resolveConfig({ host: target().host, ...o }, env)

  test('port 443 by default (PGPORT and port still win); "transport" is checked', () => {
    expect(config({ transport: 'websocket' }).port).toBe(443)
    expect(config({ transport: 'websocket', port: 8443 }).port).toBe(8443)
    expect(config({ transport: 'websocket' }, { PGPORT: '9443' }).port).toBe(9443)
    expect(config().port).toBe(5432)
    expect(config().transport).toBe('tcp')
    expect(() => config({ transport: 'http' as never })).toThrow(DsqlConfigError)
  })

  test("the runtime's global WebSocket when nothing needs node:tls; ws for hostaddr or a CA", () => {
    class Global {}
    const ws = { WebSocket: class {} }
    expect(webSocketImpl(config({ transport: 'websocket' }), Global, () => ws)).toEqual({ WebSocket: Global, node: false })
    expect(webSocketImpl(config({ transport: 'websocket', hostaddr: '127.0.0.1' }), Global, () => ws)).toEqual({ WebSocket: ws.WebSocket, node: true })
    expect(webSocketImpl(config({ transport: 'websocket', sslrootcert: target().caFile }), Global, () => ws)).toEqual({ WebSocket: ws.WebSocket, node: true })
    expect(webSocketImpl(config({ transport: 'websocket' }), undefined, () => ws)).toEqual({ WebSocket: ws.WebSocket, node: true })
  })

  test('no global WebSocket and no ws: dsql() throws DsqlConfigError saying npm i ws', () => {
    const missing = () => {
      throw Object.assign(new Error("Cannot find module 'ws'"), { code: 'MODULE_NOT_FOUND' })
    }
    expect(() => webSocketImpl(config({ transport: 'websocket' }), undefined, missing)).toThrow(/npm i ws/)
    expect(() => webSocketImpl(config({ transport: 'websocket' }), undefined, missing)).toThrow(DsqlConfigError)
    try {
      jest.isolateModules(() => {
        jest.doMock('ws', missing)
        const { dsql: isolated, DsqlConfigError: IsolatedError } = require('../lib') as typeof import('../lib')
        expect(() => isolated(connectOptions({ transport: 'websocket' }))).toThrow(IsolatedError)
        expect(() => isolated(connectOptions({ transport: 'websocket' }))).toThrow(/Node before 22.*npm i ws/)
      })
    } finally {
      // The mock outlives isolateModules: later tests need the real ws.
      jest.dontMock('ws')
    }
  })

  test('a bundle of the package does not carry ws (a Node-only peer, required at run time)', async () => {
    const { build } = await import('esbuild')
    const result = await build({ entryPoints: [`${__dirname}/../lib/index.ts`], bundle: true, platform: 'node', write: false, metafile: true, logLevel: 'silent' })
    const inputs = Object.keys(result.metafile.inputs)
    expect(inputs.some((path) => path.includes('lib/connect/websocket.ts'))).toBe(true)
    expect(inputs.filter((path) => path.includes('node_modules/ws/'))).toEqual([])
  })

  test('the TCP path loads neither the WebSocket transport nor ws', async () => {
    // A child process (not blocking this one: the stand-in may run in it) reports what it required;
    // it reaches the stand-in through the environment it inherits from jest's global setup.
    const probe = async (transport: string) =>
      (await promisify(execFile)(
        process.execPath,
        [
          '-r',
          'ts-node/register/transpile-only',
          '-e',
          `const { dsql } = require('./lib');
           const sql = dsql({ transport: '${transport}' });
           sql\`select 1 as one\`.then(async ([r]) => { await sql.end();
             const loaded = Object.keys(require.cache).filter((k) => /node_modules\\/ws\\/|connect\\/websocket/.test(k)).length;
             console.log(JSON.stringify({ one: r.one, loaded })) })`,
        ],
        { cwd: `${__dirname}/..`, encoding: 'utf8' },
      )).stdout
    expect(JSON.parse(await probe('tcp'))).toEqual({ one: 1, loaded: 0 })
    expect(JSON.parse(await probe('websocket')).loaded).toBeGreaterThan(0)
  })
})

describe("the runtime's own WebSocket (Node's, with --experimental-websocket: what Node 22, browsers and Workers have)", () => {
  // A child process: this one has no global WebSocket. The endpoint's name resolves to the
  // stand-in (as DNS would), and the runtime trusts its CA only when NODE_EXTRA_CA_CERTS says so.
  const run = async (trustCa: boolean, connectTimeout = 3) => {
    const t = target()
    // The cause is hidden: the failure is retried briefly (as a refused address is), within connect_timeout.
    const script = `const { dsql } = require('./lib')
      const sql = dsql({ host: ${JSON.stringify(t.host)}, port: ${t.port}, credentials: ${JSON.stringify(t.credentials)}, transport: 'websocket', connect_timeout: ${connectTimeout} })
      const started = Date.now()
      const ws = () => Object.keys(require.cache).some((k) => k.includes('node_modules/ws/'))
      sql\`select current_user as who, 1 + 1 as two\`.then(
        async ([row]) => { await sql.end(); console.log(JSON.stringify({ ...row, ws: ws() })) },
        async (e) => { const ms = Date.now() - started; await sql.end(); console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message, ws: ws(), ms })) })`
    // No hostaddr or CA file either (jest's global setup exports PGHOSTADDR and PGSSLROOTCERT): a runtime's WebSocket takes neither.
    const env: NodeJS.ProcessEnv = { ...process.env, DSQL_TEST_RESOLVE: t.host, NODE_EXTRA_CA_CERTS: trustCa ? t.caFile : '' }
    delete env.PGHOSTADDR
    delete env.PGSSLROOTCERT
    const { stdout } = await promisify(execFile)(
      process.execPath,
      ['--experimental-websocket', '-r', './__tests__/helpers/resolve-endpoint.js', '-r', './__tests__/helpers/register-ts.js', '-e', script],
      { cwd: `${__dirname}/..`, encoding: 'utf8', env },
    )
    return JSON.parse(stdout) as Record<string, unknown>
  }

  test('connects through it, without loading ws', async () => {
    expect(await run(true)).toEqual({ who: 'admin', two: 2, ws: false })
  })

  test('a certificate the runtime does not trust: a typed error that says what to check (the runtime hides the cause)', async () => {
    const result = await run(false)
    expect(result).toMatchObject({ name: 'DsqlConnectionError', ws: false })
    expect(result.message).toMatch(/failed to open, and the runtime's WebSocket does not say why: .*trusts the endpoint's certificate/)
  })

  test('that failure is retried briefly, as a wrong address is, not for all of connect_timeout (30 s)', async () => {
    const result = await run(false, 30)
    expect(result).toMatchObject({ name: 'DsqlConnectionError', ws: false })
    expect(result.ms).toBeLessThan(15_000)
  }, 60_000)
})

describe('samples/websocket.ts', () => {
  test.each(['admin', 'appuser'])('runs as %s', async (user) => {
    const logs: string[] = []
    const spy = jest.spyOn(console, 'log').mockImplementation((...args: unknown[]) => void logs.push(args.join(' ')))
    try {
      await websocket(connectOptions({ user }))
    } finally {
      spy.mockRestore()
    }
    expect(logs).toEqual([
      `Connected over WebSocket as ${user}, schema ${user === 'admin' ? 'public' : 'myschema'}`,
      '6 concurrent queries on 3 WebSockets: 1, 4, 9, 16, 25, 36',
      'Read back in a transaction: over wss',
    ])
  })
})
