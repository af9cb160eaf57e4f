import type { Duplex } from 'node:stream'
import type { DsqlConfig } from '../config'
import * as wire from '../wire'
import { dial } from './dial'

/** postgres.js opens a socket to cancel a query; the startup made for it is dropped. */
export function sendCancel(request: Buffer, session: Duplex, config: DsqlConfig): void {
  session.write(wire.TERMINATE)
  dial(config, Date.now() + config.connectTimeoutMs).then(
    (s) => {
      s.on('error', () => undefined)
      s.on('close', () => session.destroy())
      s.end(request)
    },
    (err: Error) => session.destroy(err),
  )
}
