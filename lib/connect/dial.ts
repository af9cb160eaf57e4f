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
    const onSocketError = (err: Error) => fail(socketError(err, config))
    const timer = setTimeout(
      () => fail(new DsqlConnectionError(`Timed out after ${config.connectTimeoutMs / 1000}s connecting to ${where(config)}.`, { retryable: true })),
      Math.max(0, deadline - Date.now()),
    )
    const startTls = (socket?: net.Socket) => {
      const direct = !socket
      const target = socket ? { socket } : { host: config.hostaddr, port: config.port }
      const s = (secure = tls.connect({ ...config.tls, ALPNProtocols: ['postgresql'], ...target }))
      // Direct TLS that reached the server and then broke off suggests a server without it.
      let reached = false
      s.setNoDelay(true)
      s.once('connect', () => (reached = true))
      s.on('error', (err: NodeJS.ErrnoException) => fail(direct && reached && handshakeRefused(err) ? noDirectTls(config, err) : socketError(err, config)))
      s.once('close', () => (direct && reached ? fail(noDirectTls(config)) : onClose()))
      s.once('secureConnect', () => {
        if (direct && s.alpnProtocol !== 'postgresql') return fail(noDirectTls(config))
        clearTimeout(timer)
        s.removeAllListeners('error')
        s.removeAllListeners('close')
        resolve(s)
      })
    }
    const onClose = () => fail(new DsqlConnectionError(`${where(config)} closed the connection during the TLS handshake.`, { retryable: true }))
    if (config.sslnegotiation === 'direct') return startTls()

    const r = (raw = net.connect({ host: config.hostaddr, port: config.port, noDelay: true }))
    r.on('error', onSocketError)
    r.once('connect', () => r.write(wire.SSL_REQUEST))
    r.once('data', (answer: Buffer) => {
      if (answer.length !== 1 || answer[0] !== 0x53) return fail(new DsqlTlsError(`${where(config)} refused TLS after an SSLRequest; DSQL requires TLS.`))
      r.removeListener('error', onSocketError)
      startTls(r)
    })
  })
}

/** Direct TLS reached the server but it did not complete: the server may not speak it. */
export class NoDirectTls extends DsqlTlsError {}

function noDirectTls(config: DsqlConfig, cause?: Error): NoDirectTls {
  return new NoDirectTls(`${where(config)} does not speak direct TLS (ALPN "postgresql"): use sslnegotiation: 'postgres'.`, cause)
}

/** A handshake the server broke off, as opposed to a certificate that did not verify. */
function handshakeRefused(err: NodeJS.ErrnoException): boolean {
  const code = err.code ?? ''
  return !/CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/.test(code) && (code === 'ECONNRESET' || code === 'EPROTO' || code.startsWith('ERR_SSL'))
}

const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'EAI_AGAIN'])

export function socketError(err: NodeJS.ErrnoException, config: DsqlConfig): DsqlError {
  const code = err.code ?? ''
  if (NETWORK_CODES.has(code))
    return new DsqlConnectionError(`Cannot reach ${where(config)} (${code}): check host, port, hostaddr and the network path.`, { retryable: true, cause: err })
  if (code === 'ENOTFOUND')
    return new DsqlConnectionError(`Cannot resolve ${config.hostaddr} (ENOTFOUND): check the cluster endpoint, or set hostaddr.`, { retryable: false, cause: err })
  if (/CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/.test(code))
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
