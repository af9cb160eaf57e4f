/**
 * `npm run bench:failover`: time from a Region's loss to the first successful query in the other
 * Region, through a two-Region stand-in (in this process) with simulated latency. A pool keeps
 * querying; one Region is stopped; the clock runs until a query succeeds on the other endpoint.
 *
 *   npm run bench:failover -- --rounds 7 --latency 20
 */
import { performance } from 'node:perf_hooks'
import { parseArgs } from 'node:util'
import dsql from '../lib'
import { startLocalDsql } from '../lib/local'
import { median } from './util'

const { values: args } = parseArgs({ options: { rounds: { type: 'string', default: '7' }, latency: { type: 'string', default: '20' } } })
const ROUNDS = Number(args.rounds)
const RTT = Number(args.latency)

async function main(): Promise<void> {
  const local = await startLocalDsql({ regions: ['us-east-1', 'us-east-2'], latencyMs: RTT })
  const times: number[] = []
  try {
    for (let round = 0; round < ROUNDS; round++) {
      // A fresh pool each round: the first Region is healthy and preferred again.
      const sql = dsql({
        host: local.regions.map((r) => r.host),
        hostaddr: local.regions.map((r) => r.hostaddr),
        port: local.regions.map((r) => r.port),
        sslrootcert: local.caFile,
        credentials: local.credentials,
        max: 4,
        connect_timeout: 10,
      })
      await Promise.all([1, 2, 3, 4].map(() => sql`select 1`))
      if (sql.options.dsql.lastHost !== local.regions[0].host) throw new Error('not on the first Region')
      const stopped = performance.now()
      await local.stopRegion('us-east-1')
      for (;;) {
        const ok = await sql`select 1`.then(
          () => true,
          () => false,
        )
        if (ok && sql.options.dsql.lastHost === local.regions[1].host) break
      }
      times.push(performance.now() - stopped)
      await sql.end({ timeout: 1 })
      await local.startRegion('us-east-1')
    }
  } finally {
    await local.stop()
  }
  const ms = median(times)
  console.log(
    `Failover, a Region's loss to the first successful query in the other: median ${ms.toFixed(0)} ms ` +
      `(${(ms / RTT).toFixed(1)} RTT at ${RTT} ms), ${ROUNDS} rounds: ${times.map((t) => t.toFixed(0)).join(', ')} ms.`,
  )
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
