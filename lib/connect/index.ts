import type { Duplex } from 'node:stream'
import * as tls from 'node:tls'
import type { DsqlConfig, DsqlLogger } from '../config'
import { DsqlConnectionError, DsqlError, DsqlTlsError } from '../errors'
import type { Mint } from '../token'
import { sendCancel } from './cancel'
import { dial, isUnreachable, NoDirectTls, socketError, where } from './dial'
import { Handover, type Session } from './handover'
import { Hosts } from './hosts'
import * as wire from '../wire'
import { EarlyTokenRefused, MAX_EARLY_FAILURES, SchemaOptionRefused, startup, type OnConnect, type PgSocketOptions } from './startup'

export type { PgSocketOptions } from './startup'

export interface ConnectorOptions {
  logger?: DsqlLogger
  onconnect?: OnConnect
  /** True once sql.end() was called. */
  closing?: () => boolean
  /** True while a sql.reserve() waits for a connection. */
  reserving?: () => boolean
  /** A session was handed to postgres.js. */
  opened?: () => void
  /** A stream postgres.js held closed. */
  closed?: () => void
}

/** A wrong address (refused, no route, closed at once) is retried this long only, not for all of connect_timeout. */
const UNREACHABLE_RETRY_MS = 2000

/**
 * postgres.js's `socket` option. Each call returns a stream (handover.ts) that, on postgres.js's
 * first write, either opens one DSQL session to ReadyForQuery (dial, startup), retrying what is
 * safe to retry, or sends a CancelRequest. Failures reach postgres.js as a typed 'error' on that
 * stream: a rejected promise or a throw would leave postgres.js with a pool slot it never frees.
 */
export function connector(config: DsqlConfig, mintFor: (endpoint: DsqlConfig) => Mint, options: ConnectorOptions, hosts = new Hosts(config.endpoints, options.logger)) {
  const { logger, closing, reserving, opened, closed } = options
  // One TLS context per dsql(): building it (parsing the CA) per connection costs ~0.2 ms of CPU.
  // The endpoints of a multi-Region cluster share it: only their server names differ.
  const secureContext = config.tls.secureContext ?? tls.createSecureContext(config.tls)
  // A missing `ws` fails dsql() itself, not each connection later.
  if (config.transport === 'websocket') (require('./websocket') as typeof import('./websocket')).webSocketImpl(config)
  const endpoints = new Map(hosts.endpoints.map((e) => [e, { config: { ...e, tls: { ...e.tls, secureContext } }, mint: mintFor(e), negotiation: e.sslnegotiation }]))

  // The schema goes in the StartupMessage until a server refuses it there; then with a SET.
  let schemaInStartup = true

  // Which endpoint holds each session, by backend key: a CancelRequest must go to that endpoint.
  const sessions = new Map<string, DsqlConfig>()
  const remember = (replay: Buffer, endpoint: DsqlConfig) => {
    if (!hosts.multi) return
    const key = wire.backendKey(replay)
    if (!key) return
    sessions.set(key, endpoint)
    // Bounded: a key is forgotten long after its connection (at most max_lifetime) has ended.
    if (sessions.size > 10_000) sessions.delete(sessions.keys().next().value as string)
  }

  /** One pass over the endpoints, preferred first: the first that opens a session wins. */
  async function tryEndpoints(pg: PgSocketOptions, deadline: number, signal: AbortSignal): Promise<Session> {
    const failures: [DsqlConfig, DsqlError][] = []
    const order = hosts.order()
    for (const endpoint of order) {
      const state = endpoints.get(endpoint)!
      // Each endpoint gets its share of the time left, so that a silent one cannot use it all.
      const until = hosts.multi ? Math.min(deadline, Date.now() + Math.max(1000, (deadline - Date.now()) / (order.length - failures.length))) : deadline
      for (;;) {
        const current = { ...state.config, sslnegotiation: state.negotiation }
        const inStartup = schemaInStartup
        try {
          const { stream, replay, rest, pipelined } = await establish(current, state.mint, pg, options.onconnect, until, signal, inStartup)
          hosts.up(endpoint)
          remember(replay, endpoint)
          // postgres.js hands a connection opened for sql.reserve()/sql.begin() over only on 'drain'
          // or after a setup query of its own (type fetch, session attributes).
          return { stream, replay, rest, pipelined, drain: !pg.fetch_types && !pg.target_session_attrs }
        } catch (err) {
          if (signal.aborted) throw err
          const error = asDsqlError(err, current)
          if (error instanceof NoDirectTls && current.directFallback && current.sslnegotiation === 'direct') {
            // Servers before PostgreSQL 17 (and proxies) read a ClientHello as a broken startup packet.
            if (state.negotiation === 'direct') logger?.warn?.('dsql: the server does not speak direct TLS; using SSLRequest from now on', { host: current.host })
            state.negotiation = 'postgres'
            continue
          }
          if (error instanceof EarlyTokenRefused) {
            // Once per endpoint and process (a Lambda cold start pays one more connection for it), not per connection.
            const said = `dsql: the server did not take the IAM token sent with the startup message; opening the connection again, waiting to be asked (after ${MAX_EARLY_FAILURES} such failures the token is never sent unasked to this endpoint)`
            if (error.first) logger?.warn?.(said, { host: current.host, message: error.message })
            else logger?.debug?.(said, { host: current.host, message: error.message })
            continue
          }
          if (error instanceof SchemaOptionRefused && inStartup) {
            // Once, though connections opened together all meet the refusal.
            if (schemaInStartup) logger?.warn?.('dsql: the server refused the schema in the startup message; selecting it with SET from now on', { host: current.host, message: error.message })
            schemaInStartup = false
            continue
          }
          // A refused token, a failing hook or missing credentials would fail on every endpoint alike.
          if (!hosts.multi || !failsOver(error)) throw error
          hosts.down(endpoint, error)
          failures.push([endpoint, error])
          break
        }
      }
    }
    throw hosts.allFailed(failures)
  }

  async function open(pg: PgSocketOptions, deadline: number, signal: AbortSignal): Promise<Session> {
    const first = Date.now()
    let warned = false
    for (let attempt = 1; ; attempt++) {
      const started = Date.now()
      try {
        const session = await tryEndpoints(pg, deadline, signal)
        logger?.debug?.('dsql connection ready', { host: hosts.last?.host, region: hosts.last?.region, attempt, ms: Date.now() - started })
        return session
      } catch (err) {
        if (signal.aborted) throw err
        const error = asDsqlError(err, config)
        const delay = backoffMs(attempt)
        const until = isUnreachable(error) ? Math.min(deadline, first + UNREACHABLE_RETRY_MS) : deadline
        if (!(error instanceof DsqlConnectionError && error.retryable) || Date.now() + delay >= until) {
          logger?.error?.('dsql connection failed', { host: config.host, attempt, code: error.code, message: error.message })
          throw error
        }
        // Once per connection, not per attempt: a storm or an outage would otherwise flood the log.
        const fields = { host: config.host, attempt, delayMs: delay, code: error.code, message: error.message }
        if (warned) logger?.debug?.('dsql connection attempt failed; retrying', fields)
        else logger?.warn?.('dsql connection attempt failed; retrying', fields)
        warned = true
        await new Promise((resolve) => setTimeout(resolve, delay))
        if (signal.aborted) throw error
      }
    }
  }

  // Streams postgres.js holds, and whether they ever were as many as its max (see Handover.mayHandOver).
  let live = 0
  let crowded = false
  return function socket(pg: PgSocketOptions): Duplex {
    const deadline = Date.now() + config.connectTimeoutMs
    const max = (pg as { max?: number }).max ?? 10
    if (++live >= max) crowded = true
    const handover = new Handover({
      open: (signal) => open(pg, deadline, signal),
      cancel: (request) => {
        const state = endpoints.get(sessions.get(wire.cancelKey(request)) ?? config)!
        return sendCancel(request, { ...state.config, sslnegotiation: state.negotiation }, logger)
      },
      ending: () => closing?.() ?? false,
      reserving: () => reserving?.() ?? false,
      maxConnections: max,
      crowded: () => crowded,
      opened: () => opened?.(),
      maxPipeline: (pg as { max_pipeline?: number }).max_pipeline ?? 100,
      logger,
      where: where(config),
    })
    return handover.once('close', () => {
      live--
      closed?.()
    })
  }
}

