/**
 * The local DSQL stand-in, run in a child process so that its TLS handshakes, token checks and
 * relaying do not share the measured process's event loop, CPU time or memory. On its way up the
 * child also measures the stand-in's start-up: cold (first start in a process) and warm (second).
 */
import type { ChildProcess } from 'node:child_process'
import { performance } from 'node:perf_hooks'
import type { AwsCredentialIdentity } from '@smithy/types'
import type { LocalDsql, LocalDsqlOptions, LocalDsqlStats } from '../lib/local'
import { firstMessage, forkTs, withTimeout } from './util'

/** What a client needs to reach the stand-in. */
export interface Target {
  host: string
  hostaddr: string
  port: number
  region: string
  ca: string
  caFile: string
  credentials: AwsCredentialIdentity
}

/** Milliseconds from the startLocalDsql() call to: it resolved, the first row of `select 1`. */
export interface Startup {
  cold: { readyMs: number; firstRowMs: number }
  warm: { readyMs: number; firstRowMs: number }
}

export interface StandIn {
  target: Target
  startup: Startup
  /** Simulated round trip for new connections; `nagle`: the server leaves Nagle's algorithm on (default off). */
  setLatency(ms: number, nagle?: boolean): Promise<void>
  stats(): Promise<LocalDsqlStats>
  stop(): Promise<void>
}

type Call = { op: 'latency'; ms: number; nagle: boolean } | { op: 'stats' } | { op: 'stop' }
type Request = Call & { id: number }
type Reply = { id: number; stats?: LocalDsqlStats; error?: string }
type Hello = { target: Target; startup: Startup } | { error: string }

const OPTIONS: LocalDsqlOptions = {
  roles: ['appuser'],
  latencyMs: 0,
  // The bench opens thousands of connections in minutes: DSQL's 100/s would throttle it.
  connectionRate: { perSecond: 10_000, burst: 10_000 },
  maxConnections: 100_000,
}
const CALL_TIMEOUT_MS = 30_000

export async function startStandIn(): Promise<StandIn> {
  const child = forkTs(__filename, ['--child'], {}, true)
  const hello = await firstMessage<Hello>(child, 120_000, 'stand-in process')
  if ('error' in hello) throw new Error(`stand-in did not start: ${hello.error}`)
  const call = rpc(child)
  return {
    ...hello,
    setLatency: async (ms, nagle = false) => void (await call({ op: 'latency', ms, nagle })),
    stats: async () => (await call({ op: 'stats' })).stats!,
    stop: async () => {
      const exited = new Promise((resolve) => (child.exitCode === null ? child.once('exit', resolve) : resolve(null)))
      await call({ op: 'stop' }).catch(() => undefined)
      await withTimeout(exited, 15_000, 'stand-in exit').catch(() => child.kill())
    },
  }
}

function rpc(child: ChildProcess): (request: Call) => Promise<Reply> {
  let next = 1
  const pending = new Map<number, (reply: Reply) => void>()
  child.on('message', (message) => pending.get((message as Reply).id)?.(message as Reply))
  return (request) => {
    const id = next++
    const answered = new Promise<Reply>((resolve, reject) => {
      pending.set(id, (reply) => (reply.error ? reject(new Error(reply.error)) : resolve(reply)))
      child.send({ ...request, id } satisfies Request)
    })
    return withTimeout(answered, CALL_TIMEOUT_MS, `stand-in ${request.op}`).finally(() => pending.delete(id))
  }
}

/** In the child: start, time, stop; start again, time, serve requests until told to stop. */
async function child(): Promise<void> {
  const send = (message: Hello | Reply) => process.send?.(message)
  // Loaded here, not at the top: the parent imports this file for startStandIn() only.
  const { startLocalDsql } = await import('../lib/local')
  const { dsql } = await import('../lib')

  const timedStart = async () => {
    const started = performance.now()
    const local = await startLocalDsql(OPTIONS)
    const readyMs = performance.now() - started
    const sql = dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, max: 1 })
    await withTimeout(sql`select 1`, 30_000, 'first query')
    const firstRowMs = performance.now() - started
    await sql.end({ timeout: 5 })
    return { local, times: { readyMs, firstRowMs } }
  }

  let local: LocalDsql | undefined
  try {
    const cold = await timedStart()
    await cold.local.stop()
    const warm = await timedStart()
    local = warm.local
    const { host, hostaddr, port, region, ca, caFile, credentials } = local
    send({ target: { host, hostaddr, port, region, ca, caFile, credentials }, startup: { cold: cold.times, warm: warm.times } })
  } catch (err) {
    send({ error: err instanceof Error ? err.message : String(err) })
    await local?.stop()
    process.exit(1)
  }
  const running = local
  const stop = async () => {
    await running.stop()
    process.exit(0)
  }
  // The parent went away without asking: leave nothing behind.
  process.on('disconnect', () => void stop())
  process.on('message', (message: Request) => {
    try {
      if (message.op === 'latency') void running.setLimits({ latencyMs: message.ms, nagle: message.nagle })
      if (message.op === 'stop') return void running.stop().finally(() => process.send?.({ id: message.id }, () => process.exit(0)))
      send({ id: message.id, stats: message.op === 'stats' ? running.stats() : undefined })
    } catch (err) {
      send({ id: message.id, error: err instanceof Error ? err.message : String(err) })
    }
  })
}

if (require.main === module && process.argv.includes('--child')) void child()
