/**
 * The WebSocket transport: the PostgreSQL protocol, StartupMessage and password included, in the
 * binary messages of `wss://<endpoint>/`, as DSQL serves it for browsers, edge runtimes and
 * networks that pass only HTTPS. The WebSocket's TLS is the connection's TLS. Loaded only when
 * `transport: 'websocket'` is chosen: nothing here runs (or requires `ws`) on the TCP path.
 */
import { Duplex } from 'node:stream'
import * as tls from 'node:tls'
import type { DsqlConfig } from '../config'
import { DsqlConfigError, DsqlConnectionError, DsqlError } from '../errors'
import { socketError, unreachableError, where } from './dial'

/** The standard (WHATWG) WebSocket surface, which both the runtime's global and `ws` provide. */
interface WebSocketLike {
  binaryType: string
  readonly readyState: number
  readonly bufferedAmount: number
  send(data: Uint8Array): void
  close(code?: number, reason?: string): void
  addEventListener(type: 'open' | 'message' | 'close' | 'error', listener: (event: WsEvent) => void): void
  /** `ws` only: ping frames and their answers, for the keep-alive. */
  ping?(): void
  terminate?(): void
  on?(event: 'pong', listener: () => void): unknown
}

interface WsEvent {
  data?: unknown
  code?: number
  reason?: string
  /** `ws` only: the underlying error (certificate, network), with its code. */
  error?: unknown
}

type WebSocketClass = new (url: string, options?: object) => WebSocketLike

/** What opens this config's WebSockets: the runtime's own, or `ws` where Node-side TLS settings are needed. */
export interface WebSocketImpl {
  WebSocket: WebSocketClass
  /** True for `ws`: takes node:tls options (CA, hostaddr) and sends pings. */
  node: boolean
}

const OPEN = 1
/** Above this many unsent bytes, writes wait: the standard API has no other backpressure. */
const HIGH_WATER = 1 << 20

/**
 * The runtime's global WebSocket when it can do what the config asks, else `ws`. A global one
 * cannot take a CA, other TLS settings, or an address other than the endpoint's.
 */
export function webSocketImpl(config: DsqlConfig, global: unknown = (globalThis as { WebSocket?: unknown }).WebSocket, load = loadWs): WebSocketImpl {
  const needsNode = config.hostaddr !== config.host || customTls(config.tls)
  if (typeof global === 'function' && !needsNode) return { WebSocket: global as WebSocketClass, node: false }
  let ws: unknown
  try {
    ws = load()
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'MODULE_NOT_FOUND') throw err
    const why =
      typeof global === 'function'
        ? "the runtime's WebSocket cannot take hostaddr, sslrootcert or ssl options"
        : 'this runtime has no global WebSocket (Node before 22)'
    throw new DsqlConfigError(`transport: 'websocket' needs the ws package: ${why}. Install it with \`npm i ws\`.`)
  }
  const WebSocket = (ws as { WebSocket?: WebSocketClass }).WebSocket ?? (ws as WebSocketClass)
  return { WebSocket, node: true }
}

/**
 * `ws`, required by a name bundlers do not follow: it is for Node, where it is installed, and
 * a bundle (for the TCP path, a browser or a Worker) should not carry it.
 */
function loadWs(): unknown {
  return require(['w', 's'].join('')) as unknown
}

/** TLS settings beyond the defaults (verify against the system CAs, SNI = host). */
function customTls(options: tls.ConnectionOptions): boolean {
  return Object.entries(options).some(([k, v]) => !(k === 'servername' || k === 'minVersion' || k === 'secureContext' || (k === 'rejectUnauthorized' && v === true)))
}

export function webSocketUrl(config: { host: string; port: number }): string {
  return `wss://${config.host}${config.port === 443 ? '' : `:${config.port}`}/`
}

/**
 * Opens `wss://host:port/` and resolves with a stream of the protocol bytes once the WebSocket
 * is open. With `ws`, the TLS is node:tls to `hostaddr` with the config's CA and checks, SNI and
 * `Host` for the endpoint. Failures are typed like the TCP transport's (certificate, network).
 */
export function openWebSocket(config: DsqlConfig, impl: WebSocketImpl, deadline: number): Promise<WebSocketStream> {
  return new Promise((resolve, reject) => {
    const url = webSocketUrl(config)
    const fail = (error: Error) => {
      clearTimeout(timer)
      reject(error)
      stream.destroy()
    }
    const timer = setTimeout(
      () => fail(new DsqlConnectionError(`Timed out after ${config.connectTimeoutMs / 1000}s opening a WebSocket to ${where(config)}.`, { retryable: true })),
      Math.max(0, deadline - Date.now()),
    )
    const options = impl.node
      ? {
          perMessageDeflate: false,
          // `ws` would resolve the URL's host; connect to hostaddr instead, SNI for the endpoint.
          createConnection: () => tls.connect({ ...config.tls, host: config.hostaddr, port: config.port, ALPNProtocols: ['http/1.1'] }),
        }
      : undefined
    let socket: WebSocketLike
    try {
      socket = options ? new impl.WebSocket(url, options) : new impl.WebSocket(url)
    } catch (err) {
      clearTimeout(timer)
      return reject(err)
    }
    socket.binaryType = 'arraybuffer'
    const stream = new WebSocketStream(socket, config)
    let opened = false
    socket.addEventListener('open', () => {
      opened = true
      clearTimeout(timer)
      resolve(stream)
    })
    socket.addEventListener('error', (event) => {
      if (!opened) fail(openError(event.error, config, impl.node))
    })
    socket.addEventListener('close', (event) => {
      if (!opened) fail(new DsqlConnectionError(`The WebSocket to ${where(config)} closed before it opened (code ${event.code ?? 'none'}).`, { retryable: true }))
    })
  })
}