/** Full jitter over an exponential ceiling: 50 ms, 100 ms, ... capped at 2 s. */
function backoffMs(attempt: number): number {
  return Math.round(Math.random() * Math.min(2000, 50 * 2 ** (attempt - 1)))
}

async function establish(
  config: DsqlConfig,
  mint: Mint,
  pg: PgSocketOptions,
  onconnect: OnConnect | undefined,
  deadline: number,
  signal: AbortSignal,
  schemaInStartup: boolean,
) {
  // Signing overlaps the TCP and TLS handshakes; the token is sent only after the certificate verified.
  const token = mint()
  token.catch(() => undefined)
  const stream = await dial(config, deadline)
  // From here until the hand-over someone always listens: an 'error' is reported by the 'close' that follows.
  stream.on('error', () => undefined)
  const abort = () => stream.destroy()
  signal.addEventListener('abort', abort, { once: true })
  try {
    if (signal.aborted) throw new DsqlConnectionError('The connection is no longer wanted.', { retryable: false })
    return { stream, ...(await startup(stream, token, pg, config, onconnect, deadline, schemaInStartup)) }
  } catch (err) {
    stream.destroy()
    throw err
  } finally {
    signal.removeEventListener('abort', abort)
  }
}

/** Failures another Region's endpoint may not have: it could not be reached, or not in time, or refused for now. */
function failsOver(error: DsqlError): boolean {
  return (error instanceof DsqlConnectionError && error.retryable) || error instanceof DsqlTlsError
}

function asDsqlError(err: unknown, config: DsqlConfig): DsqlError {
  if (err instanceof DsqlError) return err
  if (err instanceof Error) return socketError(err, config)
  return new DsqlConnectionError(String(err), { retryable: false })
}
