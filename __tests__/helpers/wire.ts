/**
 * A minimal PostgreSQL wire client for tests that need to see the protocol itself: which
 * negotiation is used, whether SNI and ALPN are sent, the exact ErrorResponse fields (SQLSTATE,
 * message, hint) the server answers with, and cancel requests on a separate connection.
 */
import * as net from 'node:net'
import * as tls from 'node:tls'

export interface PgErrorFields {
  severity: string
  code: string
  message: string
  hint?: string
  detail?: string
}

/** An ErrorResponse from the server, with its fields. */
export class PgServerError extends Error {
  constructor(readonly fields: PgErrorFields) {
    super(`${fields.severity} ${fields.code} ${fields.message}${fields.hint ? ` (HINT: ${fields.hint})` : ''}`)
  }
}

export interface WireOptions {
  port: number
  /** SNI; null sends none. */
  servername: string | null
  ca: string
  /** 'direct': TLS first (PostgreSQL 17 style); 'sslrequest': SSLRequest, then TLS. Default 'direct'. */
  negotiation?: 'direct' | 'sslrequest'
  /** ALPN protocols offered; default ['postgresql'], [] offers none. */
  alpn?: string[]
  /** Check that the certificate names the server (default true); the chain is always verified. */
  verifyHost?: boolean
  user: string
  database?: string
  password?: string
  params?: Record<string, string>
}

export interface QueryResult {
  columns: string[]
  rows: (string | null)[][]
}

/** One statement's answer: its CommandComplete tag, columns (with type OIDs) and rows as text. */
export interface StatementResult {
  tag?: string
  columns: string[]
  types: number[]
  rows: (string | null)[][]
}

/** Everything a request was answered with up to ReadyForQuery. */
export interface Exchange {
  /** One per completed statement, in order (a failed one has none). */
  results: StatementResult[]
  error?: PgErrorFields
  /** ReadyForQuery's transaction status: I, T or E. */
  status: string
  /** Message types received, in order (e.g. '1', '2', 'T', 'D', 'C', 'Z'). */
  types: string[]
}

interface Message {
  type: string
  body: Buffer
}

const PROTOCOL_3 = 196608
const SSL_REQUEST = int32s(8, 80877103)
const SYNC = Buffer.from([0x53, 0, 0, 0, 4])

/** Whole backend messages from a stream, one at a time. */
class MessageReader {
  private buffer = Buffer.alloc(0)
  private failure: Error | undefined
  private wake: (() => void) | undefined

  constructor(stream: net.Socket) {
    stream.on('data', (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk])
      this.wake?.()
    })
    stream.on('error', (err) => this.fail(err))
    stream.on('close', () => this.fail(new Error('connection closed')))
  }

  async next(): Promise<Message> {
    for (;;) {
      if (this.buffer.length >= 5) {
        const end = this.buffer.readUInt32BE(1) + 1
        if (this.buffer.length >= end) {
          const message = { type: String.fromCharCode(this.buffer[0]), body: this.buffer.subarray(5, end) }
          this.buffer = this.buffer.subarray(end)
          return message
        }
      }
      if (this.failure) throw this.failure
      await new Promise<void>((resolve) => (this.wake = resolve))
    }
  }

  private fail(err: Error): void {
    this.failure ??= err
    this.wake?.()
  }
}

export class WireClient {
  readonly parameters: Record<string, string> = {}
  backendKey: { pid: number; secret: number } | undefined
  /** Resolves when the connection closes, for whatever reason. */
  readonly closed: Promise<void>

