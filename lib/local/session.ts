/**
 * One client connection through the gateway, in DSQL's order: negotiate TLS (SSLRequest or
 * direct with ALPN), read the StartupMessage, refuse what DSQL refuses (no SNI, limits, other
 * databases), ask for the token as a cleartext password, verify it, then open a session on
 * PostgreSQL with the same startup parameters and relay bytes both ways.
 */
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { TLSSocket, type SecureContext } from 'node:tls'
import { DelayedDuplex } from './latency'
import type { Limits } from './limits'
import type { Logger } from './logger'
import {
  authenticationCleartextPassword,
  CANCEL_REQUEST_CODE,
  encodeMessage,
  errorResponse,
  GSSENC_REQUEST_CODE,
  MAX_PASSWORD_LENGTH,
  MAX_STARTUP_LENGTH,
  parseErrorFields,
  parseStartupParameters,
  passwordText,
  queryMessage,
  readBytes,
  readMessage,
  SSL_REQUEST_CODE,
  startupMessage,
  TLS_HANDSHAKE_RECORD,
  type ErrorFields,
} from './protocol'
import { DialectSession, relayMessages, serverParameter, type DialectSettings } from './relay'
import { ADMIN_USER, verifyToken, type Keyring } from './sigv4'
import { errorFromFields, parameterStatus } from './frames'
import type { GatewayFaults } from './gateway'
import { HTTP_ALPN } from './websocket'

export const ALPN = 'postgresql'
const DATABASE = 'postgres'
/** Like PostgreSQL's authentication_timeout: a client that stalls before the session is dropped. */
const STARTUP_TIMEOUT_MS = 60_000
/** After an error or a close, how long the other side gets to read what is left. */
const LINGER_MS = 2_000

export interface GatewayContext {
  /** The endpoint name: what SNI and the token's host must be. */
  host: string
  region: string
  secureContext: SecureContext
  keys: Keyring
  /** Opens a connection to PostgreSQL. */
  connectBackend(): Socket
  /** Roles that exist in PostgreSQL but are not reachable through the gateway (the bootstrap superuser). */
  reservedUsers: ReadonlySet<string>
  limits(): Limits
  /** Takes a token from the rate bucket and a connection slot, or says which limit refused. */
  admit(connection: ClientConnection): ErrorFields | undefined
  logger: Logger
  count(event: 'authenticated' | 'rejected'): void
  /** The DSQL dialect (statement rules, DSQL's errors and version); undefined: relay bytes unchanged. */
  dialect?: DialectSettings
  /** The IAM identity (ARN) of the accepted key pairs; with the dialect, roles must be mapped to it. */
  iamArn?: string
  /** Misbehaviour switched on for tests (gateway.ts). */
  faults(): GatewayFaults
  /** Direct TLS without ALPN "postgresql": an HTTP request, upgraded to a WebSocket that carries the protocol. */
  webSocket?: (secured: TLSSocket) => Promise<Secured | undefined>
}

/** Where the protocol runs once TLS is up: the TLS socket, or a WebSocket carried in it. */
export type Secured = Duplex & Pick<TLSSocket, 'servername'>

type Startup = { kind: 'cancel'; packet: Buffer } | { kind: 'startup'; params: Record<string, string> }

const denied = (hint?: string): ErrorFields => ({
  severity: 'FATAL',
  code: '08006',
  message: 'unable to accept connection, access denied',
  hint,
})

/** Sockets and timers of one client connection: whatever stage it is in, destroy() ends all. */
export class ClientConnection {
  readonly stream: DelayedDuplex
  tls: TLSSocket | undefined
  backend: Socket | undefined
  /** Holds a connection slot (counted against maxConnections). */
  admitted = false
  private readonly timers: NodeJS.Timeout[] = []

  constructor(
    readonly id: number,
    readonly raw: Socket,
    limits: Limits,
  ) {
    this.stream = new DelayedDuplex(raw, limits.latencyMs, limits.nagle)
    this.stream.on('error', () => this.destroy())
    // The stream closes after the raw socket, once the bytes delayed before the close are through.
    this.stream.on('close', () => this.destroy())
    // DSQL's duration limit: the socket just closes, whatever the session is doing.
    this.timer(limits.maxConnectionDurationSecs * 1000, () => this.destroy())
  }

  timer(ms: number, run: () => void): NodeJS.Timeout {
    const timer = setTimeout(run, Math.min(ms, 2 ** 31 - 1))
    timer.unref()
    this.timers.push(timer)
    return timer
  }

  destroy(): void {
    for (const timer of this.timers) clearTimeout(timer)
    this.tls?.destroy()
    this.stream.destroy()
    this.raw.destroy()
    this.backend?.destroy()
  }
}

