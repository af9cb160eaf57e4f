/**
 * What the dialect costs a round trip: `select 1` through a stand-in with the dialect on and
 * through one with `dialect: false` (a plain byte relay), alternating rounds so that drift hits
 * both alike. Prints the median time per query of each and the difference.
 *
 *   npx ts-node scripts/dialect-overhead.ts [queries per round, default 2000] [rounds, default 10]
 */
import dsql from '../lib'
import { startLocalDsql, type LocalDsql } from '../lib/local'

const perRound = Number(process.argv[2] ?? 2000)
const rounds = Number(process.argv[3] ?? 10)

async function main(): Promise<void> {
  const [on, off] = await Promise.all([startLocalDsql(), startLocalDsql({ dialect: false })])
  const open = (local: LocalDsql) =>
    dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, max: 1 })
  const clients = { dialect: open(on), plain: open(off) }
  const samples: Record<keyof typeof clients, number[]> = { dialect: [], plain: [] }
  try {
    for (const sql of Object.values(clients)) for (let i = 0; i < 500; i++) await sql`select 1`
    for (let r = 0; r < rounds; r++) {
      for (const name of (r % 2 ? ['plain', 'dialect'] : ['dialect', 'plain']) as (keyof typeof clients)[]) {
        const sql = clients[name]
        const started = process.hrtime.bigint()
        for (let i = 0; i < perRound; i++) await sql`select 1`
        samples[name].push(Number(process.hrtime.bigint() - started) / 1000 / perRound)
      }
    }
  } finally {
    await Promise.all([clients.dialect.end(), clients.plain.end()])
    await Promise.all([on.stop(), off.stop()])
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
  const d = median(samples.dialect)
  const p = median(samples.plain)
  console.log(`select 1 round trip, median of ${rounds} rounds of ${perRound}: plain relay ${p.toFixed(1)} µs, dialect ${d.toFixed(1)} µs, overhead ${(((d - p) / p) * 100).toFixed(1)}%`)
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