  private constructor(
    private readonly socket: tls.TLSSocket,
    private readonly reader: MessageReader,
    private readonly options: WireOptions,
  ) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()))
  }

  /** Connects and authenticates; an ErrorResponse rejects with PgServerError. */
  static async connect(options: WireOptions): Promise<WireClient> {
    const socket = await secureSocket(options)
    const reader = new MessageReader(socket)
    const client = new WireClient(socket, reader, options)
    try {
      socket.write(startupMessage({ user: options.user, database: options.database ?? 'postgres', ...options.params }))
      await client.startup()
      return client
    } catch (err) {
      socket.destroy()
      throw err
    }
  }

  /** A simple query; an ErrorResponse rejects with PgServerError once the server is ready again. */
  async query(sql: string): Promise<QueryResult> {
    this.socket.write(typed('Q', Buffer.from(sql + '\0')))
    const result: QueryResult = { columns: [], rows: [] }
    let error: PgServerError | undefined
    for (;;) {
      const { type, body } = await this.reader.next()
      if (type === 'T') result.columns = columnNames(body)
      else if (type === 'D') result.rows.push(rowValues(body))
      else if (type === 'E') error = new PgServerError(errorFields(body))
      else if (type === 'Z') {
        if (error) throw error
        return result
      }
    }
  }

  /** A simple query, answered statement by statement (errors are returned, not thrown). */
  async simple(sql: string): Promise<Exchange> {
    this.socket.write(typed('Q', Buffer.from(sql + '\0')))
    return this.exchange()
  }

  /**
   * One statement through the extended protocol, as pgx and most drivers do it: Parse and
   * Describe, Sync (errors here are the statement's refusal), then Bind, Execute, Sync.
   */
  async extended(sql: string): Promise<Exchange> {
    this.send(this.parse('', sql), typed('D', Buffer.from('S\0')), SYNC)
    const prepared = await this.exchange()
    if (prepared.error) return prepared
    this.send(this.bind('', ''), typed('D', Buffer.from('P\0')), typed('E', Buffer.concat([Buffer.from('\0'), int32s(0)])), SYNC)
    const executed = await this.exchange()
    return { ...executed, types: [...prepared.types, ...executed.types] }
  }

  /** Raw messages as given (e.g. a pipeline of several statements), answered up to the next ReadyForQuery. */
  async pipeline(...messages: Buffer[]): Promise<Exchange> {
    this.send(...messages)
    return this.exchange()
  }

  parse(name: string, sql: string): Buffer {
    return typed('P', Buffer.concat([Buffer.from(`${name}\0${sql}\0`), Buffer.alloc(2)]))
  }

  bind(portal: string, statement: string): Buffer {
    return typed('B', Buffer.concat([Buffer.from(`${portal}\0${statement}\0`), Buffer.alloc(6)]))
  }

  execute(portal = ''): Buffer {
    return typed('E', Buffer.concat([Buffer.from(`${portal}\0`), int32s(0)]))
  }

  readonly sync: Buffer = SYNC

  private send(...messages: Buffer[]): void {
    this.socket.write(Buffer.concat(messages))
  }

  private async exchange(): Promise<Exchange> {
    const results: StatementResult[] = []
    const types: string[] = []
    let current: StatementResult = { columns: [], types: [], rows: [] }
    let error: PgErrorFields | undefined
    for (;;) {
      const { type, body } = await this.reader.next()
      types.push(type)
      if (type === 'T') {
        current.columns = columnNames(body)
        current.types = columnTypes(body)
      } else if (type === 'D') current.rows.push(rowValues(body))
      else if (type === 'C' || type === 'I') {
        results.push({ ...current, tag: type === 'C' ? body.toString('utf8', 0, body.length - 1) : undefined })
        current = { columns: [], types: [], rows: [] }
      } else if (type === 'E') error ??= errorFields(body)
      else if (type === 'Z') return { results, error, status: String.fromCharCode(body[0]), types }
    }
  }

  /** Sends a CancelRequest for this session on a new connection, as libpq does. */
  async cancel(): Promise<void> {
    if (!this.backendKey) throw new Error('no BackendKeyData received')
    const socket = await secureSocket(this.options)
    socket.end(int32s(16, 80877102, this.backendKey.pid, this.backendKey.secret))
    await new Promise((resolve) => socket.once('close', resolve))
  }

  async close(): Promise<void> {
    if (!this.socket.destroyed) this.socket.end(typed('X', Buffer.alloc(0)))
    await this.closed
  }

  destroy(): void {
    this.socket.destroy()
  }

  private async startup(): Promise<void> {
    for (;;) {
      const { type, body } = await this.reader.next()
      if (type === 'E') throw new PgServerError(errorFields(body))
      if (type === 'R') {
        const code = body.readUInt32BE(0)
        if (code === 3) this.socket.write(typed('p', Buffer.from((this.options.password ?? '') + '\0')))
        else if (code !== 0) throw new Error(`unexpected authentication request ${code}`)
      } else if (type === 'S') {
        const [name, value] = body.toString('utf8').split('\0')
        this.parameters[name] = value
      } else if (type === 'K') this.backendKey = { pid: body.readUInt32BE(0), secret: body.readUInt32BE(4) }
      else if (type === 'Z') return
    }
  }
}