/** Why a WebSocket did not open, as a typed error. */
function openError(error: unknown, config: DsqlConfig, node: boolean): Error {
  // A runtime's own WebSocket (browsers, undici) hides the cause by design, so say what it may be.
  // Not `instanceof Error`: errors from another realm (vm, test runners) are errors too.
  // Mostly a wrong host or port, or a certificate the runtime does not trust: retried briefly,
  // as a refused address is, not for all of connect_timeout.
  if (!node || !isError(error))
    return unreachableError(
      new DsqlConnectionError(
        `The WebSocket to ${where(config)} failed to open, and the runtime's WebSocket does not say why: ` +
          'check host and port, the network path, and that the runtime trusts the endpoint\'s certificate.',
        { retryable: true, cause: isError(error) ? error : undefined },
      ),
    )
  if (error instanceof DsqlError) return error
  // Network and certificate errors: typed as on the TCP transport.
  if (error.code) return socketError(error, config)
  // `ws`: "Unexpected server response: 503" and the like, from the HTTP upgrade.
  const status = Number(/response: (\d{3})/.exec(error.message)?.[1])
  return new DsqlConnectionError(`The WebSocket upgrade with ${where(config)} failed: ${error.message}. Is this a DSQL endpoint (port 443)?`, {
    retryable: status === 429 || status >= 500,
    cause: error,
  })
}

function isError(value: unknown): value is NodeJS.ErrnoException {
  return typeof value === 'object' && value !== null && typeof (value as Error).message === 'string'
}

/**
 * A WebSocket as the Duplex postgres.js and the connector read and write: each binary message
 * is a chunk of the protocol stream. `readyState` is the one net.Socket field postgres.js reads
 * to end and await a connection; `setKeepAlive` is how it asks for keep-alive (`keep_alive`).
 */
export class WebSocketStream extends Duplex {
  private keepAlive: NodeJS.Timeout | undefined
  private answered = true
  /** The server has answered a ping: only then is a missing answer taken for a dead connection. */
  private pongs = false

  constructor(
    private readonly socket: WebSocketLike,
    private readonly config: DsqlConfig,
  ) {
    super({ allowHalfOpen: false })
    socket.addEventListener('message', (event) => {
      this.answered = true
      const data = event.data
      this.push(typeof data === 'string' ? Buffer.from(data) : Buffer.from(data as ArrayBuffer))
    })
    socket.addEventListener('close', (event) => {
      if (this.destroyed) return
      // A normal close follows the server's last message (an error, a Terminate); anything else
      // (1006: no close frame) is a lost connection, which must fail the query in flight.
      const error =
        event.code === 1000 || event.code === 1005
          ? null
          : new DsqlConnectionError(`The WebSocket to ${this.config.host} closed (code ${event.code ?? 'none'}${event.reason ? `: ${event.reason}` : ''}).`, { retryable: true })
      // Messages received before the close are read first; 'close' follows even if nobody reads.
      this.push(null)
      if (this.readableLength === 0) this.destroy(error ?? undefined)
      else this.once('end', () => this.destroy(error ?? undefined))
    })
    // A later error is always followed by 'close', which reports it.
    socket.addEventListener('error', () => undefined)
    socket.on?.('pong', () => (this.answered = this.pongs = true))
  }

  get readyState(): 'opening' | 'open' | 'closed' {
    if (this.destroyed || this.socket.readyState > OPEN) return 'closed'
    return this.socket.readyState === OPEN ? 'open' : 'opening'
  }

  /**
   * Keep-alive with WebSocket ping frames (`ws` only): a ping every `ms`, which also keeps proxies
   * from timing an idle connection out. Once the server has answered a ping, a connection with no
   * pong and no message since the previous ping is closed: a dead WebSocket is found while idle.
   * A server that never answers pings is never judged by them. The standard API cannot ping.
   */
  setKeepAlive(enable: boolean, ms = 0): this {
    clearInterval(this.keepAlive)
    const ping = this.socket.ping?.bind(this.socket)
    if (!enable || !ping || !(ms > 0)) return this
    this.answered = true
    this.keepAlive = setInterval(() => {
      if (!this.answered && this.pongs) {
        this.destroy(new DsqlConnectionError(`The WebSocket to ${this.config.host} did not answer a ping within ${ms / 1000}s: closed it.`, { retryable: true }))
        return
      }
      this.answered = false
      ping()
    }, ms)
    this.keepAlive.unref()
    return this
  }

  setNoDelay(): this {
    return this
  }

  override _read(): void {}

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.socket.readyState !== OPEN) return callback(new DsqlConnectionError(`The WebSocket to ${this.config.host} is closed.`, { retryable: true }))
    this.socket.send(chunk)
    this.whenDrained(callback)
  }

  private whenDrained(callback: () => void): void {
    if (this.socket.bufferedAmount < HIGH_WATER || this.socket.readyState !== OPEN) return callback()
    setTimeout(() => this.whenDrained(callback), 5)
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.socket.close(1000)
    callback()
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    clearInterval(this.keepAlive)
    // After a failure, `ws` drops the connection at once rather than wait for a closing handshake.
    if (this.socket.readyState <= OPEN) {
      if (error && this.socket.terminate) this.socket.terminate()
      else this.socket.close(1000)
    }
    callback(error)
  }
}
