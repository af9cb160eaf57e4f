import { DsqlConnectionError } from './errors'
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
  }
  return [state, settled]
}

function guard(reserved: Reserved, { gone, closed }: ConnectionState): Reserved {
  const guarded = (query: unknown) => {
    if (!isQuery(query)) return query
    const handler = query.handler
    query.handler = Object.assign(
      (q: PgQuery) => {
        // Cancelled before it was sent: postgres.js would leave the connection waiting for it.
        if (q.cancelled) return
        if (gone()) return q.reject(new DsqlConnectionError('The reserved connection was lost: release it and reserve another.', { retryable: true, code: 'CONNECTION_CLOSED' }))
        return handler(q)
      },
      { debug: handler.debug },
    )
    return query
  }
  let released = false
  const own: Partial<Reserved> = {
    unsafe: (...args) => guarded(reserved.unsafe(...args)),
    file: (...args) => guarded(reserved.file(...args)),
    release: () => {
      if (released) return
      released = true
      // Before the close, postgres.js moves the connection on to its closed ones; after it, not.
      if (!closed()) reserved.release()
    },
  }
  return new Proxy(reserved, {
    apply: (target, self, args) => guarded(Reflect.apply(target, self, args)),
    get: (target, key, receiver) => (key in own ? own[key as keyof Reserved] : Reflect.get(target, key, receiver)),
  })
}

function isQuery(value: unknown): value is PgQuery {
  return value instanceof Promise && typeof (value as Partial<PgQuery>).handler === 'function'
}
