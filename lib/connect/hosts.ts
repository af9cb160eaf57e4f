import type { DsqlConfig, DsqlLogger } from '../config'
import { DsqlConnectionError, type DsqlError } from '../errors'

/** First cool-off of an endpoint that failed to connect; it doubles with each failure in a row. */
const FIRST_COOL_OFF_MS = 2000
const MAX_COOL_OFF_MS = 60_000

interface Health {
  /** Failures in a row. */
  strikes: number
  /** Not preferred before this time (ms since epoch). */
  downUntil: number
  /** Why it last failed, for the error that names every endpoint. */
  reason?: string
}

/** What `sql.options.dsql` shows of each endpoint. */
export interface EndpointState {
  host: string
  region: string
  /** When the endpoint is cooling off after failures: until then, others are preferred. */
  downUntil?: Date
  lastError?: string
}

/**
 * The endpoints of a (multi-Region) cluster in the order to try them: the ones not cooling off,
 * in the order given (the application's own Region first), then the ones cooling off, the
 * soonest back first. A failure puts an endpoint in cool-off (2 s, doubling to 60 s); when it
 * ends, new connections prefer that endpoint again (fail-back).
 */
export class Hosts {
  private readonly health = new Map<DsqlConfig, Health>()
  /** The endpoint the last connection went to. */
  last: DsqlConfig | undefined

  constructor(
    readonly endpoints: DsqlConfig[],
    private readonly logger?: DsqlLogger,
  ) {
    for (const e of endpoints) this.health.set(e, { strikes: 0, downUntil: 0 })
  }

  get multi(): boolean {
    return this.endpoints.length > 1
  }

  order(now = Date.now()): DsqlConfig[] {
    const up = this.endpoints.filter((e) => this.state(e).downUntil <= now)
    const down = this.endpoints.filter((e) => this.state(e).downUntil > now).sort((a, b) => this.state(a).downUntil - this.state(b).downUntil)
    return [...up, ...down]
  }

  down(endpoint: DsqlConfig, error: DsqlError, now = Date.now()): void {
    const h = this.state(endpoint)
    const wasUp = h.downUntil <= now
    h.strikes++
    const coolOff = Math.min(MAX_COOL_OFF_MS, FIRST_COOL_OFF_MS * 2 ** (h.strikes - 1))
    h.downUntil = now + coolOff
    h.reason = error.message
    const fields = { host: endpoint.host, region: endpoint.region, coolOffMs: coolOff, code: error.code, message: error.message }
    // Once as it goes down, not for every connection that finds it still down.
    if (wasUp) this.logger?.warn?.('dsql: endpoint failed; new connections go to the next one', fields)
    else this.logger?.debug?.('dsql: endpoint still failing', fields)
  }

  up(endpoint: DsqlConfig): void {
    const h = this.state(endpoint)
    if (h.strikes > 0) this.logger?.warn?.('dsql: endpoint answers again', { host: endpoint.host, region: endpoint.region })
    h.strikes = 0
    h.downUntil = 0
    h.reason = undefined
    this.last = endpoint
  }

  /** Every endpoint failed in one pass: one error that names each and why. */
  allFailed(failures: [DsqlConfig, DsqlError][]): DsqlConnectionError {
    const each = failures.map(([e, err]) => `${e.host} (${e.region}): ${err.message.replace(/\.$/, '')}`).join('; ')
    const codes = new Set(failures.map(([, err]) => err.code))
    return new DsqlConnectionError(`No endpoint of the cluster could be reached: ${each}.`, {
      retryable: failures.some(([, err]) => err instanceof DsqlConnectionError && err.retryable),
      code: codes.size === 1 ? [...codes][0] : undefined,
      cause: failures[failures.length - 1][1],
    })
  }

  snapshot(now = Date.now()): EndpointState[] {
    return this.endpoints.map((e) => {
      const h = this.state(e)
      return { host: e.host, region: e.region, ...(h.downUntil > now ? { downUntil: new Date(h.downUntil) } : {}), ...(h.reason ? { lastError: h.reason } : {}) }
    })
  }

  private state(e: DsqlConfig): Health {
    return this.health.get(e) as Health
  }
}
