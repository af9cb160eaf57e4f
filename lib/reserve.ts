import { DsqlConnectionError, DsqlError } from './errors'
import type { Handover } from './connect/handover'
import { PROBE_PREFIX, probes } from './connect/handover'

/** What this file needs of a postgres.js Query: a promise whose handler runs it. */
interface PgQuery extends Promise<unknown> {
  handler: Handler
  cancelled: unknown
  reject(error: unknown): void
}
type Handler = ((query: PgQuery) => unknown) & { debug?: unknown }

interface Reserved {
  (...args: unknown[]): unknown
  unsafe(...args: unknown[]): unknown
  file(...args: unknown[]): unknown
  release(): void
}

interface ConnectionState {
  /** Nothing reaches the server any more. */
  gone(): boolean
  /** postgres.js has dropped the socket: nothing may be written on this connection any more. */
  closed(): boolean
  /** Closes a lost connection (postgres.js keeps one lost inside a transaction); `release` if sql.end() waits for it. */
  discard(release: () => void): void
}

let lastProbe = 0

/**
 * `sql.reserve()` that survives the loss of its connection. postgres.js 3.4.9 (issues 1199, 1208)
 * puts a lost reserved connection back in the pool on release(), and runs the reserved sql's
 * queries on it after the loss, both with no socket: its next write throws in a timer and ends
 * the process. Here the reserved sql knows its connection's stream (a probe that stream answers
 * itself, with no round trip); once the stream is gone its queries fail with a typed
 * CONNECTION_CLOSED, and release() after the close is a no-op (postgres.js already took the slot back).
 *
 * Also, postgres.js drops a reserve() that was waiting when a connection closed (it reconnects
 * that slot for the reserve, then forgets it): the next new connection asks again for those.
 */
export function reserveGuard() {
  /** Reserve calls still waiting, each with a function that asks postgres.js once more. */
  const waiting = new Set<() => void>()
  /** Those that were waiting when a connection closed: postgres.js may have dropped them. */
  const dropped = new Set<() => void>()

  function install<S extends { reserve: () => Promise<unknown> }>(sql: S): void {
    const reserve = sql.reserve.bind(sql) as () => Promise<Reserved>
    /** A reserved connection, and whether it had to wait for one (then it may be a lost one). */
    const once = () =>
      new Promise<[Reserved, boolean]>((resolve, reject) => {
        let done = false
        let retries = 0
        let waited = false
        const turn = setImmediate(() => (waited = true))
        const ask = () =>
          void reserve().then(
            (reserved) => {
              // A second ask answered too: the extra connection goes back.
              if (done) return reserved.release()
              done = true
              clearImmediate(turn)
              waiting.delete(ask)
              dropped.delete(ask)
              resolve([reserved, waited])
            },
            (err: unknown) => {
              if (done) return
              // The slot it waited for was reconnected for it after a loss, and postgres.js failed
              // it with that loss's error (a FATAL it kept): it waits again, a few times.
              if (lostBefore(err) && ++retries <= 3) return ask()
              done = true
              clearImmediate(turn)
              waiting.delete(ask)
              dropped.delete(ask)
              reject(err)
            },
          )
        waiting.add(ask)
        ask()
      })
    sql.reserve = async () => {
      for (let attempt = 1; ; attempt++) {
        const [reserved, waited] = await once()
        const [state, probed] = identify(reserved)
        // An idle connection is used at once: the probe goes out with the first query. One that
        // came after a wait may be one that was just lost (see Handover.lost): it is not returned,
        // its slot comes back when it closes.
        if (!waited || attempt === 3) return guard(reserved, state)
        await probed
        if (!state.gone()) return guard(reserved, state)
      }
    }
  }

  return {
    install,
    /** A reserve() waits: postgres.js hands it the next connection that reports ready (see Handover.lost). */
    reserving: (): boolean => waiting.size > 0,
    /** A connection closed: postgres.js reconnects its slot for the first query waiting, perhaps a reserve. */
    closed: (): void => waiting.forEach((ask) => dropped.add(ask)),
    /** A new connection is ready: by the next turn postgres.js has served the reserves it still knows. */
    opened: (): void => {
      if (!dropped.size) return
      setImmediate(() => {
        const asks = [...dropped]
        dropped.clear()
        asks.forEach((ask) => waiting.has(ask) && ask())
      })
    },
  }
}

/** Sends the probe on the reserved connection, to follow that connection's state from then on. */
function identify(reserved: Reserved): [ConnectionState, Promise<unknown>] {
  const id = ++lastProbe
  const holder: { stream?: Handover } = {}
  probes.set(id, holder)
  let failed = false
  const settled = (reserved.unsafe(PROBE_PREFIX + id) as PgQuery).then(
    () => probes.delete(id),
    () => ((failed = true), probes.delete(id)),
  )
  // Until its stream has read the probe, the connection is the one postgres.js just handed over.
  const state = {
    gone: () => (holder.stream ? holder.stream.gone : failed),
    closed: () => (holder.stream ? holder.stream.destroyed : failed),
    discard: (release: () => void) => holder.stream?.discard(release),
  }
  return [state, settled]
}

