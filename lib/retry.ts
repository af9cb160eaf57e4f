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

/**
 * The connection was lost after the transaction's callback finished, so its COMMIT may have been
 * applied or not: it is not retried (nothing may run twice). Check whether its effects are
 * there before running it again. `cause` is the connection error.
 */
export class DsqlCommitUnknownError extends DsqlError {
  constructor(cause: unknown) {
    const said = cause instanceof Error ? cause.message : String(cause)
    super(
      'DSQL_COMMIT_UNKNOWN',
      `The connection was lost while the transaction was committing (${said}): it may or may not have been applied. It was not retried; check its effects before running it again.`,
      { cause },
    )
  }
}

/**
 * postgres.js's codes for a connection that went away under a query (not sql.end()), and for one
 * that could not be opened (then nothing of the transaction ran).
 */
const LOST = new Set(['CONNECTION_CLOSED', 'CONNECTION_DESTROYED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'CONNECT_TIMEOUT', 'ECONNREFUSED'])

/** True when `err` says the connection died under the transaction, not that the server refused something. */
export function isConnectionLost(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && LOST.has(code)
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
  return retryWhile(attempt, isOccError, retrySettings(options), logger)
}

async function retryWhile<R>(attempt: () => Promise<R>, retryable: (err: unknown) => boolean, s: Required<RetryOptions>, logger?: DsqlLogger): Promise<R> {
  const deadline = Date.now() + s.deadlineMs
  for (let n = 1; ; n++) {
    try {
      return await attempt()
    } catch (err) {
      if (!retryable(err)) throw err
      const ceiling = Math.min(s.maxDelayMs, s.baseDelayMs * 2 ** (n - 1))
      const delay = Math.round(ceiling * (1 - s.jitterFactor) + ceiling * s.jitterFactor * Math.random())
      if (n > s.maxRetries || Date.now() + delay > deadline) throw new DsqlRetryError(n, err)
      if (isOccError(err)) logger?.warn?.('dsql: optimistic concurrency conflict; retrying', { attempt: n, delayMs: delay })
      else logger?.warn?.('dsql: connection lost before COMMIT; retrying the transaction', { attempt: n, delayMs: delay, code: (err as { code?: string }).code })
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
 * last argument (`true`, `false` or options) for this call. A transaction whose connection was
 * lost before its callback finished never reached COMMIT: it is retried too. One lost after,
 * while committing, fails with DsqlCommitUnknownError. Queries are untouched.
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
    const callback = args.findIndex((a) => typeof a === 'function')
    if (callback < 0) return begin(...args)
    const fn = args[callback] as (...a: unknown[]) => unknown
    return retryWhile(
      async () => {
        // postgres.js sends COMMIT only after the callback settled: past this point, a lost connection leaves the outcome unknown.
        let committing = false
        const tracked = [...args]
        tracked[callback] = async (...a: unknown[]) => {
          const x = fn(...a)
          // As postgres.js does: an array of queries is awaited as a whole.
          const result = await (Array.isArray(x) ? Promise.all(x) : x)
          committing = true
          return result
        }
        try {
          return await begin(...tracked)
        } catch (err) {
          if (committing && isConnectionLost(err)) throw new DsqlCommitUnknownError(err)
          throw err
        }
      },
      (err) => isOccError(err) || isConnectionLost(err),
      resolved,
      logger,
    )
  }
  return Object.assign(sql, { begin: wrapped })
}
