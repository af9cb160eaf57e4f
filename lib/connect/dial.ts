import * as net from 'node:net'
import type { Duplex } from 'node:stream'
import * as tls from 'node:tls'
import type { DsqlConfig } from '../config'
import { DsqlConnectionError, DsqlError, DsqlTlsError } from '../errors'
import * as wire from '../wire'

/**
 * Opens the transport to one endpoint: TCP to hostaddr, then TLS with SNI = host, verified;
 * direct (ALPN `postgresql`) or after an SSLRequest. Or, with `transport: 'websocket'`, a
 * WebSocket to `wss://host:port/`. Resolves to a connected duplex stream that carries the
 * PostgreSQL protocol; startup and hand-over do not care which transport it is.
 * Rejects with a typed error; `isUnreachable()` tells the ones that point at a wrong address.
 */
export function dial(config: DsqlConfig, deadline: number): Promise<Duplex> {
  if (config.transport !== 'websocket') return openTls(config, deadline)
  // Required only here: the TCP path never loads the WebSocket transport or `ws`.
  const ws = require('./websocket') as typeof import('./websocket')
  return ws.openWebSocket(config, ws.webSocketImpl(config), deadline)
}

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
    const timer = setTimeout(() => fail(timedOut(config, 'connecting to')), Math.max(0, deadline - Date.now()))
    const startTls = (socket?: net.Socket) => {
      const direct = !socket
      const target = socket ? { socket } : { host: config.hostaddr, port: config.port }
      const s = (secure = tls.connect({ ...config.tls, ALPNProtocols: ['postgresql'], ...target }))
      // Direct TLS that reached the server and then broke off suggests a server without it.
      let reached = !direct
      s.setNoDelay(true)
      s.once('connect', () => (reached = true))
      const broken = (err?: NodeJS.ErrnoException) =>
        direct && reached && config.directFallback ? noDirectTls(config, err) : closedEarly(config, direct ? 'direct TLS' : 'TLS', err)
      s.on('error', (err: NodeJS.ErrnoException) => fail(reached && handshakeRefused(err) ? broken(err) : socketError(err, config)))
      s.once('close', () => fail(reached ? broken() : closedEarly(config, 'TLS')))
      s.once('secureConnect', () => {
        if (direct && s.alpnProtocol !== 'postgresql') return fail(noDirectTls(config))
        clearTimeout(timer)
        s.removeAllListeners('error')
        s.removeAllListeners('close')
        resolve(s)
      })
    }
    if (config.sslnegotiation === 'direct') return startTls()

    const r = (raw = net.connect({ host: config.hostaddr, port: config.port, noDelay: true }))
    const onError = (err: Error) => fail(socketError(err, config))
    const onClose = () => fail(closedEarly(config, 'an SSLRequest'))
    r.on('error', onError)
    r.once('close', onClose)
    r.once('connect', () => r.write(wire.SSL_REQUEST))
    r.once('data', (answer: Buffer) => {
      if (answer.length !== 1 || answer[0] !== 0x53) return fail(new DsqlTlsError(`${where(config)} refused TLS after an SSLRequest; DSQL requires TLS.`))
      r.removeListener('error', onError)
      r.removeListener('close', onClose)
      startTls(r)
    })
  })
}

export function timedOut(config: DsqlConfig, doing: string): DsqlConnectionError {
  return new DsqlConnectionError(`Timed out after ${config.connectTimeoutMs / 1000}s ${doing} ${where(config)}.`, { retryable: true, code: 'CONNECT_TIMEOUT' })
}

/** Direct TLS reached the server but it did not complete: the server may not speak it. */
export class NoDirectTls extends DsqlTlsError {}

function noDirectTls(config: DsqlConfig, cause?: Error): NoDirectTls {
  return new NoDirectTls(`${where(config)} does not speak direct TLS (ALPN "postgresql"): use sslnegotiation: 'postgres'.`, cause)
}