function guard(reserved: Reserved, { gone, closed, discard }: ConnectionState): Reserved {
  const lost = () => (gone() ? new DsqlConnectionError('The reserved connection was lost: release it and reserve another.', { retryable: true, code: 'CONNECTION_CLOSED' }) : null)
  let released = false
  return guardQueries(reserved, lost, {
    release: () => {
      if (released) return
      released = true
      // postgres.js would put a lost connection back in the pool: after its close, with no socket.
      if (!gone()) reserved.release()
      else if (!closed()) discard(() => reserved.release())
    },
  })
}

/**
 * A postgres.js sql (reserved, or a transaction's) whose queries fail with `refusal()` when it
 * gives an error, and are never handed to postgres.js once cancelled (postgres.js would leave
 * the connection waiting for a query it never sends). `own` replaces members of `sql`.
 */
export function guardQueries<T extends Pick<Reserved, 'unsafe' | 'file'> & ((...args: unknown[]) => unknown)>(sql: T, refusal: () => Error | null = () => null, own: Partial<T> = {}): T {
  // The queries of one sql share postgres.js's handler: one guarded handler serves them all.
  let handler: Handler | undefined
  let guardedHandler: Handler | undefined
  const guarded = (query: unknown) => {
    if (!isQuery(query)) return query
    if (query.handler !== handler) {
      const original = (handler = query.handler)
      guardedHandler = Object.assign(
        (q: PgQuery) => {
          if (q.cancelled) return
          const error = refusal()
          return error ? q.reject(error) : original(q)
        },
        { debug: original.debug },
      )
    }
    query.handler = guardedHandler!
    return query
  }
  const members: Partial<T> = {
    unsafe: (...args: unknown[]) => guarded(sql.unsafe(...args)),
    file: (...args: unknown[]) => guarded(sql.file(...args)),
    ...own,
  } as Partial<T>
  // Own keys only: `in` would also find Object.prototype's (constructor, toString, __proto__).
  return new Proxy(sql, {
    apply: function call(target, self, args) {
      return guarded(keepOrigin(Reflect.apply(target, self, args), args[0], call))
    },
    get: (target, key, receiver) => (Object.hasOwn(members, key) ? members[key as keyof T] : Reflect.get(target, key, receiver)),
  })
}

/** Per call site (a tagged template's strings), as postgres.js caches it: the caller's own frame. */
const origins = new WeakMap<object, Error>()

/**
 * postgres.js records where a tagged query was written (4 frames: its own 3, then the caller's)
 * and appends that line to the query's errors. Called through this Proxy, the 4th frame would be
 * the Proxy's: so the query gets the caller's frame instead, taken once per call site.
 */
function keepOrigin(query: unknown, strings: unknown, call: (...args: never[]) => unknown): unknown {
  if (!isQuery(query) || !(query as { tagged?: boolean }).tagged || query.handler.debug || typeof strings !== 'object' || strings === null) return query
  const key = Object.getOwnPropertySymbols(query).find((s) => s.description === 'OriginError')
  if (!key) return query
  let origin = origins.get(strings)
  if (!origin) {
    const limit = Error.stackTraceLimit
    Error.stackTraceLimit = 1
    origin = new Error()
    Error.captureStackTrace(origin, call)
    Error.stackTraceLimit = limit
    origins.set(strings, origin)
  }
  ;(query as unknown as Record<symbol, Error>)[key] = origin
  return query
}

/**
 * `sql.begin` whose transaction sql refuses queries once the transaction failed: postgres.js
 * 3.4.9 runs them on the connection anyway, which after a loss has no socket (the process
 * crashes in nextWrite), and otherwise runs them outside any transaction.
 */
export function guardBegin<S extends { begin: (...args: never[]) => Promise<unknown> }>(sql: S): void {
  const begin = sql.begin.bind(sql) as (...args: unknown[]) => Promise<unknown>
  sql.begin = ((...args: unknown[]) => {
    const at = args.findIndex((a) => typeof a === 'function')
    if (at < 0) return begin(...args)
    const fn = args[at] as (tx: unknown) => unknown
    let failure: { cause: unknown } | null = null
    const over = () =>
      failure && new DsqlError('TRANSACTION_OVER', `This transaction has ended (${describe(failure.cause)}): run the query in a new transaction.`, { cause: failure.cause })
    args[at] = (tx: Reserved) => fn(guardQueries(tx, over))
    const result = begin(...args)
    result.catch((cause: unknown) => void (failure = { cause }))
    return result
  }) as S['begin']
}

/** The errors postgres.js fails a waiting reserve() with when the connection before it was lost. */
function lostBefore(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return code === 'CONNECTION_CLOSED' || code === '57P01'
}

function describe(err: unknown): string {
  const e = err as { code?: unknown; message?: unknown } | null
  return typeof e?.code === 'string' ? `${e.code}: ${String(e.message)}` : String(e?.message ?? err)
}

function isQuery(value: unknown): value is PgQuery {
  return value instanceof Promise && typeof (value as Partial<PgQuery>).handler === 'function'
}
