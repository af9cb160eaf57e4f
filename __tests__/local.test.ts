/**
 * The local DSQL stand-in, end to end with real parts only: real TLS (both negotiations, SNI,
 * ALPN), real SigV4 tokens from @aws-sdk/dsql-signer and @smithy/signature-v4, a real
 * PostgreSQL 16. One stand-in serves the whole file; tests vary its limits and restore them.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import * as net from 'node:net'
import { dirname } from 'node:path'
import { performance } from 'node:perf_hooks'
import { DsqlSigner } from '@aws-sdk/dsql-signer'
import { Sha256 } from '@smithy/core/checksum'
import { SignatureV4 } from '@smithy/signature-v4'
import type { AwsCredentialIdentity } from '@smithy/types'
import postgres from 'postgres'
import { startLocalDsql, type LocalDsql } from '../lib/local'
import { DEFAULT_LIMITS } from '../lib/local/limits'
import { until } from './helpers/until'
import { PgServerError, plaintextStartup, secureSocket, WireClient, type PgErrorFields, type WireOptions } from './helpers/wire'

let local: LocalDsql
let startupMs = 0

beforeAll(async () => {
  const started = performance.now()
  local = await startLocalDsql({ roles: ['appuser'] })
  const client = await connect()
  await client.query('select 1')
  startupMs = performance.now() - started
  await client.close()
})

afterAll(() => local?.stop())

afterEach(() => {
  local.setLimits(DEFAULT_LIMITS)
})

const ACCESS_DENIED = { severity: 'FATAL', code: '08006', message: 'unable to accept connection, access denied' }

/** A real token from the AWS signer, as every DSQL client makes it. */
function token(user: string, over: { hostname?: string; region?: string; credentials?: AwsCredentialIdentity; expiresIn?: number } = {}): Promise<string> {
  const signer = new DsqlSigner({
    hostname: over.hostname ?? local.host,
    region: over.region ?? local.region,
    credentials: over.credentials ?? local.credentials,
    expiresIn: over.expiresIn ?? 900,
  })
  return user === 'admin' ? signer.getDbConnectAdminAuthToken() : signer.getDbConnectAuthToken()
}