/** TCP to 127.0.0.1, then TLS as asked, verifying the certificate against `ca`. */
export async function secureSocket(options: WireOptions): Promise<tls.TLSSocket> {
  const raw = net.connect(options.port, '127.0.0.1')
  await new Promise<void>((resolve, reject) => raw.once('connect', resolve).once('error', reject))
  if (options.negotiation === 'sslrequest') {
    raw.write(SSL_REQUEST)
    const answer = await new Promise<Buffer>((resolve, reject) => raw.once('data', resolve).once('error', reject).once('close', () => reject(new Error('connection closed'))))
    if (answer.toString() !== 'S') throw new Error(`SSLRequest answered ${JSON.stringify(answer.toString())}`)
  }
  const alpn = options.alpn ?? ['postgresql']
  const socket = tls.connect({
    socket: raw,
    // host only names the certificate check when no SNI is sent: the IP in the certificate.
    host: '127.0.0.1',
    ...(options.servername === null ? {} : { servername: options.servername }),
    ca: options.ca,
    ...(alpn.length ? { ALPNProtocols: alpn } : {}),
    ...(options.verifyHost === false ? { checkServerIdentity: () => undefined } : {}),
  })
  await new Promise<void>((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject).once('close', () => reject(new Error('connection closed'))))
  return socket
}

/** Sends a StartupMessage without any TLS and returns the first message's error fields. */
export async function plaintextStartup(port: number, params: Record<string, string>): Promise<PgErrorFields> {
  const socket = net.connect(port, '127.0.0.1')
  const reader = new MessageReader(socket)
  try {
    socket.write(startupMessage(params))
    const { type, body } = await reader.next()
    if (type !== 'E') throw new Error(`expected an ErrorResponse, got ${type}`)
    return errorFields(body)
  } finally {
    socket.destroy()
  }
}

export function startupMessage(params: Record<string, string>): Buffer {
  const body = Buffer.from(
    Object.entries(params)
      .map(([k, v]) => `${k}\0${v}\0`)
      .join('') + '\0',
  )
  return Buffer.concat([int32s(8 + body.length, PROTOCOL_3), body])
}

function errorFields(body: Buffer): PgErrorFields {
  const fields: Record<string, string> = {}
  let i = 0
  while (i < body.length && body[i] !== 0) {
    const end = body.indexOf(0, i + 1)
    fields[String.fromCharCode(body[i])] = body.toString('utf8', i + 1, end)
    i = end + 1
  }
  return { severity: fields.S, code: fields.C, message: fields.M, hint: fields.H, detail: fields.D }
}

function columnNames(body: Buffer): string[] {
  const names: string[] = []
  let i = 2
  for (let n = body.readUInt16BE(0); n > 0; n--) {
    const end = body.indexOf(0, i)
    names.push(body.toString('utf8', i, end))
    i = end + 1 + 18
  }
  return names
}

function columnTypes(body: Buffer): number[] {
  const types: number[] = []
  let i = 2
  for (let n = body.readUInt16BE(0); n > 0; n--) {
    const end = body.indexOf(0, i)
    types.push(body.readUInt32BE(end + 1 + 6))
    i = end + 1 + 18
  }
  return types
}

function rowValues(body: Buffer): (string | null)[] {
  const values: (string | null)[] = []
  let i = 2
  for (let n = body.readUInt16BE(0); n > 0; n--) {
    const length = body.readInt32BE(i)
    i += 4
    values.push(length < 0 ? null : body.toString('utf8', i, i + length))
    if (length > 0) i += length
  }
  return values
}

function typed(type: string, body: Buffer): Buffer {
  const header = Buffer.alloc(5)
  header.write(type, 0, 'latin1')
  header.writeUInt32BE(4 + body.length, 1)
  return Buffer.concat([header, body])
}

function int32s(...values: number[]): Buffer {
  const buffer = Buffer.alloc(values.length * 4)
  values.forEach((v, i) => buffer.writeUInt32BE(v >>> 0, i * 4))
  return buffer
}
