import { Duplex } from 'node:stream'
import * as tls from 'node:tls'
import type { DsqlConfig, DsqlLogger } from '../config'
import { DsqlConnectionError, DsqlError } from '../errors'
import type { Mint } from '../token'
import { dial, NoDirectTls, socketError } from './dial'
import { handOver } from './handover'
import { startup, type OnConnect, type PgSocketOptions, type Started } from './startup'

export type { PgSocketOptions } from './startup'

export interface ConnectorOptions {
  logger?: DsqlLogger
  onconnect?: OnConnect
  /** True once sql.end() was called: a connection still being opened is not handed over. */
  closing?: () => boolean
}

/**
 * postgres.js's `socket` option. Each call opens one DSQL session to ReadyForQuery (dial,
 * startup), retrying what is safe to retry, and hands postgres.js a stream it sees as a fresh
 * server that trusts it. Failures come back as a stream destroyed with a typed error: a rejected
 * promise or a throw would leave postgres.js with a pool slot it never frees.
 */
export function connector(config: DsqlConfig, mint: Mint, options: ConnectorOptions) {
  const { logger, closing } = options
  // One TLS context per dsql(): building it (parsing the CA) per connection costs ~0.2 ms of CPU.
  const tlsOptions = { ...config.tls, secureContext: config.tls.secureContext ?? tls.createSecureContext(config.tls) }
  config = { ...config, tls: tlsOptions }
  // A missing `ws` fails dsql() itself, not each connection later.
  if (config.transport === 'websocket') (require('./websocket') as typeof import('./websocket')).webSocketImpl(config)
  let negotiation = config.sslnegotiation
  return async function socket(pg: PgSocketOptions): Promise<Duplex> {
    const deadline = Date.now() + config.connectTimeoutMs
    for (let attempt = 1; ; attempt++) {
      if (closing?.()) return failedSocket(new DsqlConnectionError('The pool is ending (sql.end()).', { retryable: false }))
      const started = Date.now()
      const current = { ...config, sslnegotiation: negotiation }
      try {
        const { stream, session } = await establish(current, mint, pg, options, deadline)
        logger?.debug?.('dsql connection ready', { host: config.host, attempt, ms: Date.now() - started })
        if (closing?.()) {
          stream.destroy()
          return failedSocket(new DsqlConnectionError('The pool is ending (sql.end()): connection not used.', { retryable: false }))
        }
        // postgres.js hands a connection opened for sql.reserve()/sql.begin() over only on 'drain'
        // or after a setup query of its own (type fetch, session attributes).
        return handOver(stream, session, current, logger, !pg.fetch_types && !pg.target_session_attrs)
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

async function establish(config: DsqlConfig, mint: Mint, pg: PgSocketOptions, options: ConnectorOptions, deadline: number): Promise<{ stream: Duplex; session: Started }> {
  // Signing overlaps the TCP and TLS handshakes; the token is sent only after the certificate verified.
  const token = mint()
  token.catch(() => undefined)
  const stream = await dial(config, deadline)
  try {
    return { stream, session: await startup(stream, token, pg, config, options.onconnect, deadline) }
  } catch (err) {
    stream.destroy()
    throw err
  }
}

function asDsqlError(err: unknown, config: DsqlConfig): DsqlError {
  if (err instanceof DsqlError) return err
  if (err instanceof Error) return socketError(err, config)
  return new DsqlConnectionError(String(err), { retryable: false })
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
