/** Small helpers shared by the bench files: timeouts, statistics, child processes. */
import { fork, type ChildProcess } from 'node:child_process'

/** `promise`, or a rejection after `ms`: no step of the bench may hang. */
export async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer after ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Nearest-rank percentile, p in 0..100, of the finite values (a failed sample is NaN). */
export function percentile(values: number[], p: number): number {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b)
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]
}

export const median = (values: number[]) => percentile(values, 50)

/**
 * Runs a TypeScript file of this folder in a child process (transpile only: the parent was
 * type-checked). `serverSide`: under bench/wan.py, in the network namespace at the far end of the
 * simulated link (the stand-in's side).
 */
export function forkTs(file: string, args: string[], env: Record<string, string> = {}, serverSide = false): ChildProcess {
  const netns = serverSide ? process.env.WAN_SERVER_NETNS : undefined
  return fork(file, args, {
    ...(netns && { execPath: 'nsenter' }),
    execArgv: [...(netns ? [`--net=${netns}`, '--', process.execPath] : []), '-r', require.resolve('ts-node/register/transpile-only')],
    env: { ...process.env, ...env },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  })
}

/** The first IPC message of `child`, or an error if it exits or stays silent for `ms`. */
export function firstMessage<T>(child: ChildProcess, ms: number, what: string): Promise<T> {
  return withTimeout(
    new Promise<T>((resolve, reject) => {
      child.once('message', (message) => resolve(message as T))
      child.once('exit', (code, signal) => reject(new Error(`${what} exited (${signal ?? `code ${code}`}) before answering`)))
      child.once('error', reject)
    }),
    ms,
    what,
  )
}
