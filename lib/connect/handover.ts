import { Duplex } from 'node:stream'
import type { DsqlLogger } from '../config'
import { DsqlConnectionError, DsqlError } from '../errors'
import * as wire from '../wire'

/** An open DSQL session, ready to be handed to postgres.js. */
export interface Session {
  /** The transport, paused, with nothing else reading it. */
  stream: Duplex
  /** What postgres.js reads first: the startup answer. */
  replay: Buffer
  /** Bytes already read after it, perhaps part of a message: they follow, in order. */
  rest: Buffer
  /** SQL to run ahead of postgres.js's first query (its reply is removed), or null. */
  pipelined: string | null
  /** Emit 'drain' after the replay: postgres.js hands a connection opened for reserve()/begin() over only then. */
  drain: boolean
}

export interface Opener {
  /** Opens the session this stream stands for (retries included); rejects with a typed error. */
  open(signal: AbortSignal): Promise<Session>
  /** Sends a CancelRequest on a connection of its own; never rejects (failures are logged). */
  cancel(request: Buffer): Promise<void>
  /** True once sql.end() was called. */
  ending(): boolean
  logger?: DsqlLogger
  where: string
}

type State = 'new' | 'opening' | 'open' | 'failed' | 'done'

/** ReadyForQuery, idle: after a failed open while the pool ends, it makes postgres.js terminate the connection. */
const READY_IDLE = Buffer.from([0x5a, 0, 0, 0, 5, 0x49])
const TERMINATE = 0x58

/**
 * The stream postgres.js owns for one connection. Nothing is opened until postgres.js's first
 * write says what it is for: a StartupMessage opens a DSQL session (answered with the recorded
 * startup reply), a CancelRequest goes out on a bare TLS connection (no token, no startup, no
 * pool slot). Then bytes pass through both ways, in order.
 *
 * How postgres.js learns of a failure matters (postgres.js 3.4.9, issues 1208/1133/1154): on
 * 'close' it drops its socket and a query written after that (a transaction's ROLLBACK) crashes
 * the process in nextWrite, or stays queued for the slot's next connection. So a lost session
 * is reported as 'error' first (queries fail, ROLLBACKs are written here and swallowed) and as
 * 'close' only a moment later, which fails whatever was written meanwhile.
 */
export class Handover extends Duplex {
  private state: State = 'new'
  private transport: Duplex | null = null
  private readonly abort = new AbortController()
  /** The pipelined SET's reply is being removed from what postgres.js reads. */
  private stripping: wire.Frames | null = null
  private pipelined: string | null = null
  private keepAlive: [boolean, number] | null = null
  private ended = false

  constructor(private readonly opener: Opener) {
    super({ allowHalfOpen: false })
    // Errors reach postgres.js through emitError (when it still listens); never unhandled here.
    this.on('error', () => undefined)
  }

  /** postgres.js ends a socket only when it is 'open'. */
  get readyState(): string {
    return this.destroyed ? 'closed' : 'open'
  }

  setKeepAlive(enable = false, delay = 0): this {
    this.keepAlive = [enable, delay]
    const socket = this.transport as unknown as { setKeepAlive?: (e: boolean, d: number) => void } | null
    socket?.setKeepAlive?.(enable, delay)
    return this
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    switch (this.state) {
      case 'new':
        callback()
        return wire.isCancelRequest(chunk) ? this.cancel(chunk) : this.open()
      case 'open':
        return this.send(chunk, callback)
      case 'failed':
        callback()
        if (chunk[0] === TERMINATE) return
        // postgres.js took the failed stream for an open connection: fail what it sent.
        this.state = 'done'
        this.emitError(new DsqlConnectionError(`The connection to ${this.opener.where} could not be opened.`, { retryable: true, code: 'CONNECTION_CLOSED' }))
        return void this.destroy()
      default:
        // 'opening': postgres.js writes nothing before the startup answer but its Terminate.
        callback()
    }
  }

  override _read(): void {
    this.transport?.resume()
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.ended = true
    callback()
    const transport = this.transport
    if (transport && this.state === 'open') {
      // Graceful: postgres.js's Terminate goes out before the FIN; the transport closes on its own.
      transport.end()
      setTimeout(() => transport.destroy(), 2000).unref()
      this.transport = null
    }
    this.destroy()
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.abort.abort()
    this.transport?.destroy()
    this.transport = null
    callback(error)
  }

