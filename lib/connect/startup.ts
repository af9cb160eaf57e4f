import type { Duplex } from 'node:stream'
import type { DsqlConfig, DsqlSession } from '../config'
import { DsqlConnectionError, DsqlError, DsqlTlsError, DsqlTokenError } from '../errors'
import * as wire from '../wire'
import { timedOut, where } from './dial'

/** What postgres.js hands to its `socket` option; only the fields the connector reads. */
export interface PgSocketOptions {
  user: string
  database: string
  connection: Record<string, string | number | boolean>
  fetch_types: boolean
  target_session_attrs: string | null
}

export type OnConnect = (session: DsqlSession) => void | Promise<void>

/**
 * The server refused the StartupMessage once it carried `options=-c search_path=...` (a proxy
 * that knows no `options`): the connector selects the schema with a SET from then on.
 */
export class SchemaOptionRefused extends DsqlConnectionError {}

/**
 * A connection that sent the token unasked (see `sendsTokenEarly`) did not go as a cleartext
 * exchange: the server asked for another method, refused, closed, or did not answer. The caller
 * opens a new connection at once that waits for the server's request, as every driver does.
 */
export class EarlyTokenRefused extends DsqlConnectionError {
  /** The endpoint's first such failure (since one took the token unasked): the one worth a warning. */
  first = false
}

/**
 * What connections learned about each endpoint (address, server name, port, transport, user):
 * whether the server asked for a cleartext password last time, and how many connections in a row
 * that sent it the token unasked failed. Process-wide, so that a new client (a new dsql(), a Lambda
 * invocation) gains too; bounded.
 */
const endpoints = new Map<string, { cleartext: boolean; failures: number }>()
const MAX_KNOWN = 1000
export const MAX_EARLY_FAILURES = 2
/** With the token sent unasked and the request received, silence this long (at most half the time left) means the token was lost. */
const EARLY_ANSWER_MS = 10_000

const endpointKey = (config: DsqlConfig, user: string) => [config.hostaddr, config.port, config.host, config.transport, user].join('\0')

/**
 * Whether a connection sends the token with the StartupMessage, before the server asks for it
 * (one round trip less). DSQL always asks for a cleartext token: so an endpoint whose name is a
 * DSQL cluster's (its certificate verified before anything is sent) gets it from the first
 * connection, and any other endpoint once it asked for a cleartext password. Never after two
 * such connections failed in a row, or when the last one asked for something else.
 */
export function sendsTokenEarly(config: DsqlConfig, user: string): boolean {
  const known = endpoints.get(endpointKey(config, user))
  if (known) return known.cleartext && known.failures < MAX_EARLY_FAILURES
  return config.clusterId !== undefined
}

/** Records what a connection to the endpoint learned: the method the server asked for, or an unasked token's failure. Returns the failures so far. */
export function learnAuth(config: DsqlConfig, user: string, outcome: 'cleartext' | 'early token taken' | 'other' | 'early token failed'): number {
  const key = endpointKey(config, user)
  const known = endpoints.get(key) ?? { cleartext: false, failures: 0 }
  known.cleartext = outcome === 'cleartext' || outcome === 'early token taken'
  if (outcome === 'early token failed') known.failures++
  // Failures in a row: a server that took the token unasked again had closed for other reasons (a deploy, the network).
  if (outcome === 'early token taken') known.failures = 0
  endpoints.delete(key)
  endpoints.set(key, known)
  if (endpoints.size > MAX_KNOWN) endpoints.delete(endpoints.keys().next().value as string)
  return known.failures
}

/** Tests: every endpoint is new again. */
export function forgetEndpoints(): void {
  endpoints.clear()
}

/**
 * Flush: asks nothing, and is answered with nothing; it only carries TCP's ACK. A server that
 * leaves Nagle on holds a small write while its previous one is unacknowledged, and a client that
 * has nothing to send acknowledges late (Linux: a delayed ACK, 40 ms or more, plus its way back).
 * During startup the server writes more than once per client message: TLS 1.3 session tickets
 * before the password request, the request before the authentication answer (an early token),
 * AuthenticationOk before the rest (PostgreSQL flushes it alone). Once the token is sent, each
 * such arrival is answered with a Flush, so that the next write leaves at once.
 */
const FLUSH = Buffer.from([0x48, 0, 0, 0, 4])

export interface Started {
  /**
   * What postgres.js is to read first, as if from a fresh server: the startup answer
   * (AuthenticationOk .. ReadyForQuery), with the ParameterStatus messages of the hook's queries
   * before its ReadyForQuery.
   */
  replay: Buffer
  /** Bytes already read after the last ReadyForQuery (perhaps part of a message): postgres.js's next. */
  rest: Buffer
  /** SQL to run ahead of postgres.js's first query, or null. */
  pipelined: string | null
}

