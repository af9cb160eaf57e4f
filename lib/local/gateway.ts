/**
 * The DSQL-like front door: one TCP port on 127.0.0.1 that speaks TLS, checks SNI and IAM
 * tokens, enforces DSQL's connection quotas, and relays each session to PostgreSQL. Several
 * gateways may share one PostgreSQL (tests vary limits or regions without another server).
 */
import { createServer, type Server, type Socket } from 'node:net'
import { createSecureContext } from 'node:tls'
import { DEFAULT_LIMITS, mergeLimits, TokenBucket, type Limits } from './limits'
import type { Logger } from './logger'
import type { ErrorFields } from './protocol'
import type { DialectSettings } from './relay'
import { ClientConnection, serve, type GatewayContext } from './session'
import type { Keyring } from './sigv4'
import { acceptWebSocket } from './websocket'

/**
 * Server misbehaviour on demand, for testing clients (all off by default). closeAt: close new
 * connections at that step of their startup ('accept': before reading a byte; 'startup': after
 * TLS, on the StartupMessage; 'password': on the token). afterReady: right after the startup's
 * ReadyForQuery, send a NoticeResponse and a ParameterStatus (dsql_local_fault = after-ready),
 * 'coalesced' in the same write, or 'split' in two writes a moment apart, cut mid-message.
 * refuseOptions: refuse a StartupMessage that has an `options` parameter, as a proxy that does
 * not know it would (PgBouncer: 08P01 unsupported startup parameter: options). authMethod and
 * refuseEarlyPassword: a server that is not (or no longer) a cleartext-token endpoint.
 */
export interface GatewayFaults {
  closeAt?: 'accept' | 'startup' | 'password'
  afterReady?: 'coalesced' | 'split'
  refuseOptions?: boolean
  /** Ask for MD5 or SASL (SCRAM) instead of a cleartext password, and refuse whatever comes back; 'none': ask for nothing (trust). */
  authMethod?: 'md5' | 'sasl' | 'none'
  /** Refuse a password that arrived before it was asked for (with the StartupMessage), as a strict front end might. */
  refuseEarlyPassword?: boolean
  /** Drop whatever arrived with the StartupMessage and ask for the password anyway, as a front end that reads the startup apart might; 'ignoring flushes': and pass over Flush messages while waiting for it. */
  dropEarlyPassword?: boolean | 'ignoring flushes'
  /**
   * A front end that takes nothing from the client between the password and ReadyForQuery: it
   * sends AuthenticationOk alone, and refuses (08P01) anything that arrived by a moment later
   * (a Flush, an early query) or was still unread after the password.
   */
  refuseUntilReady?: boolean
}

export const LOOPBACK = '127.0.0.1'

export interface GatewayOptions {
  /** Endpoint name, `<cluster id>.dsql.<region>.on.aws`: required SNI and token host. */
  host: string
  region: string
  /** 0 (default): an ephemeral port, kept across stop() and start(). */
  port?: number
  tls: { key: string; cert: string }
  keys: Keyring
  connectBackend(): Socket
  reservedUsers?: string[]
  limits?: Partial<Limits>
  logger?: Logger
  /** DSQL's dialect on the relayed sessions; undefined relays bytes unchanged. */
  dialect?: DialectSettings
  /** The IAM identity of the accepted key pairs: roles other than admin need AWS IAM GRANT to it. */
  iamArn?: string
}

export interface GatewayStats {
  /** TCP connections accepted. */
  accepted: number
  /** Sessions that passed the token check and reached PostgreSQL. */
  authenticated: number
  /** Connections answered with an error or dropped during negotiation. */
  rejected: number
  /** Client connections open now. */
  open: number
}

export class Gateway {
  private server: Server | undefined
  private port: number
  private limits: Limits
  private bucket: TokenBucket
  private readonly connections = new Set<ClientConnection>()
  private admitted = 0
  private nextId = 1
  private readonly counters = { accepted: 0, authenticated: 0, rejected: 0 }
  private readonly context: GatewayContext
  private faults: GatewayFaults = {}

  constructor(private readonly options: GatewayOptions) {
    this.port = options.port ?? 0
    this.limits = mergeLimits(DEFAULT_LIMITS, options.limits ?? {})
    this.bucket = new TokenBucket(this.limits.connectionRate)
    this.context = {
      host: options.host,
      region: options.region,
      secureContext: createSecureContext({ key: options.tls.key, cert: options.tls.cert, minVersion: 'TLSv1.2' }),
      keys: options.keys,
      connectBackend: options.connectBackend,
      reservedUsers: new Set(options.reservedUsers ?? []),
      limits: () => this.limits,
      admit: (connection) => this.admit(connection),
      logger: options.logger ?? {},
      count: (event) => this.counters[event]++,
      dialect: options.dialect,
      iamArn: options.iamArn,
      faults: () => this.faults,
      webSocket: acceptWebSocket,
    }
  }

  /** Starts listening (again, on the same port once one was assigned); resolves with the port. */
  async start(): Promise<number> {
    if (this.server) return this.port
    // Not allowHalfOpen: a client's FIN closes the connection, whatever stage it is in. (PostgreSQL
    // clients close fully after Terminate; nothing is lost that a client still waits for.)
    const server = createServer((socket) => this.accept(socket))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen({ host: LOOPBACK, port: this.port }, () => {
        server.off('error', reject)
        resolve()
      })
    })
    server.on('error', (err) => this.context.logger.error?.(`postgres-dsql local gateway: ${err.message}`))
    this.server = server
    this.port = (server.address() as { port: number }).port
    return this.port
  }

  /** Stops listening and drops every client connection, as an outage would. */
  async stop(): Promise<void> {
    const server = this.server
    this.server = undefined
    for (const connection of this.connections) connection.destroy()
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()))
  }

  get listeningPort(): number {
    return this.port
  }

  setLimits(change: Partial<Limits>): void {
    const next = mergeLimits(this.limits, change)
    if (change.connectionRate) this.bucket = new TokenBucket(next.connectionRate)
    this.limits = next
  }

  setFaults(faults: GatewayFaults): void {
    this.faults = { ...faults }
  }

  stats(): GatewayStats {
    return { ...this.counters, open: this.connections.size }
  }

  private accept(socket: Socket): void {
    this.counters.accepted++
    socket.on('error', () => undefined) // resets are normal; the 'close' that follows cleans up
    const connection = new ClientConnection(this.nextId++, socket, this.limits)
    this.connections.add(connection)
    socket.once('close', () => {
      this.connections.delete(connection)
      if (connection.admitted) this.admitted--
    })
    // serve() awaits only before the relay starts: a failure is always a connection refused.
    serve(connection, this.context).catch((err: Error) => {
      this.counters.rejected++
      this.context.logger.debug?.(`postgres-dsql local #${connection.id}: dropped: ${err.message}`)
      connection.destroy()
    })
  }

  /** The quotas DSQL checks for every new connection: rate first, then the number open. */
  private admit(connection: ClientConnection): ErrorFields | undefined {
    if (!this.bucket.take()) return { severity: 'FATAL', code: '53400', message: 'Unable to accept connection, rate exceeded.' }
    if (this.admitted >= this.limits.maxConnections)
      return { severity: 'FATAL', code: '53300', message: 'Unable to accept connection, too many open connections.' }
    this.admitted++
    connection.admitted = true
    return undefined
  }
}