export async function serve(connection: ClientConnection, context: GatewayContext): Promise<void> {
  const startupTimer = connection.timer(STARTUP_TIMEOUT_MS, () => connection.destroy())
  const faults = context.faults()
  if (faults.closeAt === 'accept') return connection.destroy()
  const secured = await negotiate(connection, context)
  if (!secured) return
  // A WebSocket's stream fails a write once the client's close frame is in (readyState CLOSING):
  // that ends this connection, never the process serving it.
  secured.on('error', () => connection.destroy())
  const startup = await readStartup(secured)
  if (faults.closeAt === 'startup') return connection.destroy()
  if ('severity' in startup) return refuse(connection, secured, context, startup)
  const sni = secured.servername
  if (!sni) return refuse(connection, secured, context, { severity: 'FATAL', code: '08006', message: 'unable to accept connection, sni was not received' })
  // 'localhost' is an alias (it is in the certificate too); the token must then be for 'localhost'.
  if (sni !== context.host && sni !== 'localhost')
    return refuse(connection, secured, context, denied(`Unknown endpoint ${sni}: this server is ${context.host}.`))
  if (startup.kind === 'cancel') return forwardCancel(connection, secured, startup.packet, context)

  const params = startup.params
  const refusal = admission(connection, params, context)
  if (refusal) return refuse(connection, secured, context, refusal)

  // Trust: the session opens without a password; whatever the client sent early is the session's to read.
  if (faults.authMethod === 'none') {
    if (!(await openSession(connection, secured, params, context, faults))) return
    clearTimeout(startupTimer)
    return relay(connection, secured, connection.backend!, context.dialect)
  }
  if (faults.authMethod) return otherAuthMethod(connection, secured, context, faults.authMethod, params.user)
  // Bytes already here were sent before the request: a password the client did not wait for.
  if (faults.refuseEarlyPassword && secured.readableLength > 0)
    return refuse(connection, secured, context, { severity: 'FATAL', code: '08P01', message: 'unexpected data before the password request' })
  if (faults.dropEarlyPassword && secured.readableLength > 0) secured.read()
  secured.write(authenticationCleartextPassword())
  let password = await readMessage(secured, MAX_PASSWORD_LENGTH)
  while (faults.dropEarlyPassword === 'ignoring flushes' && password.type === 'H') password = await readMessage(secured, MAX_PASSWORD_LENGTH)
  if (faults.closeAt === 'password') return connection.destroy()
  if (password.type !== 'p')
    return refuse(connection, secured, context, { severity: 'FATAL', code: '08P01', message: `expected password response, got message type "${password.type}"` })
  const verdict = await verifyToken(passwordText(password.body), { host: sni, user: params.user, region: context.region }, context.keys)
  if (!verdict.ok) return refuse(connection, secured, context, denied(verdict.hint))
  if (context.reservedUsers.has(params.user)) return refuse(connection, secured, context, denied(`Role "${params.user}" does not exist`))
  // A guess (DSQL's answer at startup is not recorded): SET's words, as a FATAL once authenticated.
  const setting = context.dialect?.dialect.startupRefusal(params)
  if (setting) return refuse(connection, secured, context, { severity: 'FATAL', code: setting.code, message: setting.message })
  if (faults.refuseOptions && params.options !== undefined)
    return refuse(connection, secured, context, { severity: 'FATAL', code: '08P01', message: 'unsupported startup parameter: options' })

  if (!(await openSession(connection, secured, params, context, faults))) return
  clearTimeout(startupTimer)
  context.count('authenticated')
  context.logger.debug?.(`postgres-dsql local #${connection.id}: ${params.user} connected (${verdict.action}, key ${verdict.accessKeyId})`)
  relay(connection, secured, connection.backend!, context.dialect)
}

/** Until TLS is up: SSLRequest, direct TLS (ClientHello first), GSSENCRequest; plaintext refused. */
async function negotiate(connection: ClientConnection, context: GatewayContext): Promise<Secured | undefined> {
  const stream = connection.stream
  for (;;) {
    const first = await readBytes(stream, 1)
    if (first[0] === TLS_HANDSHAKE_RECORD) {
      stream.unshift(first)
      return startTls(connection, context, true)
    }
    const header = Buffer.concat([first, await readBytes(stream, 7)])
    const length = header.readUInt32BE(0)
    const code = header.readUInt32BE(4)
    if (length === 8 && code === GSSENC_REQUEST_CODE) {
      stream.write('N') // no GSSAPI encryption: the client goes on with SSLRequest or gives up
      continue
    }
    if (length === 8 && code === SSL_REQUEST_CODE) {
      // Bytes sent before our 'S' would be read as if encrypted: PostgreSQL refuses them too.
      if (stream.readableLength > 0) return void connection.destroy()
      stream.write('S')
      return startTls(connection, context, false)
    }
    if (length > 8 && length <= MAX_STARTUP_LENGTH) await readBytes(stream, length - 8)
    if (code === CANCEL_REQUEST_CODE) return void connection.destroy()
    context.count('rejected')
    context.logger.debug?.(`postgres-dsql local #${connection.id}: refused a connection without TLS`)
    stream.end(
      errorResponse({
        severity: 'FATAL',
        code: '08P01',
        message: 'unable to accept connection, SSL/TLS is required',
        hint: 'Aurora DSQL accepts only TLS connections: use sslmode=require or stronger (verify-full), or direct TLS.',
      }),
    )
    connection.timer(LINGER_MS, () => connection.destroy())
    return undefined
  }
}

