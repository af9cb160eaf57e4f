import * as net from 'node:net'
import { Duplex } from 'node:stream'
import * as tls from 'node:tls'
import type { DsqlConfig, DsqlLogger, DsqlSession } from './config'
import { DsqlConnectionError, DsqlError, DsqlTlsError, DsqlTokenError } from './errors'
import type { Mint } from './token'
import * as wire from './wire'

/** What postgres.js hands to its `socket` option; only the fields the connector reads. */
export interface PgSocketOptions {
  user: string
  database: string
  connection: Record<string, string | number | boolean>
  fetch_types: boolean
  target_session_attrs: string | null
}

export interface ConnectorOptions {
  logger?: DsqlLogger
  onconnect?: (session: DsqlSession) => void | Promise<void>
  /** True once sql.end() was called: a connection still being opened is not handed over. */
  closing?: () => boolean
}

/**
 * postgres.js's `socket` option. Each call opens one DSQL session to ReadyForQuery (TLS, token,
 * startup, schema, onconnect), retrying what is safe to retry, and hands postgres.js a socket it
 * sees as a fresh server that trusts it. Failures come back as a socket destroyed with a typed
 * error: a rejected promise or a throw would leave postgres.js with a pool slot it never frees.
 */
export function connector(config: DsqlConfig, mint: Mint, options: ConnectorOptions) {
  const { logger, closing } = options
  // One TLS context per dsql(): building it (parsing the CA) per connection costs ~0.2 ms of CPU.
  const tlsOptions = { ...config.tls, secureContext: config.tls.secureContext ?? tls.createSecureContext(config.tls) }
  config = { ...config, tls: tlsOptions }
  let negotiation = config.sslnegotiation
  return async function socket(pg: PgSocketOptions): Promise<net.Socket | Duplex> {
    const deadline = Date.now() + config.connectTimeoutMs
    for (let attempt = 1; ; attempt++) {
      if (closing?.()) return failedSocket(new DsqlConnectionError('The pool is ending (sql.end()).', { retryable: false }))
      const started = Date.now()
      const current = { ...config, sslnegotiation: negotiation }
      try {
        const session = await establish(current, mint, pg, options, deadline)
        logger?.debug?.('dsql connection ready', { host: config.host, attempt, ms: Date.now() - started })
        if (closing?.()) {
          session.socket.destroy()
          return failedSocket(new DsqlConnectionError('The pool is ending (sql.end()): connection not used.', { retryable: false }))
        }
        // postgres.js hands a connection opened for sql.reserve()/sql.begin() over only on 'drain'
        // or after a setup query of its own (type fetch, session attributes).
        return handOver(session, current, logger, !pg.fetch_types && !pg.target_session_attrs)
      } catch (err) {
        const error = asDsqlError(err, config)
        if (error instanceof NoDirectTls && config.directFallback && current.sslnegotiation === 'direct') {
          // Servers before PostgreSQL 17 (and proxies) read a ClientHello as a broken startup packet.
          if (negotiation === 'direct') logger?.warn?.('dsql: the server does not speak direct TLS; using SSLRequest from now on', { host: config.host })
          negotiation = 'postgres'
          continue
        }
        const delay = backoffMs(attempt)
        if (!(error instanceof DsqlConnectionError && error.retryable) || Date.now() + delay >= deadline) {
          logger?.error?.('dsql connection failed', { host: config.host, attempt, code: error.code, message: error.message })
          return failedSocket(error)
        }
        logger?.warn?.('dsql connection attempt failed; retrying', { attempt, delayMs: delay, message: error.message })
        await new Promise((resolve) => setTimeout(resolve, delay))
      }
    }
  }
}

/** Full jitter over an exponential ceiling: 50 ms, 100 ms, ... capped at 2 s. */
function backoffMs(attempt: number): number {
  return Math.round(Math.random() * Math.min(2000, 50 * 2 ** (attempt - 1)))
}

interface Established {
  socket: tls.TLSSocket
  /** The server's startup answer (AuthenticationOk .. ReadyForQuery), replayed to postgres.js. */
  replay: Buffer
  /** SQL to run ahead of postgres.js's first query, or null. */
  pipelined: string | null
}

