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
  /** True while a sql.reserve() waits for a connection: postgres.js hands it the next one that reports ready. */
  reserving(): boolean
  /** postgres.js's max: the connections of the pool. */
  maxConnections: number
  /** True once the pool has had all its connections at once: only then can postgres.js have queued queries. */
  crowded(): boolean
  /** A session was handed to postgres.js. */
  opened(): void
  /** postgres.js's max_pipeline: with that many requests unanswered it queues further queries instead. */
  maxPipeline: number
  logger?: DsqlLogger
  where: string
}

type State = 'new' | 'opening' | 'open' | 'failed' | 'lost' | 'done'

/** ReadyForQuery, idle: after a failed open while the pool ends, it makes postgres.js terminate the connection. */
const READY_IDLE = Buffer.from([0x5a, 0, 0, 0, 5, 0x49])
const TERMINATE = 0x58
const [QUERY, SYNC, READY, ERROR, IDLE, FAILED, FLUSH, EXECUTE, PARSE] = [0x51, 0x53, 0x5a, 0x45, 0x49, 0x45, 0x48, 0x45, 0x50]
const readyFor = (status: number) => Buffer.from([READY, 0, 0, 0, 5, status])
/** EmptyQueryResponse, then ReadyForQuery: the answer to the reserve probe. */
const EMPTY_QUERY = Buffer.from([0x49, 0, 0, 0, 4])

/**
 * The statement lib/reserve.ts runs first on each reserved connection, `<prefix><id>`: the
 * Handover under it puts itself in the holder `probes` has under that id, and answers it without
 * a round trip, so that the reserved sql can tell later whether its connection is still there.
 */
export const PROBE_PREFIX = '/* postgres-dsql: reserve */ select 1 -- '
const PROBE_BYTES = Buffer.from(PROBE_PREFIX)
export const probes = new Map<number, { stream?: Handover }>()

const TRANSACTION_END = /^\s*(commit|end|abort|rollback(?!\s+to\b)|prepare\s+transaction)\b/i

/** Whether whole messages written by postgres.js hold a statement that ends a transaction (a Query's or a Parse's). */
function endsTransaction(chunk: Buffer): boolean {
  for (let i = 0; i + 5 <= chunk.length; i += chunk.readUInt32BE(i + 1) + 1) {
    const type = chunk[i]
    if (type !== QUERY && type !== PARSE) continue
    const body = chunk.subarray(i + 5, i + 1 + chunk.readUInt32BE(i + 1))
    // A Parse names its statement first.
    const start = type === PARSE ? body.indexOf(0) + 1 : 0
    if (TRANSACTION_END.test(body.toString('utf8', start, body.indexOf(0, start)))) return true
  }
  return false
}

/** Follows message boundaries in a byte stream without copying it: each message's type and last byte as it completes. */
class Boundaries {
  private header: number[] = []
  private remaining = 0
  /** Type of the last complete message, 0 while one is incomplete. */
  after = 0

  /** Between two messages: bytes of our own may go in here. */
  get atBoundary(): boolean {
    return this.remaining === 0 && (this.header.length === 0 || this.header.length === 5)
  }

  scan(chunk: Buffer, onMessage: (type: number, last: number) => unknown): void {
    for (let i = 0; i < chunk.length; ) {
      if (this.remaining === 0) {
        if (this.header.length === 5) this.header = []
        while (this.header.length < 5 && i < chunk.length) this.header.push(chunk[i++])
        if (this.header.length < 5) return void (this.after = 0)
        const [, a, b, c, d] = this.header
        this.remaining = ((a << 24) | (b << 16) | (c << 8) | d) - 4
        if (this.remaining <= 0) this.complete(d, onMessage)
        else this.after = 0
        continue
      }
      const n = Math.min(this.remaining, chunk.length - i)
      this.remaining -= n
      i += n
      if (this.remaining === 0) this.complete(chunk[i - 1], onMessage)
    }
  }

