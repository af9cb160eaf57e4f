import type { Duplex } from 'node:stream'
import type { DsqlConfig, DsqlLogger } from '../config'
import * as wire from '../wire'
import { sendCancel } from './cancel'
import type { Started } from './startup'

type Write = (chunk: Buffer, ...rest: unknown[]) => boolean
type Emit = (event: string | symbol, ...args: unknown[]) => boolean

/**
 * postgres.js writes its own StartupMessage first: answer it with the recorded startup reply.
 * When a schema is to be selected, its SET rides in front of postgres.js's first query (no extra
 * round trip) and its reply is removed from the stream. Then the stream is left untouched.
 * A CancelRequest instead goes out on a connection of its own, as the protocol wants.
 */
export function handOver(stream: Duplex, { replay, pipelined }: Started, config: DsqlConfig, logger: DsqlLogger | undefined, drain: boolean): Duplex {
  const write = stream.write as Write
  stream.on('error', () => undefined)
  const patched = stream as unknown as { write: Write }
  patched.write = (chunk: Buffer, ...rest: unknown[]) => {
    const callback = rest.find((x): x is () => void => typeof x === 'function')
    if (wire.isCancelRequest(chunk)) {
      Reflect.deleteProperty(stream, 'write')
      sendCancel(chunk, stream, config)
    } else if (pipelined) {
      patched.write = (first: Buffer, ...more: unknown[]) => {
        Reflect.deleteProperty(stream, 'write')
        swallowReply(stream, logger)
        return write.call(stream, Buffer.concat([wire.queryMessage(pipelined), first]), ...more)
      }
      replayStartup(stream, replay, drain)
    } else {
      Reflect.deleteProperty(stream, 'write')
      replayStartup(stream, replay, drain)
    }
    if (callback) process.nextTick(callback)
    return true
  }
  return stream
}

function replayStartup(stream: Duplex, replay: Buffer, drain: boolean) {
  // Not synchronously: postgres.js is still inside its write call.
  process.nextTick(() => {
    stream.emit('data', replay)
    // A no-op when the first query already went out; hands over a connection opened for reserve().
    if (drain) stream.emit('drain')
    stream.resume()
  })
}

/** Removes the pipelined SET's reply (CommandComplete/Error .. ReadyForQuery) from what postgres.js reads. */
function swallowReply(stream: Duplex, logger: DsqlLogger | undefined) {
  const frames = new wire.Frames()
  const emit = stream.emit as Emit
  const patched = stream as unknown as { emit: Emit }
  patched.emit = (event: string | symbol, ...args: unknown[]) => {
    if (event !== 'data') return emit.call(stream, event, ...args)
    const kept: Buffer[] = []
    const messages = frames.push(args[0] as Buffer)
    let done = false
    for (const message of messages) {
      const type = String.fromCharCode(message[0])
      if (done || !'CEIZ'.includes(type)) kept.push(message)
      else if (type === 'E') logger?.warn?.('dsql: selecting the schema failed', { message: wire.errorFields(message).M })
      else if (type === 'Z') done = true
    }
    if (done) {
      Reflect.deleteProperty(stream, 'emit')
      kept.push(frames.rest())
    }
    const out = Buffer.concat(kept)
    return out.length ? emit.call(stream, 'data', out) : true
  }
}