/**
 * Runs a DSQL session's startup on a connected stream of any transport: StartupMessage, the IAM
 * token, then the schema and the onconnect hook. Leaves the stream paused with no listener of
 * its own. The caller destroys the stream when this rejects.
 */
export async function startup(
  stream: Duplex,
  token: Promise<string>,
  pg: PgSocketOptions,
  config: DsqlConfig,
  onconnect: OnConnect | undefined,
  deadline: number,
  schemaInStartup = true,
): Promise<Started> {
  const reader = new Reader(stream, deadline, config)
  // In the StartupMessage the schema costs nothing: a SET would add a reply that, split from the
  // first query's, waits on a delayed ACK at a server that leaves Nagle on.
  const inStartup = schemaInStartup && config.schema !== false
  const early = sendsTokenEarly(config, pg.user)
  try {
    const startupMessage = wire.startupMessage(startupParams(pg, inStartup ? config.schema : false))
    if (!early) stream.write(startupMessage)
    else {
      // One write: the token leaves with the StartupMessage, in one TLS record and TCP segment.
      stream.write(Buffer.concat([startupMessage, wire.passwordMessage(await reader.guard(token))]))
      reader.ackArrivals()
    }
    const { replay, parameters, askedCleartext } = await authenticate(reader, stream, token, config, inStartup, early, deadline).catch((err: unknown) => {
      if (!early || notTheEarlyToken(err) || err instanceof SchemaOptionRefused) throw err
      // Whatever else went wrong, it may be the unasked token: the next connection waits to be asked.
      const failures = learnAuth(config, pg.user, 'early token failed')
      if (err instanceof DsqlConnectionError && err.code === 'CONNECT_TIMEOUT') throw err
      const said = err instanceof Error ? err.message : String(err)
      throw earlyTokenRefused(`${where(config)} did not take the IAM token sent with the startup message (${said}); trying again, waiting to be asked.`, failures, err)
    })
    if (early && !askedCleartext) {
      // The session opened without asking (trust): the token is still unread in its input, and
      // the server would read it as the first message of the session and fail it.
      const failures = learnAuth(config, pg.user, 'early token failed')
      throw earlyTokenRefused(`${where(config)} opened the session without asking for the IAM token sent with the startup message; trying again, waiting to be asked.`, failures)
    }
    learnAuth(config, pg.user, !askedCleartext ? 'other' : early ? 'early token taken' : 'cleartext')
    const setSchema = config.schema === false || inStartup ? null : `SET search_path = ${wire.quoteIdentifier(config.schema)}`
    if (!onconnect) return { replay, rest: reader.detach(), pipelined: setSchema }
    const session: DsqlSession = { query: (sql) => reader.query(sql), parameters }
    if (setSchema) await session.query(setSchema)
    // Called inside the promise chain: a hook that throws synchronously is reported like one that rejects.
    await reader.guard(Promise.resolve().then(() => onconnect(session))).catch((err: unknown) => {
      if (err instanceof DsqlError) throw err
      throw new DsqlConnectionError(`onconnect failed: ${err instanceof Error ? err.message : String(err)}`, { retryable: false, cause: err })
    })
    // Queries the hook started without awaiting them are answered before postgres.js gets the stream.
    await reader.settled()
    const ready = replay.subarray(replay.length - READY_LENGTH)
    return { replay: Buffer.concat([replay.subarray(0, replay.length - READY_LENGTH), ...reader.reported, ready]), rest: reader.detach(), pipelined: null }
  } finally {
    reader.detach()
  }
}

function earlyTokenRefused(message: string, failures: number, cause?: unknown): EarlyTokenRefused {
  const error = new EarlyTokenRefused(message, { retryable: false, cause })
  error.first = failures === 1
  return error
}

/**
 * Refusals that have nothing to do with when the token was sent, which a new connection would
 * meet again: the token's own, TLS, and a server's answer that it understood the request: for
 * now (a quota, a cluster waking up: retried with backoff, not at once), or naming what it
 * refuses with a SQLSTATE outside class 08 (a database, a setting). What an unexpected message
 * earns is a protocol violation (08P01), a close, or silence: those count against the endpoint.
 * Counted wrongly, one client's bad database would stop every client of that user sending the
 * token unasked, and would open each of its own failing connections twice.
 */
function notTheEarlyToken(err: unknown): boolean {
  if (err instanceof DsqlTokenError || err instanceof DsqlTlsError) return true
  if (!(err instanceof DsqlConnectionError) || !err.sqlstate) return false
  return err.retryable || !err.sqlstate.startsWith('08')
}

/** ReadyForQuery: 'Z', int32 5, status byte. */
const READY_LENGTH = 6

