/** The few PostgreSQL protocol messages the connector reads and writes itself, during startup only. */

export const SSL_REQUEST = int32s(8, 80877103)
const CANCEL_CODE = 80877102
const PROTOCOL_3 = 196608

/** Splits a byte stream into whole backend messages (type byte + int32 length + body). */
export class Frames {
  private buffer: Buffer = Buffer.alloc(0)

  push(chunk: Buffer): Buffer[] {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk
    const messages: Buffer[] = []
    while (this.buffer.length >= 5) {
      const end = this.buffer.readUInt32BE(1) + 1
      if (this.buffer.length < end) break
      messages.push(this.buffer.subarray(0, end))
      this.buffer = this.buffer.subarray(end)
    }
    return messages
  }

  /** Bytes of an incomplete message, handed on as they are. */
  rest(): Buffer {
    const rest = this.buffer
    this.buffer = Buffer.alloc(0)
    return rest
  }
}

export function startupMessage(params: Record<string, string>): Buffer {
  const body = Object.entries(params)
    .filter(([, v]) => v !== '')
    .map(([k, v]) => `${k}\0${v}\0`)
    .join('')
  const payload = Buffer.from(body + '\0')
  return Buffer.concat([int32s(8 + payload.length, PROTOCOL_3), payload])
}

export const passwordMessage = (password: string): Buffer => typed('p', password + '\0')
export const queryMessage = (sql: string): Buffer => typed('Q', sql + '\0')
export const TERMINATE = typed('X', '')

export function isCancelRequest(chunk: Buffer): boolean {
  return chunk.length === 16 && chunk.readUInt32BE(0) === 16 && chunk.readUInt32BE(4) === CANCEL_CODE
}

/** The backend key (BackendKeyData's process id and secret) in a server's startup answer, as `pid:secret`. */
export function backendKey(startup: Buffer): string | undefined {
  for (let at = 0; at + 5 <= startup.length; at += 1 + startup.readUInt32BE(at + 1))
    if (startup[at] === 0x4b && at + 13 <= startup.length) return `${startup.readUInt32BE(at + 5)}:${startup.readUInt32BE(at + 9)}`
  return undefined
}

/** The backend key a CancelRequest names, as `pid:secret`. */
export const cancelKey = (request: Buffer): string => `${request.readUInt32BE(8)}:${request.readUInt32BE(12)}`

/** Fields of an ErrorResponse or NoticeResponse: S severity, C code, M message, H hint, ... */
export function errorFields(message: Buffer): Record<string, string> {
  const fields: Record<string, string> = {}
  let i = 5
  while (i < message.length && message[i] !== 0) {
    const end = message.indexOf(0, i + 1)
    fields[String.fromCharCode(message[i])] = message.toString('utf8', i + 1, end)
    i = end + 1
  }
  return fields
}

export function parameterStatus(message: Buffer): [string, string] {
  const nameEnd = message.indexOf(0, 5)
  return [message.toString('utf8', 5, nameEnd), message.toString('utf8', nameEnd + 1, message.length - 1)]
}

export function authCode(message: Buffer): number {
  return message.readUInt32BE(5)
}

/** Column names of a RowDescription. */
export function columnNames(message: Buffer): string[] {
  const names: string[] = []
  let i = 7
  for (let n = message.readUInt16BE(5); n > 0; n--) {
    const end = message.indexOf(0, i)
    names.push(message.toString('utf8', i, end))
    i = end + 1 + 18
  }
  return names
}

/** Text values of a DataRow, null for SQL NULL. */
export function rowValues(message: Buffer): (string | null)[] {
  const values: (string | null)[] = []
  let i = 7
  for (let n = message.readUInt16BE(5); n > 0; n--) {
    const length = message.readInt32BE(i)
    i += 4
    values.push(length < 0 ? null : message.toString('utf8', i, i + length))
    if (length > 0) i += length
  }
  return values
}

export function quoteIdentifier(name: string): string {
  return '"' + name.replace(/"/g, '""') + '"'
}

function typed(type: string, body: string): Buffer {
  const payload = Buffer.from(body)
  const header = Buffer.alloc(5)
  header.write(type, 0, 'latin1')
  header.writeUInt32BE(4 + payload.length, 1)
  return Buffer.concat([header, payload])
}

function int32s(...values: number[]): Buffer {
  const buffer = Buffer.alloc(values.length * 4)
  values.forEach((v, i) => buffer.writeUInt32BE(v, i * 4))
  return buffer
}