async function establish(config: DsqlConfig, mint: Mint, pg: PgSocketOptions, options: ConnectorOptions, deadline: number): Promise<Established> {
  // Signing overlaps the TCP and TLS handshakes; the token is sent only after the certificate verified.
  const token = mint()
  token.catch(() => undefined)
  const socket = await openTls(config, deadline)
  const reader = new Reader(socket, deadline, config)
  try {
    socket.write(wire.startupMessage(startupParams(pg)))
    const { replay, parameters } = await authenticate(reader, socket, token, config)
    const setSchema = config.schema === false ? null : `SET search_path = ${wire.quoteIdentifier(config.schema)}`
    if (!options.onconnect) {
      reader.detach()
      return { socket, replay, pipelined: setSchema }
    }
    const session: DsqlSession = { query: (sql) => reader.query(sql), parameters }
    if (setSchema) await session.query(setSchema)
    await reader.guard(Promise.resolve(options.onconnect(session))).catch((err: unknown) => {
      if (err instanceof DsqlError) throw err
      throw new DsqlConnectionError(`onconnect failed: ${err instanceof Error ? err.message : String(err)}`, { retryable: false, cause: err })
    })
    reader.detach()
    return { socket, replay, pipelined: null }
  } catch (err) {
    socket.destroy()
    throw err
  }
}

function startupParams(pg: PgSocketOptions): Record<string, string> {
  const params: Record<string, string> = { user: pg.user, database: pg.database, client_encoding: 'UTF8' }
  for (const [k, v] of Object.entries(pg.connection)) if (v !== undefined && v !== null && v !== false) params[k] = String(v)
  return params
}

async function authenticate(reader: Reader, socket: tls.TLSSocket, token: Promise<string>, config: DsqlConfig) {
  const replay: Buffer[] = []
  const parameters: Record<string, string> = {}
  for (;;) {
    const message = await reader.next()
    const type = String.fromCharCode(message[0])
    if (type === 'E') throw startupError(wire.errorFields(message), config)
    if (type === 'R') {
      const code = wire.authCode(message)
      if (code === 3) socket.write(wire.passwordMessage(await reader.guard(token)))
      else if (code !== 0) throw new DsqlConnectionError(`The server asked for authentication method ${code}; DSQL uses a cleartext IAM token.`, { retryable: false })
      else replay.push(message)
      continue
    }
    if (type === 'S') {
      const [name, value] = wire.parameterStatus(message)
      parameters[name] = value
    }
    replay.push(message)
    if (type === 'Z') return { replay: Buffer.concat(replay), parameters }
  }
}

/** DSQL's startup refusals, as typed errors that say what to do. */
function startupError(fields: Record<string, string>, config: DsqlConfig): DsqlError {
  const sqlstate = fields.C ?? ''
  const message = fields.M ?? 'unknown error'
  const hint = fields.H
  const said = `${message}${hint ? ` (${hint})` : ''}`
  if (sqlstate === '53400' || sqlstate === '53300' || /rate exceeded|too many connections|waking up|retry later/i.test(message))
    return new DsqlConnectionError(`DSQL refused the connection for now: ${said}.`, { sqlstate, retryable: true })
  if (/sni/i.test(message)) return new DsqlTlsError(`DSQL refused the connection: ${said}. The TLS server name must be the cluster endpoint.`)
  if (/access denied/i.test(message) || sqlstate === '28000' || sqlstate === '28P01')
    return new DsqlTokenError(`DSQL rejected the IAM token for user "${config.user}": ${said}. ${tokenAdvice(hint ?? message, config)}`, sqlstate, hint)
  return new DsqlConnectionError(`DSQL refused the connection: ${said} [${sqlstate}].`, { sqlstate, retryable: false })
}

function tokenAdvice(reason: string, config: DsqlConfig): string {
  if (/expired/i.test(reason)) return 'Check the system clock, and that tokenDurationSecs covers the time to connect.'
  if (/user to action/i.test(reason)) return `"admin" signs DbConnectAdmin and every other role DbConnect; check the user name.`
  return `Check that the credentials' IAM identity may ${config.action} on this cluster (IAM policy dsql:${config.action}, \`AWS IAM GRANT\` for non-admin roles) and that region ${config.region} is the cluster's.`
}