/**
 * A startup parameter only postgres.js sees, never sent: it makes postgres.js's StartupMessage
 * at least 1,024 bytes, which postgres.js writes at once instead of on a setImmediate. postgres.js
 * 3.4.9's close handler cancels a pending write without forgetting it, and then every later
 * write of that connection waits on the cancelled timer: the slot's next connection would never
 * send its StartupMessage and would hang until connect_timeout. A write of 1,024 bytes or more
 * goes out at once, stale bytes first (the stream ignores what precedes the StartupMessage).
 */
export const FLUSH_PARAMETER = 'postgres-dsql.flush'
export const FLUSH_VALUE = 'never sent: lets postgres.js write its startup at once'.padEnd(1024, '.')

function startupParams(pg: PgSocketOptions, schema: string | false): Record<string, string> {
  const params: Record<string, string> = { user: pg.user, database: pg.database, client_encoding: 'UTF8' }
  for (const [k, v] of Object.entries(pg.connection))
    if (v !== undefined && v !== null && v !== false && k !== FLUSH_PARAMETER) params[k] = String(v)
  if (schema === false) return params
  // The schema wins over the user's own search_path, as the SET after the startup did: after
  // their options (the later -c wins), and without a search_path parameter (it would beat options).
  delete params.search_path
  params.options = [params.options, `-c search_path=${escapeOption(wire.quoteIdentifier(schema))}`].filter(Boolean).join(' ')
  return params
}

/** The server splits `options` at whitespace; a backslash keeps the next character. */
const escapeOption = (value: string) => value.replace(/[\\\s]/g, (c) => `\\${c}`)

/** Refusals that may be about `options` (not the token, not a quota): worth a try with a SET instead. */
const OPTION_REFUSAL = /option|search_path|parameter|setting/i