/** Errors that say the address is wrong (nothing listens, no route, closed at once): retried briefly only. */
const unreachable = new WeakSet<Error>()

export function isUnreachable(err: Error): boolean {
  return unreachable.has(err)
}

/** Marks an error as one that most likely points at a wrong address or endpoint: retried briefly only. */
export function unreachableError<E extends Error>(err: E): E {
  unreachable.add(err)
  return err
}

/** The server closed the connection before TLS was up: overloaded, a proxy, or not a PostgreSQL server. */
function closedEarly(config: DsqlConfig, during: string, cause?: Error): DsqlConnectionError {
  const advice = during === 'direct TLS' ? `; if it does not speak direct TLS (PostgreSQL 16 and older, some proxies), use sslnegotiation: 'postgres'` : ''
  const err = new DsqlConnectionError(`${where(config)} closed the connection during ${during}, before TLS was up${advice}.`, {
    retryable: true,
    code: 'CONNECTION_CLOSED',
    cause,
  })
  unreachable.add(err)
  return err
}

/** A handshake the server broke off, as opposed to a certificate that did not verify. */
function handshakeRefused(err: NodeJS.ErrnoException): boolean {
  const code = err.code ?? ''
  return !CERT_CODE.test(code) && (code === 'ECONNRESET' || code === 'EPROTO' || code.startsWith('ERR_SSL'))
}

const CERT_CODE = /CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/
const NETWORK_CODES = new Set(['ECONNRESET', 'ETIMEDOUT', 'EPIPE'])
const UNREACHABLE_CODES = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH'])

export function socketError(err: NodeJS.ErrnoException & { address?: string; port?: number }, config: DsqlConfig): DsqlError {
  const code = err.code ?? ''
  if (code === 'ECONNREFUSED') {
    const address = err.address ? `${err.address}:${err.port ?? config.port}` : `${config.hostaddr}:${config.port}`
    const e = new DsqlConnectionError(
      `Connection refused by ${address} (host ${config.host}, port ${config.port}, ECONNREFUSED): nothing accepts connections there; check host, port and hostaddr.`,
      { retryable: true, cause: err, code },
    )
    unreachable.add(e)
    return e
  }
  if (UNREACHABLE_CODES.has(code) || NETWORK_CODES.has(code)) {
    const e = new DsqlConnectionError(`Cannot reach ${where(config)} (${code}): check host, port, hostaddr and the network path.`, { retryable: true, cause: err, code })
    if (UNREACHABLE_CODES.has(code)) unreachable.add(e)
    return e
  }
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN' || code === 'EAI_FAIL' || code === 'EAI_NONAME')
    return new DsqlConnectionError(
      `The host name ${config.hostaddr} does not resolve (${code}): check the cluster endpoint for a typo (<cluster-id>.dsql.<region>.on.aws), or set hostaddr.`,
      { retryable: code === 'EAI_AGAIN', cause: err, code },
    )
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID')
    return new DsqlTlsError(
      `The endpoint ${config.tls.servername ?? config.host} does not match the server's certificate (${code}): a DSQL endpoint looks like <cluster-id>.dsql.<region>.on.aws; check host for a typo. No token was sent.`,
      err,
    )
  if (CERT_CODE.test(code))
    return new DsqlTlsError(
      `The certificate of ${where(config)} did not verify (${code}): trust the issuing CA with sslrootcert (e.g. certs/AmazonRootCA1.pem) or NODE_EXTRA_CA_CERTS. No token was sent.`,
      err,
    )
  return new DsqlTlsError(`TLS with ${where(config)} failed (${code || err.message}). No token was sent.`, err)
}

/** The endpoint as a message names it: the host, and the address when it differs. */
export function where(config: { host: string; hostaddr: string; port: number }): string {
  return config.hostaddr === config.host ? `${config.host}:${config.port}` : `${config.host} at ${config.hostaddr}:${config.port}`
}