/** Reads backend messages during startup, with the connection's deadline. */
class Reader {
  private frames = new wire.Frames()
  private queue: Buffer[] = []
  private waiting: { resolve(m: Buffer): void; reject(e: Error): void } | null = null
  private failure: Error | null = null
  private timer: NodeJS.Timeout
  private queries: Promise<unknown> = Promise.resolve()
  /** Once a statement of the user's went out, a lost connection must not be retried. */
  private statementSent = false
  /** Rejects when the session fails or times out: every wait in `establish` races it. */
  readonly failed: Promise<never>
  private rejectFailed: (error: Error) => void = () => undefined

  constructor(
    private socket: tls.TLSSocket,
    deadline: number,
    private config: DsqlConfig,
  ) {
    this.failed = new Promise<never>((_, reject) => (this.rejectFailed = reject))
    this.failed.catch(() => undefined)
    socket.on('data', this.onData)
    socket.on('error', this.onError)
    socket.on('close', this.onClose)
    this.timer = setTimeout(() => {
      this.fail(new DsqlConnectionError(`Timed out after ${config.connectTimeoutMs / 1000}s opening a session on ${where(config)}.`, { retryable: true }))
      socket.destroy()
    }, Math.max(0, deadline - Date.now()))
  }

  next(): Promise<Buffer> {
    const message = this.queue.shift()
    if (message) return Promise.resolve(message)
    if (this.failure) return Promise.reject(this.failure)
    return new Promise((resolve, reject) => (this.waiting = { resolve, reject }))
  }

  /** Races `work` against the session failing or timing out. */
  guard<T>(work: Promise<T>): Promise<T> {
    return Promise.race([work, this.failed])
  }

  /** Simple-protocol query for `onconnect`, one at a time; rows as text. */
  query(sql: string): Promise<Record<string, string | null>[]> {
    const run = this.queries.then(() => this.run(sql))
    this.queries = run.catch(() => undefined)
    return this.guard(run)
  }

  private async run(sql: string): Promise<Record<string, string | null>[]> {
    this.statementSent = true
    this.socket.write(wire.queryMessage(sql))
    const rows: Record<string, string | null>[] = []
    let columns: string[] = []
    let error: DsqlError | null = null
    for (;;) {
      const message = await this.next()
      const type = String.fromCharCode(message[0])
      if (type === 'T') columns = wire.columnNames(message)
      else if (type === 'D') rows.push(Object.fromEntries(wire.rowValues(message).map((v, i) => [columns[i], v])))
      else if (type === 'E') error = sessionError(wire.errorFields(message), sql)
      else if (type === 'Z') {
        if (error) throw error
        return rows
      }
    }
  }

  /** Stops reading; the stream is paused so postgres.js receives every later byte. */
  detach(): void {
    clearTimeout(this.timer)
    this.socket.pause()
    this.socket.removeListener('data', this.onData)
    this.socket.removeListener('error', this.onError)
    this.socket.removeListener('close', this.onClose)
  }

  private onData = (chunk: Buffer) => {
    for (const message of this.frames.push(chunk)) {
      if (this.waiting) {
        const { resolve } = this.waiting
        this.waiting = null
        resolve(message)
      } else this.queue.push(message)
    }
  }

  private onError = (err: Error) =>
    this.fail(new DsqlConnectionError(`Connection to ${where(this.config)} failed during startup: ${err.message}.`, { retryable: !this.statementSent, cause: err }))

  private onClose = () => this.fail(new DsqlConnectionError(`DSQL closed the connection during startup.`, { retryable: !this.statementSent }))

  private fail(error: Error) {
    clearTimeout(this.timer)
    this.failure ??= error
    this.rejectFailed(this.failure)
    if (this.waiting) {
      const { reject } = this.waiting
      this.waiting = null
      reject(this.failure)
    }
  }

}

function sessionError(fields: Record<string, string>, sql: string): DsqlError {
  return new DsqlConnectionError(`onconnect query failed: ${fields.M ?? 'error'} [${fields.C ?? ''}] in: ${sql.slice(0, 200)}`, {
    sqlstate: fields.C,
    retryable: false,
  })
}

