/** DSQL's connection quotas, adjustable per gateway so that tests can hit them quickly. */
import { performance } from 'node:perf_hooks'

export interface ConnectionRate {
  perSecond: number
  burst: number
}

export interface Limits {
  /** The socket closes this long after it was accepted (DSQL: 60 minutes). */
  maxConnectionDurationSecs: number
  /** Open sessions at once (DSQL: 10,000); more get 53300. */
  maxConnections: number
  /** New connections as a token bucket (DSQL: 100/s, burst 1,000); excess gets 53400. */
  connectionRate: ConnectionRate
  /** Added round trip, half each way, on every byte including the TLS handshake. */
  latencyMs: number
  /**
   * Leave Nagle's algorithm on towards the client (no TCP_NODELAY), as a TCP server does by
   * default: small writes wait for the client's (delayed) ACK. Whether DSQL sets it is not known.
   */
  nagle: boolean
  /** Answer new connections as a cluster that is still waking up. */
  wakingUp: boolean
}

export const DEFAULT_LIMITS: Limits = {
  maxConnectionDurationSecs: 3600,
  maxConnections: 10_000,
  connectionRate: { perSecond: 100, burst: 1000 },
  latencyMs: 0,
  nagle: false,
  wakingUp: false,
}

/** `base` with the defined fields of `change`, each checked: a typo must not pass silently. */
export function mergeLimits(base: Limits, change: Partial<Limits>): Limits {
  const next = { ...base }
  for (const [key, value] of Object.entries(change)) {
    if (value === undefined) continue
    switch (key) {
      case 'maxConnectionDurationSecs':
      case 'maxConnections':
      case 'latencyMs':
        next[key] = nonNegative(key, value)
        break
      case 'connectionRate':
        next.connectionRate = rate(value)
        break
      case 'wakingUp':
      case 'nagle':
        expect(typeof value === 'boolean', key, value)
        next[key] = value as boolean
        break
      default:
        throw new TypeError(`Unknown limit ${key}`)
    }
  }
  return next
}

function rate(value: unknown): ConnectionRate {
  const given = (value ?? {}) as Partial<ConnectionRate>
  return { perSecond: nonNegative('connectionRate.perSecond', given.perSecond), burst: nonNegative('connectionRate.burst', given.burst) }
}

function nonNegative(name: string, value: unknown): number {
  expect(typeof value === 'number' && Number.isFinite(value) && value >= 0, name, value)
  return value as number
}

function expect(ok: boolean, name: string, value: unknown): void {
  if (!ok) throw new TypeError(`Invalid limit ${name}: ${JSON.stringify(value)}`)
}

/** Starts full; refills continuously at `perSecond`, up to `burst`. */
export class TokenBucket {
  private tokens: number
  private last = performance.now()

  constructor(private readonly rate: ConnectionRate) {
    this.tokens = rate.burst
  }

  take(): boolean {
    const now = performance.now()
    this.tokens = Math.min(this.rate.burst, this.tokens + ((now - this.last) / 1000) * this.rate.perSecond)
    this.last = now
    if (this.tokens < 1) return false
    this.tokens -= 1
    return true
  }
}
