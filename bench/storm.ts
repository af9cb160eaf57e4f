/**
 * Connection storm: a pool of `size`, `size` queries at once, so that every query opens its own
 * connection. Each storm runs in a fresh process, so that its peak RSS is its own and not what an
 * earlier contender left on the heap.
 */
import { performance } from 'node:perf_hooks'
import type { AwsCredentialIdentity } from '@smithy/types'
import { byHand, official, ours, type Contender } from './contenders'
import type { Target } from './standin'
import { firstMessage, forkTs, withTimeout } from './util'

export interface StormResult {
  ok: number
  failed: number
  firstError?: string
  totalMs: number
  /** RSS just before the storm (modules loaded, pool created) and its peak during it, in MiB. */
  baseRssMb: number
  peakRssMb: number
  /** Calls of the credentials provider passed to the contender. */
  credentialResolutions: number
  /** CPU time (user + system) of this process during the storm, in ms. */
  cpuMs: number
}

export const stormContenders: Contender[] = [ours, byHand, official]

const STORM_TIMEOUT_MS = 60_000
const MB = 1024 * 1024

export async function runStorm(contender: Contender, target: Target, size: number): Promise<StormResult> {
  const child = forkTs(__filename, ['--child', contender.key, String(size)], { BENCH_TARGET: JSON.stringify(target) })
  try {
    const result = await firstMessage<StormResult | { error: string }>(child, STORM_TIMEOUT_MS + 30_000, `storm ${contender.key}`)
    if ('error' in result) throw new Error(`storm ${contender.key}: ${result.error}`)
    return result
  } finally {
    if (child.exitCode === null) child.kill()
  }
}

async function child(key: string, size: number): Promise<StormResult> {
  const target = JSON.parse(process.env.BENCH_TARGET ?? '') as Target
  const contender = stormContenders.find((c) => c.key === key)
  if (!contender) throw new Error(`unknown contender ${key}`)
  let credentialResolutions = 0
  const credentials = async (): Promise<AwsCredentialIdentity> => {
    credentialResolutions++
    return target.credentials
  }
  const pool = contender.open(target, { max: size, credentials })

  const baseRss = process.memoryUsage.rss()
  let peakRss = baseRss
  const sample = () => (peakRss = Math.max(peakRss, process.memoryUsage.rss()))
  const sampler = setInterval(sample, 5)
  const cpu = process.cpuUsage()
  const started = performance.now()
  const outcomes = await withTimeout(Promise.allSettled(Array.from({ length: size }, () => pool.selectOne())), STORM_TIMEOUT_MS, 'storm')
  const totalMs = performance.now() - started
  const used = process.cpuUsage(cpu)
  sample()
  clearInterval(sampler)
  await withTimeout(pool.end(), 15_000, 'pool end').catch(() => undefined)

  const failures = outcomes.filter((o): o is PromiseRejectedResult => o.status === 'rejected')
  return {
    ok: size - failures.length,
    failed: failures.length,
    firstError: failures[0] ? String(failures[0].reason instanceof Error ? failures[0].reason.message : failures[0].reason) : undefined,
    totalMs,
    baseRssMb: baseRss / MB,
    peakRssMb: peakRss / MB,
    credentialResolutions,
    cpuMs: (used.user + used.system) / 1000,
  }
}

if (require.main === module && process.argv[2] === '--child') {
  child(process.argv[3], Number(process.argv[4])).then(
    (result) => process.send?.(result, () => process.exit(0)),
    (err: Error) => process.send?.({ error: err.message }, () => process.exit(1)),
  )
}