/** TCP to hostaddr, then TLS with SNI = host, verified; direct (ALPN) or after an SSLRequest. */
function openTls(config: DsqlConfig, deadline: number): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    let raw: net.Socket | undefined
    let secure: tls.TLSSocket | undefined
    const fail = (err: Error) => {
      clearTimeout(timer)
      raw?.destroy()
      secure?.destroy()
      reject(err)
    }
    const onSocketError = (err: Error) => fail(socketError(err, config))
    const timer = setTimeout(
      () => fail(new DsqlConnectionError(`Timed out after ${config.connectTimeoutMs / 1000}s connecting to ${where(config)}.`, { retryable: true })),
      Math.max(0, deadline - Date.now()),
    )
    const startTls = (socket?: net.Socket) => {
      const direct = !socket
      const target = socket ? { socket } : { host: config.hostaddr, port: config.port }
      const s = (secure = tls.connect({ ...config.tls, ALPNProtocols: ['postgresql'], ...target }))
      // Direct TLS that reached the server and then broke off suggests a server without it.
      let reached = false
      s.setNoDelay(true)
      s.once('connect', () => (reached = true))
      s.on('error', (err: NodeJS.ErrnoException) => fail(direct && reached && handshakeRefused(err) ? noDirectTls(config, err) : socketError(err, config)))
      s.once('close', () => (direct && reached ? fail(noDirectTls(config)) : onClose()))
      s.once('secureConnect', () => {
        if (direct && s.alpnProtocol !== 'postgresql') return fail(noDirectTls(config))
        clearTimeout(timer)
        s.removeAllListeners('error')
        s.removeAllListeners('close')
        resolve(s)
      })
    }
    const onClose = () => fail(new DsqlConnectionError(`${where(config)} closed the connection during the TLS handshake.`, { retryable: true }))
    if (config.sslnegotiation === 'direct') return startTls()

    const r = (raw = net.connect({ host: config.hostaddr, port: config.port, noDelay: true }))
    r.on('error', onSocketError)
    r.once('connect', () => r.write(wire.SSL_REQUEST))
    r.once('data', (answer: Buffer) => {
      if (answer.length !== 1 || answer[0] !== 0x53) return fail(new DsqlTlsError(`${where(config)} refused TLS after an SSLRequest; DSQL requires TLS.`))
      r.removeListener('error', onSocketError)
      startTls(r)
    })
  })
}

/** Direct TLS reached the server but it did not complete: the server may not speak it. */
class NoDirectTls extends DsqlTlsError {}

function noDirectTls(config: DsqlConfig, cause?: Error): NoDirectTls {
  return new NoDirectTls(`${where(config)} does not speak direct TLS (ALPN "postgresql"): use sslnegotiation: 'postgres'.`, cause)
}

/** A handshake the server broke off, as opposed to a certificate that did not verify. */
function handshakeRefused(err: NodeJS.ErrnoException): boolean {
  const code = err.code ?? ''
  return !/CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/.test(code) && (code === 'ECONNRESET' || code === 'EPROTO' || code.startsWith('ERR_SSL'))
}

const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'EAI_AGAIN'])

function socketError(err: NodeJS.ErrnoException, config: DsqlConfig): DsqlError {
  const code = err.code ?? ''
  if (NETWORK_CODES.has(code))
    return new DsqlConnectionError(`Cannot reach ${where(config)} (${code}): check host, port, hostaddr and the network path.`, { retryable: true, cause: err })
  if (code === 'ENOTFOUND')
    return new DsqlConnectionError(`Cannot resolve ${config.hostaddr} (ENOTFOUND): check the cluster endpoint, or set hostaddr.`, { retryable: false, cause: err })
  if (/CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/.test(code))
    return new DsqlTlsError(
      `The certificate of ${where(config)} did not verify (${code}): trust the issuing CA with sslrootcert (e.g. certs/AmazonRootCA1.pem) or NODE_EXTRA_CA_CERTS. No token was sent.`,
      err,
    )
  return new DsqlTlsError(`TLS with ${where(config)} failed (${code || err.message}). No token was sent.`, err)
}

function asDsqlError(err: unknown, config: DsqlConfig): DsqlError {
  if (err instanceof DsqlError) return err
  if (err instanceof Error) return socketError(err, config)
  return new DsqlConnectionError(String(err), { retryable: false })
}