async function startTls(connection: ClientConnection, context: GatewayContext, direct: boolean): Promise<Secured | undefined> {
  const ALPNProtocols = context.webSocket ? [ALPN, HTTP_ALPN] : [ALPN]
  const secured = new TLSSocket(connection.stream, { isServer: true, secureContext: context.secureContext, ALPNProtocols })
  connection.tls = secured
  // Listening from the start: a second 'error' event must never go unhandled.
  secured.on('error', () => connection.destroy())
  await new Promise<void>((resolve, reject) => {
    secured.once('secure', resolve)
    secured.once('error', reject)
  })
  if (direct && secured.alpnProtocol !== ALPN && context.webSocket) return context.webSocket(secured)
  // PostgreSQL 17 refuses direct TLS without ALPN: the bytes inside might be anything.
  if (direct && secured.alpnProtocol !== ALPN) {
    context.count('rejected')
    context.logger.debug?.(`postgres-dsql local #${connection.id}: refused direct TLS without ALPN "${ALPN}"`)
    connection.destroy()
    return undefined
  }
  return secured
}

async function readStartup(secured: Secured): Promise<Startup | ErrorFields> {
  const header = await readBytes(secured, 8)
  const length = header.readUInt32BE(0)
  const code = header.readUInt32BE(4)
  if (length < 8 || length > MAX_STARTUP_LENGTH) return { severity: 'FATAL', code: '08P01', message: 'invalid length of startup packet' }
  const body = await readBytes(secured, length - 8)
  if (code === CANCEL_REQUEST_CODE && length === 16) return { kind: 'cancel', packet: Buffer.concat([header, body]) }
  if (code >>> 16 !== 3)
    return { severity: 'FATAL', code: '0A000', message: `unsupported frontend protocol ${code >>> 16}.${code & 0xffff}: server supports 3.0` }
  return { kind: 'startup', params: parseStartupParameters(body) }
}

/** A server that asks for MD5 (salt) or SCRAM (SASL mechanisms), reads the answer, and refuses it, as PostgreSQL would a token. */
async function otherAuthMethod(connection: ClientConnection, secured: Secured, context: GatewayContext, method: 'md5' | 'sasl', user: string): Promise<void> {
  secured.write(method === 'md5' ? encodeMessage('R', Buffer.from([0, 0, 0, 5, 1, 2, 3, 4])) : encodeMessage('R', Buffer.from('\0\0\0\x0aSCRAM-SHA-256\0\0', 'latin1')))
  await readMessage(secured, MAX_PASSWORD_LENGTH)
  refuse(connection, secured, context, { severity: 'FATAL', code: '28P01', message: `password authentication failed for user "${user}"` })
}

/** The checks DSQL makes before asking for the token. */
function admission(connection: ClientConnection, params: Record<string, string>, context: GatewayContext): ErrorFields | undefined {
  if (!params.user) return { severity: 'FATAL', code: '28000', message: 'no PostgreSQL user name specified in startup packet' }
  if (context.limits().wakingUp)
    return { severity: 'FATAL', code: '08006', message: 'unable to accept connection, waking up cluster, please retry later' }
  const limited = context.admit(connection)
  if (limited) return limited
  // PostgreSQL's default: without a database parameter the database is named like the user.
  const database = params.database || params.user
  if (database !== DATABASE)
    return { severity: 'FATAL', code: '3D000', message: `database "${database}" does not exist`, hint: 'Aurora DSQL has one database: postgres.' }
  return undefined
}

/**
 * Starts the PostgreSQL session with the client's own parameters and holds its answers up to
 * ReadyForQuery (trust auth: AuthenticationOk, ParameterStatus, BackendKeyData). PostgreSQL
 * checks the role only after AuthenticationOk, so an unknown role is known only then; it
 * becomes DSQL's access-denied error instead of PostgreSQL's.
 */
