/**
 * WebSocket sessions on the gateway's own port, as DSQL serves `wss://<endpoint>/`: a direct-TLS
 * connection whose ALPN is not "postgresql" is read as HTTP, and a GET with `Upgrade: websocket`
 * becomes a WebSocket whose binary messages carry the PostgreSQL protocol, StartupMessage and
 * password included. What comes back is a stream of those protocol bytes, which session.ts
 * serves exactly as a TLS socket: the same SNI and token checks, limits and dialect.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { Duplex } from 'node:stream'
import type { TLSSocket } from 'node:tls'
import type * as WS from 'ws'

/** PostgreSQL protocol bytes carried by a WebSocket, with the SNI of the TLS under it. */
export type CarriedStream = Duplex & { servername: TLSSocket['servername'] }

/** The HTTP/1.1 ALPN name a browser or `ws` offers; a client may also offer none. */
export const HTTP_ALPN = 'http/1.1'

const waiting = new WeakMap<Duplex, (stream: CarriedStream | undefined) => void>()
let parts: { http: ReturnType<typeof createServer>; wss: WS.WebSocketServer; ws: typeof WS } | undefined

/** Reads an HTTP request from `secured`: a WebSocket upgrade resolves with its stream, anything else with undefined (connection closed). */
export function acceptWebSocket(secured: TLSSocket): Promise<CarriedStream | undefined> {
  const { http } = load()
  return new Promise((resolve) => {
    waiting.set(secured, resolve)
    secured.once('close', () => settle(secured, undefined))
    // node:http parses the request on any duplex handed to it as a connection.
    http.emit('connection', secured)
  })
}

function settle(socket: Duplex, stream: CarriedStream | undefined): void {
  const resolve = waiting.get(socket)
  waiting.delete(socket)
  resolve?.(stream)
}

function load() {
  if (parts) return parts
  // Loaded on the first WebSocket session only: the TCP path never needs `ws`.
  const ws = require('ws') as typeof WS
  // Never listens: only parses what accept() hands it.
  const http = createServer()
  const wss = new ws.WebSocketServer({ noServer: true, perMessageDeflate: false })
  http.on('clientError', (_err: Error, socket: Duplex) => {
    // Not HTTP (e.g. a PostgreSQL StartupMessage without ALPN): cut off without an answer, as before.
    socket.destroy()
    settle(socket, undefined)
  })
  http.on('request', (_req: IncomingMessage, res: ServerResponse) => {
    res.writeHead(426, { Upgrade: 'websocket', Connection: 'close' }).end()
    settle(res.socket!, undefined)
  })
  http.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    wss.handleUpgrade(req, socket, head, (websocket) => {
      const stream = ws.createWebSocketStream(websocket) as CarriedStream
      stream.servername = (socket as TLSSocket).servername
      settle(socket, stream)
    })
    // A refused handshake (bad key, version) is answered with 400 by ws and the socket closed.
  })
  parts = { http, wss, ws }
  return parts
}
