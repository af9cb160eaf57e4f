/**
 * The few PostgreSQL wire-protocol messages the stand-in reads and writes itself: the
 * negotiation and startup phase of the gateway, and the bootstrap client. Everything after
 * authentication is relayed as bytes and never parsed here.
 */
import type { Readable } from 'node:stream'

export { queryMessage, quoteIdentifier } from '../wire'

export const SSL_REQUEST_CODE = 80877103
export const GSSENC_REQUEST_CODE = 80877104
export const CANCEL_REQUEST_CODE = 80877102
export const PROTOCOL_3 = 196608
/** First byte of a TLS record carrying a handshake: a ClientHello sent without SSLRequest. */
export const TLS_HANDSHAKE_RECORD = 0x16
/** Startup packets larger than this are refused, as PostgreSQL does (MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_LENGTH = 10_000
/** A password message holds one token; even with a session token it stays far below this. */
export const MAX_PASSWORD_LENGTH = 64 * 1024

export interface ErrorFields {
  severity: 'FATAL' | 'ERROR'
  code: string
  message: string
  hint?: string
  detail?: string
}

export interface Message {
  type: string
  body: Buffer
}

/** ErrorResponse: S and V severity, C SQLSTATE, M message, then optional D detail and H hint. */
export function errorResponse(fields: ErrorFields): Buffer {
  const parts: [string, string | undefined][] = [
    ['S', fields.severity],
    ['V', fields.severity],
    ['C', fields.code],
    ['M', fields.message],
    ['D', fields.detail],
    ['H', fields.hint],
  ]
  const body = parts
    .filter((part): part is [string, string] => part[1] !== undefined)
    .map(([key, value]) => `${key}${value}\0`)
    .join('')
  return encodeMessage('E', Buffer.from(body + '\0'))
}

/** Fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter codes. */
export function parseErrorFields(body: Buffer): Record<string, string> {
  const fields: Record<string, string> = {}
  let i = 0
  while (i < body.length && body[i] !== 0) {
    const end = body.indexOf(0, i + 1)
    if (end < 0) break
    fields[String.fromCharCode(body[i])] = body.toString('utf8', i + 1, end)
    i = end + 1
  }
  return fields
}

export const authenticationCleartextPassword = (): Buffer => encodeMessage('R', int32s(3))

/** The parameters of a StartupMessage body (after length and protocol version). */
export function parseStartupParameters(body: Buffer): Record<string, string> {
  const params: Record<string, string> = {}
  const fields = body.toString('utf8').split('\0')
  for (let i = 0; i + 1 < fields.length && fields[i] !== ''; i += 2) params[fields[i]] = fields[i + 1]
  return params
}

export function startupMessage(params: Record<string, string>): Buffer {
  const body = Buffer.from(
    Object.entries(params)
      .map(([key, value]) => `${key}\0${value}\0`)
      .join('') + '\0',
  )
  return Buffer.concat([int32s(8 + body.length, PROTOCOL_3), body])
}

export const terminateMessage = (): Buffer => encodeMessage('X', Buffer.alloc(0))

/** The text of a PasswordMessage body, without its terminating NUL. */
export function passwordText(body: Buffer): string {
  const end = body.indexOf(0)
  return body.toString('utf8', 0, end < 0 ? body.length : end)
}

/**
 * Exactly `n` bytes from a paused stream. Bytes beyond them stay buffered in the stream, so
 * a later `pipe()` or TLS layer sees them: nothing read ahead is lost.
 */
export function readBytes(stream: Readable, n: number): Promise<Buffer> {
  if (n === 0) return Promise.resolve(Buffer.alloc(0))
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      stream.off('readable', attempt)
      stream.off('end', onClosed)
      stream.off('close', onClosed)
      stream.off('error', onError)
    }
    const attempt = (): boolean => {
      const chunk = stream.read(n) as Buffer | null
      if (chunk === null) return false
      cleanup()
      if (chunk.length === n) resolve(chunk)
      else reject(new Error('connection closed'))
      return true
    }
    const onClosed = () => {
      if (attempt()) return
      cleanup()
      reject(new Error('connection closed'))
    }
    const onError = (err: Error) => {
      cleanup()
      reject(err)
    }
    if (attempt()) return
    // 'end' or 'close' may already be behind us: waiting for them would hang.
    if (stream.destroyed || stream.readableEnded) return reject(new Error('connection closed'))
    stream.on('readable', attempt)
    stream.on('end', onClosed)
    stream.on('close', onClosed)
    stream.on('error', onError)
  })
}

/** One typed message (type byte, int32 length, body), refusing lengths above `maxLength`. */
export async function readMessage(stream: Readable, maxLength = 1 << 30): Promise<Message> {
  const header = await readBytes(stream, 5)
  const length = header.readUInt32BE(1)
  if (length < 4 || length > maxLength) throw new Error('invalid message length')
  return { type: String.fromCharCode(header[0]), body: await readBytes(stream, length - 4) }
}

export function int32s(...values: number[]): Buffer {
  const buffer = Buffer.alloc(values.length * 4)
  values.forEach((value, i) => buffer.writeUInt32BE(value >>> 0, i * 4))
  return buffer
}


/** A typed message: type byte, int32 length (itself included), body. */
export function encodeMessage(type: string, body: Buffer): Buffer {
  const header = Buffer.alloc(5)
  header.write(type, 0, 'latin1')
  header.writeUInt32BE(4 + body.length, 1)
  return Buffer.concat([header, body])
}
