import type postgres from 'postgres'
import { checkRetry, definedOnly, type DsqlLogger, type RetryOptions } from './config'
import { DsqlError } from './errors'

/** Every attempt of an OCC-retried call conflicted; `cause` is the last conflict. */
export class DsqlRetryError extends DsqlError {
  readonly attempts: number
  constructor(attempts: number, cause: unknown) {
    const last = cause instanceof Error ? cause.message : String(cause)
    super('DSQL_OCC_RETRIES_EXHAUSTED', `Gave up after ${attempts} attempts, each an optimistic concurrency conflict; the last: ${last}`, { cause })
    this.attempts = attempts
  }
}

/**
 * True for DSQL's optimistic concurrency conflicts: SQLSTATE 40001, or OC000 (data) / OC001
 * (schema) in the message. Follows `cause` chains, since ORMs wrap driver errors.
 */
export function isOccError(err: unknown): boolean {
  let e = err
  for (let depth = 0; e && typeof e === 'object' && depth < 16; depth++) {
    if (e instanceof DsqlRetryError) return false
    const { code, message, cause } = e as { code?: unknown; message?: unknown; cause?: unknown }
    if (code === '40001' || /\bOC00[01]\b/.test(typeof message === 'string' ? message : '')) return true
    e = cause
  }
  return false
}

const DEFAULTS: Required<RetryOptions> = { maxRetries: 10, baseDelayMs: 20, maxDelayMs: 2000, jitterFactor: 1, deadlineMs: 30_000 }

/** The defaults, overridden by each setting given; an `undefined` one keeps its default. */
export function retrySettings(retry: boolean | RetryOptions | undefined): Required<RetryOptions> {
  if (typeof retry !== 'object' || retry === null) return { ...DEFAULTS }
  checkRetry(retry as Record<string, unknown>)
  return { ...DEFAULTS, ...definedOnly(retry) }
}

/**
 * Runs `attempt` until it succeeds, fails with something other than an OCC conflict (surfaced
 * at once, unchanged), or runs out of attempts or time. `attempt` must start its own transaction
 * each time and be idempotent apart from the database.
 */
export async function retryOcc<R>(attempt: () => Promise<R>, options?: RetryOptions, logger?: DsqlLogger): Promise<R> {
  const s = retrySettings(options)
  const deadline = Date.now() + s.deadlineMs
  for (let n = 1; ; n++) {
    try {
      return await attempt()
    } catch (err) {
      if (!isOccError(err)) throw err
      const ceiling = Math.min(s.maxDelayMs, s.baseDelayMs * 2 ** (n - 1))
      const delay = Math.round(ceiling * (1 - s.jitterFactor) + ceiling * s.jitterFactor * Math.random())
      if (n > s.maxRetries || Date.now() + delay > deadline) throw new DsqlRetryError(n, err)
      logger?.warn?.('dsql: optimistic concurrency conflict; retrying', { attempt: n, delayMs: delay })
      await new Promise((resolve) => setTimeout(resolve, delay))
    }
  }
}

type Unwrapped<T> = T extends unknown[] ? { [K in keyof T]: T[K] extends Promise<infer R> ? R : T[K] } : T

/** postgres.js's `sql.begin`, plus a last argument with this call's OCC retry settings. */
export interface RetryBegin<TTypes extends Record<string, unknown>> {
  <T>(cb: (sql: postgres.TransactionSql<TTypes>) => T | Promise<T>, retry: boolean | RetryOptions): Promise<Unwrapped<T>>
  <T>(options: string, cb: (sql: postgres.TransactionSql<TTypes>) => T | Promise<T>, retry: boolean | RetryOptions): Promise<Unwrapped<T>>
}

/**
 * Wraps `sql.begin`: it retries OCC conflicts with the `dsql()` settings, or with those of a
 * last argument (`true`, `false` or options) for this call. Queries are untouched.
 */
export function withRetry<S extends { begin: unknown }>(sql: S, retry: boolean | RetryOptions | undefined, logger?: DsqlLogger): S {
  const begin = sql.begin as (...args: unknown[]) => Promise<unknown>
  const wrapped = (...args: unknown[]) => {
    const last = args[args.length - 1]
    const own = typeof last === 'boolean' || (typeof last === 'object' && last !== null) ? (args.pop() as boolean | RetryOptions) : undefined
    const settings = own ?? retry
    if (!settings) return begin(...args)
    let resolved: Required<RetryOptions>
    try {
      resolved = retrySettings(settings)
    } catch (err) {
      return Promise.reject(err)
    }
    return retryOcc(() => begin(...args), resolved, logger)
  }
  return Object.assign(sql, { begin: wrapped })
}