/** A token presigned directly with SigV4, for what the signer does not let us choose: date, service. */
async function presignedToken(over: { signingDate: Date; service?: string; expiresIn?: number }): Promise<string> {
  const signer = new SignatureV4({ service: over.service ?? 'dsql', region: local.region, credentials: local.credentials, sha256: Sha256 })
  const request = await signer.presign(
    { method: 'GET', protocol: 'https:', hostname: local.host, path: '/', query: { Action: 'DbConnectAdmin' }, headers: { host: local.host } },
    { signingDate: over.signingDate, expiresIn: over.expiresIn ?? 900 },
  )
  const escape = (value: string) => encodeURIComponent(value).replace(/[!'()*]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase())
  const query = Object.entries(request.query ?? {}).map(([key, value]) => `${escape(key)}=${escape(String(value))}`)
  return `${local.host}/?${query.join('&')}`
}

function wireOptions(over: Partial<WireOptions> = {}): WireOptions {
  return { port: local.port, servername: local.host, ca: local.ca, user: 'admin', ...over }
}

async function connect(over: Partial<WireOptions> = {}): Promise<WireClient> {
  const user = over.user ?? 'admin'
  return WireClient.connect(wireOptions({ password: await token(user), ...over, user }))
}

/** The ErrorResponse a connection attempt gets; fails the test if it connects instead. */
async function refusal(over: Partial<WireOptions> = {}): Promise<PgErrorFields> {
  const user = over.user ?? 'admin'
  const options = wireOptions({ password: over.password ?? (await token(user)), ...over, user })
  const client = await WireClient.connect(options).catch((err: unknown) => err)
  if (client instanceof WireClient) {
    client.destroy()
    throw new Error('expected the connection to be refused')
  }
  if (!(client instanceof PgServerError)) throw client
  return client.fields
}

const waitFor = (condition: () => boolean) => until('gateway state', condition)

/** Waits until a session runs `text`: a cancel sent earlier would find nothing to cancel. */
async function running(text: string): Promise<void> {
  const watcher = await connect()
  const sql = `select count(*) from pg_stat_activity where state = 'active' and query = '${text}'`
  try {
    await until(`a session running ${text}`, async () => (await watcher.query(sql)).rows[0][0] !== '0')
  } finally {
    await watcher.close()
  }
}

describe('connecting', () => {
  test('starts quickly: PostgreSQL, certificates and gateway ready for a first query', () => {
    expect(startupMs).toBeGreaterThan(0)
    expect(startupMs).toBeLessThan(30_000) // generous: a bound, not a benchmark (see bench/)
  })

  test.each(['direct', 'sslrequest'] as const)('admin with a DbConnectAdmin token over %s TLS', async (negotiation) => {
    const client = await connect({ negotiation })
    const { rows } = await client.query(
      `select current_user, r.rolsuper, r.rolcreaterole, pg_get_userbyid(d.datdba) as dbowner, current_setting('TimeZone') as tz
       from pg_roles r, pg_database d where r.rolname = current_user and d.datname = current_database()`,
    )
    expect(rows).toEqual([['admin', 'f', 't', 'admin', 'UTC']])
    expect(client.parameters.TimeZone).toBe('UTC')
    await client.close()
  })

  test('a non-admin role with a DbConnect token can create tables in myschema, not in public', async () => {
    const client = await connect({ user: 'appuser', params: { application_name: 'local-test', search_path: 'myschema' } })
    const { rows } = await client.query(`select current_user, current_schema(), current_setting('application_name')`)
    expect(rows).toEqual([['appuser', 'myschema', 'local-test']])
    await client.query('create table myschema.local_probe (id int primary key, name text)')
    await client.query(`insert into myschema.local_probe values (1, 'one')`)
    expect((await client.query('select name from myschema.local_probe')).rows).toEqual([['one']])
    await expect(client.query('create table public.local_probe (id int)')).rejects.toMatchObject({ fields: { code: '42501' } })
    await client.query('drop table myschema.local_probe')
    await client.close()
  })

  test('tokens of credentials added later, and of session credentials, are accepted', async () => {
    const rotated = { accessKeyId: 'AKIAROTATEDKEY000001', secretAccessKey: 'rotated/secret+key0000000000000000000000' }
    await expect(connect({ password: await token('admin', { credentials: rotated }) })).rejects.toBeInstanceOf(PgServerError)
    local.allowCredentials(rotated)
    const session = { accessKeyId: 'ASIASESSIONKEY000001', secretAccessKey: 'session/secret+key0000000000000000000000', sessionToken: 'IQoJb3JpZ2luX2VjE+/=token' }
    local.allowCredentials(session)
    for (const credentials of [rotated, session, local.credentials]) {
      const client = await connect({ password: await token('admin', { credentials }) })
      await client.close()
    }
  })

  test('transactions are repeatable read, so a concurrent write conflict is 40001 as on DSQL', async () => {
    const [a, b] = await Promise.all([connect(), connect()])
    await a.query('create table local_occ (id int primary key, value int)')
    await a.query('insert into local_occ values (1, 0)')
    expect((await a.query('show transaction_isolation')).rows).toEqual([['repeatable read']])
    await a.query('begin')
    await b.query('begin')
    await b.query('select value from local_occ where id = 1')
    await a.query('update local_occ set value = 1 where id = 1')
    await a.query('commit')
    await expect(b.query('update local_occ set value = 2 where id = 1')).rejects.toMatchObject({ fields: { code: '40001' } })
    await b.query('rollback')
    await a.query('drop table local_occ')
    await Promise.all([a.close(), b.close()])
  })

  test('postgres.js connects through both negotiations, with a token per connection, and cancels', async () => {
    for (const direct of [true, false]) {
      const sql = postgres({
        host: '127.0.0.1',
        port: local.port,
        user: 'admin',
        database: 'postgres',
        pass: () => token('admin'),
        ssl: { ca: local.ca, servername: local.host },
        max: 1,
        ...(direct ? { sslnegotiation: 'direct' } : {}),
      } as postgres.Options<{}>)
      try {
        expect(await sql`select current_user as user`).toEqual([{ user: 'admin' }])
        const query = sql`select pg_sleep(60)`
        const outcome = query.then(() => 'finished', (e: unknown) => e)
        await running('select pg_sleep(60)')
        await query.cancel()
        expect(await outcome).toMatchObject({ code: '57014' })
      } finally {
        await sql.end({ timeout: 1 })
      }
    }
  })

  test('a cancel request on its own TLS connection reaches the backend', async () => {
    const client = await connect()
    const sleeping = client.query('select pg_sleep(60)')
    sleeping.catch(() => undefined) // awaited below
    await running('select pg_sleep(60)')
    await client.cancel()
    await expect(sleeping).rejects.toMatchObject({ fields: { code: '57014' } })
    expect((await client.query('select 1')).rows).toEqual([['1']])
    await client.close()
  })
})

describe('token verification: FATAL 08006 access denied with a hint', () => {
  const signatureOf = (password: string) => /X-Amz-Signature=([0-9a-f]+)/.exec(password)?.[1] ?? '(none)'
  const session = { accessKeyId: 'ASIASESSIONKEY000002', secretAccessKey: 'other/session+secret000000000000000000000', sessionToken: 'FwoGZXIvYXdzEJr//session+token==' }

  const cases: [string, string, () => Promise<string>, string | RegExp][] = [
    [
      'tampered signature',
      'admin',
      async () => (await token('admin')).replace(/(X-Amz-Signature=[0-9a-f]*)([0-9a-f])/, (_, head: string, last: string) => head + (last === '0' ? '1' : '0')),
      /^The request signature we calculated does not match the signature you provided/,
    ],
    ['expired token', 'admin', () => presignedToken({ signingDate: new Date(Date.now() - 20 * 60_000), expiresIn: 900 }), /^Signature expired: \d{8}T\d{6}Z is now earlier than \d{8}T\d{6}Z/],
    ['token dated in the future', 'admin', () => presignedToken({ signingDate: new Date(Date.now() + 60 * 60_000) }), /^Signature not yet current: /],
    ['DbConnect for admin', 'admin', () => token('appuser'), 'Wrong user to action mapping. user: admin, action: DbConnect'],
    ['DbConnectAdmin for another role', 'appuser', () => token('admin'), 'Wrong user to action mapping. user: appuser, action: DbConnectAdmin'],
    ['another region', 'admin', () => token('admin', { region: 'eu-west-1' }), /scoped to a valid region, not 'eu-west-1'/],
    ['another service', 'admin', () => presignedToken({ signingDate: new Date(), service: 'rds-db' }), /scoped to correct service: 'dsql'/],
    ['a token for another host than the SNI', 'admin', () => token('admin', { hostname: 'abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws' }), /token is for abcdefghijklmnopqrstuvwxyz\.dsql/],
    ['an unknown access key', 'admin', () => token('admin', { credentials: { accessKeyId: 'AKIAUNKNOWNKEY000000', secretAccessKey: 'x'.repeat(40) } }), /Access Key Id you provided does not exist/],
    [
      'session credentials without their session token',
      'admin',
      () => token('admin', { credentials: { accessKeyId: session.accessKeyId, secretAccessKey: session.secretAccessKey } }),
      /X-Amz-Security-Token is missing/,
    ],
    ['session credentials with another session token', 'admin', () => token('admin', { credentials: { ...session, sessionToken: 'another' } }), /X-Amz-Security-Token does not match/],
    ['a password that is no token', 'admin', async () => 'hunter2', /^Malformed token/],
  ]

  beforeAll(() => local.allowCredentials(session))

  test.each(cases)('%s', async (_name, user, makePassword, hint) => {
    const password = await makePassword()
    const error = await refusal({ user, password })
    expect(error).toMatchObject(ACCESS_DENIED)
    expect(error.hint).toEqual(typeof hint === 'string' ? hint : expect.stringMatching(hint))
    for (const secret of [signatureOf(password), password, local.credentials.secretAccessKey, session.secretAccessKey, session.sessionToken]) {
      expect(error.hint).not.toContain(secret)
      expect(error.message).not.toContain(secret)
    }
  })

  test('a role that does not exist, or the hidden bootstrap superuser, is refused after a valid token', async () => {
    for (const user of ['ghost', 'dsql_local_bootstrap']) {
      expect(await refusal({ user })).toEqual({ ...ACCESS_DENIED, hint: `Role "${user}" does not exist` })
    }
  })

  test('only the postgres database exists', async () => {
    expect(await refusal({ database: 'other' })).toMatchObject({ severity: 'FATAL', code: '3D000', message: 'database "other" does not exist' })
  })
})

describe('transport: TLS, SNI and ALPN as DSQL requires them', () => {
  test('a plaintext StartupMessage is refused', async () => {
    const error = await plaintextStartup(local.port, { user: 'admin', database: 'postgres' })
    expect(error).toMatchObject({ severity: 'FATAL', code: '08P01', message: 'unable to accept connection, SSL/TLS is required' })
  })

  test('TLS without SNI is refused with DSQL message', async () => {
    for (const negotiation of ['direct', 'sslrequest'] as const) {
      expect(await refusal({ servername: null, negotiation })).toEqual({
        severity: 'FATAL',
        code: '08006',
        message: 'unable to accept connection, sni was not received',
        hint: undefined,
        detail: undefined,
      })
    }
  })

  test('SNI must name this endpoint (or localhost, with a token for localhost)', async () => {
    const other = 'abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws'
    // The certificate does not name another cluster: only the chain is verified here.
    const error = await refusal({ servername: other, verifyHost: false, password: await token('admin', { hostname: other }) })
    expect(error).toEqual({ ...ACCESS_DENIED, hint: `Unknown endpoint ${other}: this server is ${local.host}.`, detail: undefined })
    const client = await connect({ servername: 'localhost', password: await token('admin', { hostname: 'localhost' }) })
    expect((await client.query('select current_user')).rows).toEqual([['admin']])
    await client.close()
  })

  test('direct TLS without ALPN postgresql is cut off, with no PostgreSQL message', async () => {
    for (const alpn of [[], ['http/1.1']]) {
      const password = await token('admin')
      const outcome = await WireClient.connect(wireOptions({ alpn, password })).catch((err: unknown) => err)
      // A TLS alert or a closed socket: the client never gets to speak PostgreSQL.
      expect(outcome).not.toBeInstanceOf(WireClient)
      expect(outcome).not.toBeInstanceOf(PgServerError)
      expect((outcome as Error).message).toMatch(/closed|alert|protocol|ECONNRESET/i)
    }
    // After SSLRequest, ALPN is optional (PostgreSQL 16 clients do not send it).
    const client = await connect({ negotiation: 'sslrequest', alpn: [] })
    await client.close()
  })

  test('GSSENCRequest is declined with N, and SSLRequest then proceeds', async () => {
    const socket = net.connect(local.port, '127.0.0.1')
    const replies: string[] = []
    socket.on('data', (chunk: Buffer) => replies.push(chunk.toString('latin1')))
    const header = (code: number) => Buffer.from([0, 0, 0, 8, (code >>> 24) & 255, (code >>> 16) & 255, (code >>> 8) & 255, code & 255])
    socket.write(header(80877104))
    await waitFor(() => replies.length === 1)
    socket.write(header(80877103))
    await waitFor(() => replies.length === 2)
    expect(replies).toEqual(['N', 'S'])
    socket.destroy()
  })

  test('the server certificate is for the endpoint, issued by the exposed CA, on TLS 1.2+', async () => {
    const socket = await secureSocket(wireOptions({ password: '' }))
    expect(socket.authorized).toBe(true)
    expect(socket.alpnProtocol).toBe('postgresql')
    expect(['TLSv1.2', 'TLSv1.3']).toContain(socket.getProtocol())
    expect(socket.getPeerCertificate().subjectaltname).toContain(`DNS:${local.host}`)
    expect(readFileSync(local.caFile, 'utf8')).toBe(local.ca)
    socket.destroy()
  })
})

describe('limits', () => {
  beforeEach(() => waitFor(() => local.stats().open === 0))

  test('the connection duration limit closes the socket', async () => {
    local.setLimits({ maxConnectionDurationSecs: 1 })
    const started = Date.now()
    const client = await connect()
    await client.query('select 1')
    await client.closed
    const lived = Date.now() - started
    expect(lived).toBeGreaterThanOrEqual(900)
    expect(lived).toBeLessThan(15_000) // generous; without the limit it would never close
    await expect(client.query('select 1')).rejects.toThrow()
  })

  test('the connection rate limit answers 53400 once the burst is used', async () => {
    local.setLimits({ connectionRate: { perSecond: 0.01, burst: 2 } })
    for (let i = 0; i < 2; i++) await (await connect()).close()
    expect(await refusal()).toMatchObject({ severity: 'FATAL', code: '53400', message: 'Unable to accept connection, rate exceeded.' })
  })

  test('the open-connection limit answers 53300, and frees the slot on close', async () => {
    local.setLimits({ maxConnections: 2 })
    const [a, b] = await Promise.all([connect(), connect()])
    expect(await refusal()).toMatchObject({ severity: 'FATAL', code: '53300', message: 'Unable to accept connection, too many open connections.' })
    await a.close()
    await waitFor(() => local.stats().open === 1)
    const c = await connect()
    await Promise.all([b.close(), c.close()])
  })

  test('a waking cluster refuses new connections', async () => {
    local.setLimits({ wakingUp: true })
    expect(await refusal()).toMatchObject({ severity: 'FATAL', message: 'unable to accept connection, waking up cluster, please retry later' })
    local.setLimits({ wakingUp: false })
    await (await connect()).close()
  })

  test('added latency is paid on every round trip, TLS handshake included', async () => {
    const timed = async () => {
      const started = performance.now()
      const client = await connect()
      await client.query('select 1')
      const elapsed = performance.now() - started
      await client.close()
      return elapsed
    }
    local.setLimits({ latencyMs: 100 })
    const slow = await timed()
    // Handshake, startup, password, query: at least four round trips. Only lower bounds: a busy
    // machine makes anything slower, never faster.
    expect(slow).toBeGreaterThanOrEqual(390)
  })

  test('stats count accepted, authenticated, rejected and open connections', async () => {
    const before = local.stats()
    const client = await connect()
    await refusal({ password: 'not a token' })
    expect(local.stats()).toEqual({
      accepted: before.accepted + 2,
      authenticated: before.authenticated + 1,
      rejected: before.rejected + 1,
      open: expect.any(Number),
    })
    expect(local.stats().open).toBeGreaterThanOrEqual(1)
    await client.close()
  })

  test('stopGateway drops every connection and refuses new ones; startGateway reopens the same port', async () => {
    const client = await connect()
    const port = local.port
    await local.stopGateway()
    await client.closed
    await expect(tcpConnect(port)).rejects.toMatchObject({ code: 'ECONNREFUSED' })
    await local.startGateway()
    const again = await connect()
    expect((await again.query('select current_user')).rows).toEqual([['admin']])
    await again.close()
  })
})

describe('stop', () => {
  test('stop() leaves no process, port or directory behind', async () => {
    const base = dirname(local.caFile)
    const table = processTable()
    const ours = table.filter((p) => p.cmdline.includes(base)).map((p) => p.pid)
    expect(ours.length).toBeGreaterThanOrEqual(2) // postmaster and watchdog
    const all = [...ours, ...table.filter((p) => ours.includes(p.ppid)).map((p) => p.pid)]
    const client = await connect()

    await local.stop()

    await client.closed
    expect(all.filter(alive)).toEqual([])
    expect(existsSync(base)).toBe(false)
    await expect(tcpConnect(local.port)).rejects.toMatchObject({ code: 'ECONNREFUSED' })
  })
})

function tcpConnect(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1')
    socket.once('connect', () => {
      socket.destroy()
      resolve()
    })
    socket.once('error', reject)
  })
}

/** Every process: pid, parent pid and command line, from /proc. */
function processTable(): { pid: number; ppid: number; cmdline: string }[] {
  const table: { pid: number; ppid: number; cmdline: string }[] = []
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8')
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
      table.push({ pid: Number(entry), ppid, cmdline: readFileSync(`/proc/${entry}/cmdline`, 'utf8').replace(/\0/g, ' ') })
    } catch {
      // The process ended while we looked.
    }
  }
  return table
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