  private complete(last: number, onMessage: (type: number, last: number) => unknown): void {
    this.remaining = 0
    this.after = this.header[0]
    onMessage(this.after, last)
  }
}

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
  /** Message boundaries both ways, to tell a lost session's last answer (see lost()). */
  private readonly fromClient = new Boundaries()
  private readonly fromPeer = new Boundaries()
  /** Requests (Query, Sync) postgres.js sent that no ReadyForQuery answered yet. */
  private awaiting = 0
  /** The transaction status of the last ReadyForQuery: 'I' (0x49) idle, 'T' or 'E' in a transaction. */
  private status = IDLE
  /** postgres.js sent a request that makes it queue further queries until its ReadyForQuery (a describe first, a cursor). */
  private full = false
  /** Why the session is gone ('lost'): what later writes fail with. */
  private loss: Error | null = null

  constructor(private readonly opener: Opener) {
    super({ allowHalfOpen: false })
    // Errors reach postgres.js through emitError (when it still listens); never unhandled here.
    this.on('error', () => undefined)
  }

  /** postgres.js ends a socket only when it is 'open'. */
  get readyState(): string {
    return this.destroyed ? 'closed' : 'open'
  }

  /** The session is lost or never opened: nothing written here reaches a server any more. */
  get gone(): boolean {
    return this.destroyed || this.state === 'lost' || this.state === 'failed'
  }

  /**
   * A lost reserved connection released (it may still be kept for its transaction): it closes
   * now, without postgres.js's release (that would hand it to the pool first). But if sql.end()
   * waits for it, `release` runs and an idle ReadyForQuery makes postgres.js terminate it.
   */
  discard(release: () => void): void {
    if (this.state === 'lost') this.closeLost(release)
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
      case 'lost':
        callback()
        if (chunk[0] === TERMINATE) return
        // What postgres.js writes to a lost transaction's connection (see lost()) fails, once its
        // write has returned.
        this.probe(chunk)
        return process.nextTick(() => this.fail(endsTransaction(chunk)))
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
    this.opener.opened()
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
    const probe = this.probe(chunk)
    // Nothing else is due from the server then, so the answer cannot overtake another: it is
    // pushed once postgres.js's write has returned (what postgres.js writes while handling it
    // would be lost inside its own write), before any I/O.
    if (probe && this.awaiting === 0 && !this.stripping && this.fromPeer.atBoundary) {
      const answer = Buffer.concat([EMPTY_QUERY, readyFor(this.status)])
      process.nextTick(() => this.state === 'open' && this.push(answer))
      chunk = chunk.subarray(probe)
      if (!chunk.length) return callback()
    }
    // Before the pipelined SET is prepended: its ReadyForQuery is removed from what postgres.js reads.
    this.fromClient.scan(chunk, (type) => {
      if (type === QUERY || type === SYNC) this.awaiting++
      else if (type === FLUSH) this.full = true
    })
    // A cursor's Execute comes without a Sync (a plain one always with its Sync, in the same write).
    if (this.fromClient.after === EXECUTE) this.full = true
    if (this.pipelined) {
      chunk = Buffer.concat([wire.queryMessage(this.pipelined), chunk])
      this.pipelined = null
    }
    // Errors of the transport come through its 'error' event; a write is never failed here.
    transport.write(chunk, () => callback())
  }

  private fromServer(chunk: Buffer): void {
    if (this.stripping) chunk = this.strip(this.stripping, chunk)
    this.fromPeer.scan(chunk, (type, last) => {
      if (type !== READY) return
      if (this.awaiting > 0) this.awaiting--
      if (this.awaiting === 0) this.full = false
      this.status = last
    })
    if (chunk.length && !this.push(chunk)) this.transport?.pause()
  }

  /** A reserve probe at the start of `chunk` registers this stream; returns the probe's length, or 0. */
  private probe(chunk: Buffer): number {
    if (chunk[0] !== QUERY || chunk.length < 5 + PROBE_BYTES.length || !chunk.subarray(5, 5 + PROBE_BYTES.length).equals(PROBE_BYTES)) return 0
    const length = chunk.readUInt32BE(1) + 1
    const id = Number(chunk.toString('latin1', 5 + PROBE_BYTES.length, length - 1))
    const holder = probes.get(id)
    if (holder) holder.stream = this
    return length
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
    const inFlight = this.awaiting > 0 || this.full
    const handsOver = this.mayHandOver()
    const fatal = this.awaiting > 0 && this.fromPeer.after === ERROR
    this.state = 'lost'
    this.transport = null
    this.awaiting = 0
    // A typed error of the transport (the WebSocket's close code) says more than its code.
    const how = !err ? 'was closed by the server' : err instanceof DsqlError ? `failed: ${err.message.replace(/\.$/, '')}` : `failed (${err.code ?? err.message})`
    this.loss = new DsqlConnectionError(`The connection to ${this.opener.where} ${how}.`, { retryable: true, code: 'CONNECTION_CLOSED', cause: err })
    // A request answered with an ErrorResponse (a FATAL one, as pg_terminate_backend sends) and
    // then the close: the ReadyForQuery the server never sent fails it with the server's own
    // error. Otherwise the typed error fails it.
    if (!fatal) this.emitError(this.loss)
    // postgres.js keeps its current query until a ReadyForQuery comes (its end() would wait for
    // it forever, issue 1208). Not inside a message: it would corrupt the one postgres.js reads.
    const ready = (status: number) => this.fromPeer.atBoundary && this.push(readyFor(status))
    if (this.status !== IDLE) {
      // In a transaction the connection stays with it ('E': postgres.js keeps it reserved), until
      // postgres.js ends it: a query of the callback after the close would be written with no
      // socket, a crash. Everything written meanwhile fails here (see fail()).
      this.status = FAILED
      ready(FAILED)
      return
    }
    // But that ReadyForQuery may also hand the connection queries postgres.js had queued, and
    // postgres.js drops a write it has scheduled when the socket closes, never writing on that
    // slot again (its nextWrite timer stays set). So when it may have queued some, there is no
    // ReadyForQuery: the close makes postgres.js reconnect the slot for them, which ends the
    // current query too. The close comes before the failed queries' reactions run, so that a
    // caller's next query goes to a new connection, not this lost one.
    if (inFlight && !handsOver) ready(IDLE)
    process.nextTick(() => this.destroy())
  }

  /**
   * Whether postgres.js may hand this connection queued work when it reports ready. It queues
   * queries only when no connection takes more: with one connection, when that one is full (a
   * describe first, a cursor, max_pipeline, a backed-up write); with several, once all were in
   * use; and a reserve() waits for the next connection that is ready.
   */
  private mayHandOver(): boolean {
    const full = this.full || this.awaiting >= this.opener.maxPipeline || this.writableNeedDrain
    return this.opener.reserving() || full || (this.opener.maxConnections > 1 && this.opener.crowded())
  }

  /** Fails what postgres.js wrote to the lost session, and ends its current query. */
  private fail(endsTransaction: boolean): void {
    if (this.destroyed) return
    this.emitError(this.loss!)
    if (!this.fromPeer.atBoundary) return
    this.push(readyFor(this.status))
    // The transaction's COMMIT or ROLLBACK: now the connection goes. Its ReadyForQuery stays 'E',
    // so postgres.js keeps it with the transaction (an idle one would hand it to the pool first).
    if (endsTransaction && this.status !== IDLE) this.closeLost()
  }

  /**
   * Closes a lost connection that postgres.js keeps reserved, before the failures' reactions run.
   * If sql.end() is waiting by then, `release` runs and an idle ReadyForQuery makes postgres.js
   * terminate it instead (a close alone would leave end() waiting forever).
   */
  private closeLost(release?: () => void): void {
    process.nextTick(() => {
      if (this.destroyed) return
      if (!this.opener.ending() || !this.fromPeer.atBoundary) return void this.destroy()
      release?.()
      this.push(READY_IDLE)
      this.closeSoon()
    })
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
        if (this.destroyed) return
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