function where(config: { host: string; hostaddr: string; port: number }): string {
  return config.hostaddr === config.host ? `${config.host}:${config.port}` : `${config.host} at ${config.hostaddr}:${config.port}`
}

/**
 * postgres.js writes its own StartupMessage first: answer it with the recorded startup reply.
 * When a schema is to be selected, its SET rides in front of postgres.js's first query (no extra
 * round trip) and its reply is removed from the stream. Then the socket is left untouched.
 * A CancelRequest instead goes out on a connection of its own, as the protocol wants.
 */
function handOver({ socket, replay, pipelined }: Established, config: DsqlConfig, logger: DsqlLogger | undefined, drain: boolean): net.Socket {
  const write = socket.write
  socket.on('error', () => undefined)
  const patched = socket as unknown as { write: (chunk: Buffer, ...rest: unknown[]) => boolean }
  patched.write = (chunk: Buffer, ...rest: unknown[]) => {
    const callback = rest.find((x): x is () => void => typeof x === 'function')
    if (wire.isCancelRequest(chunk)) {
      Reflect.deleteProperty(socket, 'write')
      sendCancel(chunk, socket, config)
    } else if (pipelined) {
      patched.write = (first: Buffer, ...more: unknown[]) => {
        Reflect.deleteProperty(socket, 'write')
        swallowReply(socket, logger)
        return (write as (chunk: Buffer, ...rest: unknown[]) => boolean).call(socket, Buffer.concat([wire.queryMessage(pipelined), first]), ...more)
      }
      replayStartup(socket, replay, drain)
    } else {
      Reflect.deleteProperty(socket, 'write')
      replayStartup(socket, replay, drain)
    }
    if (callback) process.nextTick(callback)
    return true
  }
  return socket
}

function replayStartup(socket: tls.TLSSocket, replay: Buffer, drain: boolean) {
  // Not synchronously: postgres.js is still inside its write call.
  process.nextTick(() => {
    socket.emit('data', replay)
    // A no-op when the first query already went out; hands over a connection opened for reserve().
    if (drain) socket.emit('drain')
    socket.resume()
  })
}

/** Removes the pipelined SET's reply (CommandComplete/Error .. ReadyForQuery) from what postgres.js reads. */
function swallowReply(socket: tls.TLSSocket, logger: DsqlLogger | undefined) {
  const frames = new wire.Frames()
  type Emit = (event: string | symbol, ...args: unknown[]) => boolean
  const emit = socket.emit as Emit
  const patched = socket as unknown as { emit: Emit }
  patched.emit = (event: string | symbol, ...args: unknown[]) => {
    if (event !== 'data') return emit.call(socket, event, ...args)
    const kept: Buffer[] = []
    const messages = frames.push(args[0] as Buffer)
    let done = false
    for (const message of messages) {
      const type = String.fromCharCode(message[0])
      if (done || !'CEIZ'.includes(type)) kept.push(message)
      else if (type === 'E') logger?.warn?.('dsql: selecting the schema failed', { message: wire.errorFields(message).M })
      else if (type === 'Z') done = true
    }
    if (done) {
      Reflect.deleteProperty(socket, 'emit')
      kept.push(frames.rest())
    }
    const out = Buffer.concat(kept)
    return out.length ? emit.call(socket, 'data', out) : true
  }
}

/** postgres.js opens a socket to cancel a query; the startup made for it is dropped. */
function sendCancel(request: Buffer, session: tls.TLSSocket, config: DsqlConfig) {
  session.write(wire.TERMINATE)
  openTls(config, Date.now() + config.connectTimeoutMs).then(
    (s) => {
      s.on('error', () => undefined)
      s.on('close', () => session.destroy())
      s.end(request)
    },
    (err: Error) => session.destroy(err),
  )
}

/**
 * A socket postgres.js can own that fails with `error`, so its pool slot is freed. It fails on
 * postgres.js's first write: failing before it would leave postgres.js's write buffer and timer
 * set, and the next connection of that slot would never send its startup message.
 */
function failedSocket(error: Error): Duplex {
  const socket: Duplex = new Duplex({
    read() {},
    write(_chunk, _encoding, callback) {
      callback()
      process.nextTick(() => socket.destroy(error))
    },
  })
  setTimeout(() => socket.destroy(error), 5000).unref()
  return socket
}
