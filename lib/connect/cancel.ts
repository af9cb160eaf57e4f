import type { DsqlConfig, DsqlLogger } from '../config'
import { dial } from './dial'

/**
 * A CancelRequest needs only a TLS connection to the same endpoint and the cancel key: no token,
 * no startup, no pool slot. The server closes the connection once it has read the request.
 * Never rejects: a cancel that could not be delivered is logged.
 */
export async function sendCancel(request: Buffer, config: DsqlConfig, logger: DsqlLogger | undefined): Promise<void> {
  try {
    const stream = await dial(config, Date.now() + config.connectTimeoutMs)
    await new Promise<void>((resolve) => {
      stream.on('error', () => undefined)
      stream.once('close', resolve)
      stream.end(request)
      // The server normally closes at once; do not hold the caller if it does not.
      setTimeout(() => stream.destroy(), 5000).unref()
    })
  } catch (err) {
    logger?.warn?.('dsql: could not send the cancel request', { host: config.host, message: (err as Error).message })
  }
}