  private cancel(request: Buffer): void {
    this.state = 'done'
    // postgres.js resolves the cancel on 'close' and rejects it on 'error', often with no one
    // listening (query.cancel()'s promise is commonly ignored): so a failure is logged, never emitted.
    void this.opener.cancel(request).finally(() => {
      this.push(null)
      this.destroy()
    })
  }

  private open(): void {
    this.state = 'opening'
    this.opener.open(this.abort.signal).then(
      (session) => this.attach(session),
      (error: Error) => this.failOpen(error),
    )
  }

  private attach({ stream, replay, rest, pipelined, drain }: Session): void {
    if (this.destroyed || this.ended) return void stream.destroy()
    this.state = 'open'
    this.transport = stream
    if (this.keepAlive) this.setKeepAlive(...this.keepAlive)
    this.pipelined = pipelined
    // Framing starts at the hand-over, so that a message cut across reads is reassembled.
    if (pipelined) this.stripping = new wire.Frames()
    stream.on('data', (chunk: Buffer) => this.fromServer(chunk))
    stream.on('error', (err: NodeJS.ErrnoException) => this.lost(err))
    stream.on('close', () => this.lost())
    this.push(replay)
    if (rest.length) this.fromServer(rest)
    // After postgres.js has read the replay (a push may be delivered a tick later).
    if (drain) setImmediate(() => this.destroyed || this.emit('drain'))
    stream.resume()
  }

  private failOpen(error: Error): void {
    if (this.destroyed) return
    this.state = 'failed'
    this.emitError(error)
    // The pool is ending and waits for this connection: an idle ReadyForQuery makes postgres.js
    // terminate it (a close alone would leave sql.end() waiting forever).
    if (this.opener.ending()) this.push(READY_IDLE)
    else this.closeSoon()
  }

  private send(chunk: Buffer, callback: () => void): void {
    const transport = this.transport
    if (!transport) return callback()
    if (this.pipelined) {
      chunk = Buffer.concat([wire.queryMessage(this.pipelined), chunk])
      this.pipelined = null
    }
    // Errors of the transport come through its 'error' event; a write is never failed here.
    transport.write(chunk, () => callback())
  }

  private fromServer(chunk: Buffer): void {
    if (this.stripping) chunk = this.strip(this.stripping, chunk)
    if (chunk.length && !this.push(chunk)) this.transport?.pause()
  }

  /** Removes the pipelined SET's reply (CommandComplete/Error .. ReadyForQuery); keeps everything else, in order. */
  private strip(frames: wire.Frames, chunk: Buffer): Buffer {
    const kept: Buffer[] = []
    for (const message of frames.push(chunk)) {
      const type = String.fromCharCode(message[0])
      if (!this.stripping || !'CEIZ'.includes(type)) kept.push(message)
      else if (type === 'E') this.opener.logger?.warn?.('dsql: selecting the schema failed', { message: wire.errorFields(message).M })
      else if (type === 'Z') this.stripping = null
    }
    if (!this.stripping) kept.push(frames.rest())
    return Buffer.concat(kept)
  }

  /** The transport failed or closed under an open session. */
  private lost(err?: NodeJS.ErrnoException): void {
    if (this.state !== 'open' || this.destroyed) return
    this.state = 'done'
    this.transport = null
    // A transport's own typed error (a WebSocket's close code) says more than its code.
    const how = err instanceof DsqlError ? `failed: ${err.message}` : err ? `failed (${err.code ?? err.message})` : 'was closed by the server'
    this.emitError(new DsqlConnectionError(`The connection to ${this.opener.where} ${how}.`, { retryable: true, code: 'CONNECTION_CLOSED', cause: err }))
    this.closeSoon()
  }

  /**
   * 'close' after the failures have run their course: the promise reactions of the failed
   * queries (a transaction's ROLLBACK) and postgres.js's setImmediate write of them.
   */
  private closeSoon(): void {
    // setImmediate first: postgres.js's own setImmediate write of a ROLLBACK queued by those
    // reactions runs before the timer, however long this loop iteration took.
    setImmediate(() =>
      setTimeout(() => {
        this.push(null)
        this.destroy()
      }, 20),
    )
  }

  private emitError(error: Error): void {
    // Our own no-op listener is always there: more than one means postgres.js listens.
    if (this.listenerCount('error') > 1) this.emit('error', error)
  }
}
