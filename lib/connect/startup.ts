import type { Duplex } from 'node:stream'
import type { DsqlConfig, DsqlSession } from '../config'
import { DsqlConnectionError, DsqlError, DsqlTlsError, DsqlTokenError } from '../errors'
import * as wire from '../wire'
import { where } from './dial'

/** What postgres.js hands to its `socket` option; only the fields the connector reads. */
export interface PgSocketOptions {
  user: string
  database: string
  connection: Record<string, string | number | boolean>
  fetch_types: boolean
  target_session_attrs: string | null
}

export type OnConnect = (session: DsqlSession) => void | Promise<void>

export interface Started {
  /** The server's startup answer (AuthenticationOk .. ReadyForQuery), replayed to postgres.js. */
  replay: Buffer
  /** SQL to run ahead of postgres.js's first query, or null. */
  pipelined: string | null
}

/**
 * Runs a DSQL session's startup on a connected stream of any transport: StartupMessage, the IAM
 * token, then the schema and the onconnect hook. Leaves the stream paused right after the last
 * ReadyForQuery. The caller destroys the stream when this rejects.
 */
export async function startup(
  stream: Duplex,
  token: Promise<string>,
  pg: PgSocketOptions,
  config: DsqlConfig,
  onconnect: OnConnect | undefined,
  deadline: number,
): Promise<Started> {
  const reader = new Reader(stream, deadline, config)
  stream.write(wire.startupMessage(startupParams(pg)))
  const { replay, parameters } = await authenticate(reader, stream, token, config)
  const setSchema = config.schema === false ? null : `SET search_path = ${wire.quoteIdentifier(config.schema)}`
  if (!onconnect) {
    reader.detach()
    return { replay, pipelined: setSchema }
  }
  const session: DsqlSession = { query: (sql) => reader.query(sql), parameters }
  if (setSchema) await session.query(setSchema)
  await reader.guard(Promise.resolve(onconnect(session))).catch((err: unknown) => {
    if (err instanceof DsqlError) throw err
    throw new DsqlConnectionError(`onconnect failed: ${err instanceof Error ? err.message : String(err)}`, { retryable: false, cause: err })
  })
  reader.detach()
  return { replay, pipelined: null }
}

function startupParams(pg: PgSocketOptions): Record<string, string> {
  const params: Record<string, string> = { user: pg.user, database: pg.database, client_encoding: 'UTF8' }
  for (const [k, v] of Object.entries(pg.connection)) if (v !== undefined && v !== null && v !== false) params[k] = String(v)
  return params
}

async function authenticate(reader: Reader, stream: Duplex, token: Promise<string>, config: DsqlConfig) {
  const replay: Buffer[] = []
  const parameters: Record<string, string> = {}
  for (;;) {
    const message = await reader.next()
    const type = String.fromCharCode(message[0])
    if (type === 'E') throw startupError(wire.errorFields(message), config)
    if (type === 'R') {
      const code = wire.authCode(message)
      if (code === 3) stream.write(wire.passwordMessage(await reader.guard(token)))
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
  /** Rejects when the session fails or times out: every wait in `startup` races it. */
  readonly failed: Promise<never>
  private rejectFailed: (error: Error) => void = () => undefined

  constructor(
    private stream: Duplex,
    deadline: number,
    private config: DsqlConfig,
  ) {
    this.failed = new Promise<never>((_, reject) => (this.rejectFailed = reject))
    this.failed.catch(() => undefined)
    stream.on('data', this.onData)
    stream.on('error', this.onError)
    stream.on('close', this.onClose)
    this.timer = setTimeout(() => {
      this.fail(new DsqlConnectionError(`Timed out after ${config.connectTimeoutMs / 1000}s opening a session on ${where(config)}.`, { retryable: true }))
      stream.destroy()
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
      else if (type === 'Z') {
        if (error) throw error
        return rows
      }
    }
  }

  /** Stops reading; the stream is paused so postgres.js receives every later byte. */
  detach(): void {
    clearTimeout(this.timer)
    this.stream.pause()
    this.stream.removeListener('data', this.onData)
    this.stream.removeListener('error', this.onError)
    this.stream.removeListener('close', this.onClose)
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