async function openSession(
  connection: ClientConnection,
  secured: Secured,
  params: Record<string, string>,
  context: GatewayContext,
  faults: GatewayFaults,
): Promise<boolean> {
  const backend = context.connectBackend()
  connection.backend = backend
  backend.on('error', () => connection.destroy())
  backend.write(startupMessage({ ...params, database: DATABASE }))
  const held: Buffer[] = []
  for (;;) {
    const message = await readMessage(backend)
    const encoded = encodeMessage(message.type, message.body)
    held.push(context.dialect && message.type === 'S' ? serverParameter(encoded) : encoded)
    if (message.type === 'Z') break
    if (message.type !== 'E') continue
    const fields = parseErrorFields(message.body)
    if (fields.C === '28000' && /^role ".*" does not exist$/.test(fields.M ?? '')) {
      refuse(connection, secured, context, denied(`Role "${params.user}" does not exist`))
    } else {
      // Any other startup error (a bad parameter value, too many clients): PostgreSQL's own words.
      context.count('rejected')
      secured.write(encodeMessage(message.type, message.body))
      linger(connection, secured)
    }
    return false
  }
  if (context.dialect && context.iamArn && params.user !== ADMIN_USER && !(await mappedToIam(backend, context.iamArn))) {
    refuse(connection, secured, context, denied(`Role "${params.user}" is not mapped to the IAM identity that signed the token: as admin, AWS IAM GRANT ${params.user} TO '${context.iamArn}'.`))
    return false
  }
  if (faults.refuseUntilReady) {
    secured.write(held[0])
    await new Promise((resolve) => setTimeout(resolve, 100))
    if (secured.readableLength > 0) {
      refuse(connection, secured, context, { severity: 'FATAL', code: '08P01', message: 'unexpected message before the session was ready' })
      return false
    }
    held.shift()
  }
  if (!faults.afterReady) {
    secured.write(Buffer.concat(held))
    return true
  }
  const after = Buffer.concat([
    errorFromFields({ S: 'NOTICE', V: 'NOTICE', C: '00000', M: 'dsql_local fault: a notice right after ReadyForQuery' }, 'N'),
    parameterStatus('dsql_local_fault', 'after-ready'),
  ])
  if (faults.afterReady === 'coalesced') secured.write(Buffer.concat([...held, after]))
  else {
    // Cut inside the notice: the client must hold the partial message until the rest arrives.
    secured.write(Buffer.concat([...held, after.subarray(0, 7)]))
    await new Promise((resolve) => setTimeout(resolve, 50))
    secured.write(after.subarray(7))
  }
  return true
}

/**
 * DSQL lets a role other than admin log in only through an IAM identity mapped to it with
 * AWS IAM GRANT (sys.iam_pg_role_mappings). The stand-in's key pairs are all one identity.
 */
async function mappedToIam(backend: Socket, arn: string): Promise<boolean> {
  backend.write(queryMessage(`SELECT 1 FROM sys.iam_pg_role_mappings WHERE pg_role_name = current_user AND arn = '${arn.replace(/'/g, "''")}'`))
  let mapped = false
  for (;;) {
    const message = await readMessage(backend)
    if (message.type === 'D') mapped = true
    if (message.type === 'Z') return mapped
  }
}

/** With the dialect, message by message (relay.ts); without it, a plain byte relay. */
function relay(connection: ClientConnection, client: Secured, server: Socket, dialect: DialectSettings | undefined): void {
  if (dialect) relayMessages(client, server, new DialectSession(dialect))
  else {
    client.pipe(server)
    server.pipe(client)
  }
  // Either side closing ends the other gracefully, so that a last message still gets through.
  client.on('close', () => server.end())
  server.on('close', () => linger(connection, client))
}

async function forwardCancel(connection: ClientConnection, secured: Secured, packet: Buffer, context: GatewayContext): Promise<void> {
  const backend = context.connectBackend()
  connection.backend = backend
  backend.on('error', () => connection.destroy())
  backend.end(packet)
  await new Promise((resolve) => backend.once('close', resolve))
  context.logger.debug?.(`postgres-dsql local #${connection.id}: cancel request forwarded`)
  linger(connection, secured)
}

function refuse(connection: ClientConnection, secured: Secured, context: GatewayContext, error: ErrorFields): void {
  context.count('rejected')
  context.logger.debug?.(`postgres-dsql local #${connection.id}: refused: ${error.code} ${error.message}${error.hint ? ` (${error.hint})` : ''}`)
  secured.write(errorResponse(error))
  linger(connection, secured)
}

/** Ends our side and leaves the client a moment to read what was sent before the socket goes. */
function linger(connection: ClientConnection, secured: Secured): void {
  secured.end()
  connection.timer(LINGER_MS, () => connection.destroy())
}
