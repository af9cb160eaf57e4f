/**
 * Message framing for the relay, after authentication: a byte stream cut into whole messages
 * (type byte, int32 length, body) without copying, and the handful of message bodies the relay
 * reads or writes (Query, Parse, Bind, Execute, CommandComplete, ReadyForQuery, errors).
 */
import { encodeMessage, parseErrorFields, type ErrorFields } from './protocol'

/** Type byte of a whole message as a one-character string. */
export const typeOf = (message: Buffer): string => String.fromCharCode(message[0])

/** NUL-terminated string at `offset` of a whole message; returns it and the offset after it. */
function cstring(message: Buffer, offset: number): [string, number] {
  const end = message.indexOf(0, offset)
  const stop = end < 0 ? message.length : end
  return [message.toString('utf8', offset, stop), stop + 1]
}

const cstr = (text: string): Buffer => Buffer.from(text + '\0', 'utf8')

/** Query ('Q'): the SQL text. */
export const queryText = (message: Buffer): string => cstring(message, 5)[0]
export { queryMessage } from '../wire'

export interface ParseMessage {
  name: string
  query: string
  /** Parameter count and type OIDs, kept as they came. */
  params: Buffer
}

export function readParse(message: Buffer): ParseMessage {
  const [name, next] = cstring(message, 5)
  const [query, rest] = cstring(message, next)
  return { name, query, params: message.subarray(rest) }
}

export const parseMessage = (parse: ParseMessage): Buffer => encodeMessage('P', Buffer.concat([cstr(parse.name), cstr(parse.query), parse.params]))

/** Bind ('B'): the portal it creates and the statement it binds. */
export function readBind(message: Buffer): { portal: string; statement: string } {
  const [portal, next] = cstring(message, 5)
  return { portal, statement: cstring(message, next)[0] }
}

/** A Bind of `statement` with no parameters and default formats. */
export const bindMessage = (portal: string, statement: string): Buffer =>
  encodeMessage('B', Buffer.concat([cstr(portal), cstr(statement), Buffer.alloc(6)]))

/** Execute ('E') and Describe/Close of a portal or statement: the name they refer to. */
export const executePortal = (message: Buffer): string => cstring(message, 5)[0]
/** Describe ('D') or Close ('C'): 'S' (statement) or 'P' (portal), and the name. */
export const targetOf = (message: Buffer): { kind: string; name: string } => ({ kind: String.fromCharCode(message[5]), name: cstring(message, 6)[0] })

/** CommandComplete ('C') from the server: its tag. */
export const commandTag = (message: Buffer): string => cstring(message, 5)[0]
export const commandComplete = (tag: string): Buffer => encodeMessage('C', cstr(tag))

/** ReadyForQuery ('Z'): 'I' idle, 'T' in a transaction block, 'E' in a failed one. */
export const transactionStatus = (message: Buffer): string => String.fromCharCode(message[5])

/** ParameterStatus ('S'): name and value. */
export function readParameterStatus(message: Buffer): [string, string] {
  const [name, next] = cstring(message, 5)
  return [name, cstring(message, next)[0]]
}
export const parameterStatus = (name: string, value: string): Buffer => encodeMessage('S', Buffer.concat([cstr(name), cstr(value)]))

/** Fields of an ErrorResponse or NoticeResponse message, by one-letter code. */
export const errorFieldsOf = (message: Buffer): Record<string, string> => parseErrorFields(message.subarray(5))

/** An ErrorResponse (or with type 'N', a NoticeResponse) from raw fields, in the given order. */
export function errorFromFields(fields: Record<string, string>, type: 'E' | 'N' = 'E'): Buffer {
  const body = Object.entries(fields)
    .map(([key, value]) => `${key}${value}\0`)
    .join('')
  return encodeMessage(type, Buffer.from(body + '\0', 'utf8'))
}

export type { ErrorFields }