async function authenticate(reader: Reader, stream: Duplex, token: Promise<string>, config: DsqlConfig, sentOptions: boolean, sentToken: boolean, deadline: number) {
  const replay: Buffer[] = []
  const parameters: Record<string, string> = {}
  let askedCleartext = false
  /** How long to wait for each answer after the request, once the token went unasked. */
  let silenceMs: number | undefined
  for (;;) {
    // Asked after the token went unasked: a server that dropped it would wait for it forever.
    const message = await reader.next(silenceMs)
    const type = String.fromCharCode(message[0])
    if (type === 'E') {
      const fields = wire.errorFields(message)
      const error = startupError(fields, config)
      if (sentOptions && error.constructor === DsqlConnectionError && !(error as DsqlConnectionError).retryable && OPTION_REFUSAL.test(`${fields.M} ${fields.D ?? ''}`))
        throw new SchemaOptionRefused(`${where(config)} refused the schema in the startup message (${fields.M}); selecting it with SET instead.`, { retryable: false, sqlstate: fields.C })
      throw error
    }
    if (type === 'R') {
      const code = wire.authCode(message)
      if (code === 3) {
        askedCleartext = true
        // Half the time left at most, so that the connection opened again, waiting, has the rest:
        // else a connect_timeout under 10 s would fail the query instead.
        if (sentToken) silenceMs = Math.min(EARLY_ANSWER_MS, Math.max(0, Math.floor((deadline - Date.now()) / 2)))
        // Waiting to be asked is the fallback for a server that did not take the unasked token and
        // its Flushes: it sends neither, only what every driver sends.
        if (!sentToken) stream.write(wire.passwordMessage(await reader.guard(token)))
      } else if (code !== 0) throw new DsqlConnectionError(`The server asked for authentication method ${code}; DSQL uses a cleartext IAM token.`, { retryable: false })
      else replay.push(message)
      continue
    }
    if (type === 'S') {
      const [name, value] = wire.parameterStatus(message)
      parameters[name] = value
    }
    replay.push(message)
    if (type === 'Z') return { replay: Buffer.concat(replay), parameters, askedCleartext }
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
  /** ParameterStatus and NoticeResponse messages the hook's queries brought: postgres.js is to see them too. */
  readonly reported: Buffer[] = []
  private detached = false
  /** Rejects when the session fails or times out: every wait in `startup` races it. */
  readonly failed: Promise<never>
  private rejectFailed: (error: Error) => void = () => undefined

  /** Flushes answer what arrives (see FLUSH): 'on' from the token to the startup's ReadyForQuery. */
  private acking: 'off' | 'on' | 'done' = 'off'
  private ackScheduled = false

  constructor(
    private stream: Duplex,
    deadline: number,
    private config: DsqlConfig,
  ) {
    this.failed = new Promise<never>((_, reject) => (this.rejectFailed = reject))
    this.failed.catch(() => undefined)
    stream.on('data', this.onData)
    // TLS 1.3 session tickets arrive without data: a TLSSocket says so with 'session'.
    stream.on('session', this.ack)
    stream.on('error', this.onError)
    stream.on('close', this.onClose)
    this.timer = setTimeout(() => {
      this.fail(timedOut(config, 'opening a session on'))
      stream.destroy()
    }, Math.max(0, deadline - Date.now()))
  }

  /** The next message; with `withinMs`, a rejection if none comes that soon. */
  next(withinMs?: number): Promise<Buffer> {
    const message = this.queue.shift()
    if (message) return Promise.resolve(message)
    if (this.failure) return Promise.reject(this.failure)
    const next = new Promise<Buffer>((resolve, reject) => (this.waiting = { resolve, reject }))
    if (withinMs === undefined) return next
    let timer: NodeJS.Timeout | undefined
    const silence = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new DsqlConnectionError(`no answer ${(withinMs / 1000).toFixed(1)}s after the password request`, { retryable: true })), withinMs)
    })
    return Promise.race([next, silence]).finally(() => clearTimeout(timer))
  }

  /** Races `work` against the session failing or timing out. */
  guard<T>(work: Promise<T>): Promise<T> {
    return Promise.race([work, this.failed])
  }

  /** Simple-protocol query for `onconnect`, one at a time; rows as text. */
  query(sql: string): Promise<Record<string, string | null>[]> {
    if (this.detached) return Promise.reject(new DsqlConnectionError('onconnect query after the hook returned: its session ended when the hook resolved; await every query in onconnect.', { retryable: false }))
    const run = this.queries.then(() => this.run(sql))
    this.queries = run.catch(() => undefined)
    return this.guard(run)
  }

  /** Resolves once every query issued so far (and any issued meanwhile) is answered. */
  async settled(): Promise<void> {
    for (let tail = this.queries; ; tail = this.queries) {
      await this.guard(tail)
      if (tail === this.queries) return
    }
  }

  private async run(sql: string): Promise<Record<string, string | null>[]> {
    this.statementSent = true
    this.stream.write(wire.queryMessage(sql))
    const rows: Record<string, string | null>[] = []
    let columns: string[] = []
    let error: DsqlError | null = null
    for (;;) {
      const message = await this.next()
      const type = String.fromCharCode(message[0])
      if (type === 'T') columns = wire.columnNames(message)
      else if (type === 'D') rows.push(Object.fromEntries(wire.rowValues(message).map((v, i) => [columns[i], v])))
      else if (type === 'E') error = sessionError(wire.errorFields(message), sql)
      // postgres.js sees these as if it had run the queries: parameters and notices (a notice sent
      // right after startup is read here too, and must reach onnotice as it does without a hook).
      else if (type === 'S' || type === 'N') this.reported.push(message)
      else if (type === 'Z') {
        if (error) throw error
        return rows
      }
    }
  }

  /** The token is sent: from now until ReadyForQuery, every arrival is answered with a Flush. */
  ackArrivals(): void {
    if (this.acking === 'off') this.acking = 'on'
  }

  // A tick later: 'session' is emitted inside OpenSSL's read of the ticket, and a write from there
  // breaks the record sequence (the server fails with bad_record_mac). Arrivals of one tick are
  // answered once, and not at all when they completed the startup.
  private ack = () => {
    if (this.acking !== 'on' || this.ackScheduled) return
    this.ackScheduled = true
    setImmediate(() => {
      this.ackScheduled = false
      if (this.acking === 'on' && !this.detached && !this.stream.destroyed) this.stream.write(FLUSH)
    })
  }

  /** Stops reading (idempotent); returns the bytes read but not consumed, in order. */
  detach(): Buffer {
    if (this.detached) return Buffer.alloc(0)
    this.detached = true
    clearTimeout(this.timer)
    this.stream.pause()
    this.stream.removeListener('data', this.onData)
    this.stream.removeListener('session', this.ack)
    this.stream.removeListener('error', this.onError)
    this.stream.removeListener('close', this.onClose)
    const rest = Buffer.concat([...this.queue, this.frames.rest()])
    this.queue = []
    return rest
  }

  private onData = (chunk: Buffer) => {
    for (const message of this.frames.push(chunk)) {
      if (message[0] === 0x5a) this.acking = 'done'
      if (this.waiting) {
        const { resolve } = this.waiting
        this.waiting = null
        resolve(message)
      } else this.queue.push(message)
    }
    this.ack()
  }

  private onError = (err: Error) =>
    this.fail(new DsqlConnectionError(`Connection to ${where(this.config)} failed during startup: ${err.message}.`, { retryable: !this.statementSent, cause: err }))

  private onClose = () =>
    this.fail(new DsqlConnectionError(`${where(this.config)} closed the connection during startup.`, { retryable: !this.statementSent, code: 'CONNECTION_CLOSED' }))

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
