/**
 * Soak: steady query load with connection churn against a local stand-in whose connection
 * duration limit and rate limit are low, for --minutes N (default 5). Reports failed queries
 * (must be 0) and RSS at start and end (must not grow without bound).
 *
 *   npm run soak -- --minutes 5
 */
import { parseArgs } from 'node:util'
import dsql from '../lib'
import { startLocalDsql } from '../lib/local'

async function main() {
  const { values } = parseArgs({ options: { minutes: { type: 'string', default: '5' }, workers: { type: 'string', default: '20' } } })
  const minutes = Number(values.minutes)
  const workers = Number(values.workers)
  const local = await startLocalDsql({ maxConnectionDurationSecs: 20, connectionRate: { perSecond: 20, burst: 10 } })
  const sql = dsql({
    host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials,
    max: 10, max_lifetime: 15, idle_timeout: 5, retry: { maxRetries: 20 },
  })
  await sql`create table if not exists soak (id int primary key, n int not null)`
  await sql`insert into soak values (1, 0) on conflict (id) do nothing`
  const until = Date.now() + minutes * 60_000
  const rss = [process.memoryUsage().rss]
  let ok = 0
  const failures: string[] = []
  const sampler = setInterval(() => {
    rss.push(process.memoryUsage().rss)
    console.log(`${new Date().toISOString()} ok=${ok} failed=${failures.length} rss=${mib(rss[rss.length - 1])} MiB connections=${local.stats().authenticated}`)
  }, 30_000)
  await Promise.all(
    Array.from({ length: workers }, async (_, w) => {
      for (let i = 0; Date.now() < until && i < 10_000_000; i++) {
        // Contended writes conflict as on DSQL; they go through sql.begin, which retries them.
        const query = i % 10 === 0 ? sql.begin((tx) => tx`update soak set n = n + 1 where id = 1 and ${w} >= 0`) : sql`select n from soak where id = 1`
        await query.then(() => ok++, (e: Error) => failures.push(e.message))
        // Bursts and pauses make the pool grow, idle out and reconnect.
        if (i % 200 === 0) await new Promise((r) => setTimeout(r, 6000 * Math.random()))
      }
    }),
  )
  clearInterval(sampler)
  rss.push(process.memoryUsage().rss)
  await sql.end({ timeout: 5 })
  const stats = local.stats()
  await local.stop()
  console.log(`\nsoak ${minutes} min: ${ok} queries ok, ${failures.length} failed, ${stats.authenticated} connections opened`)
  console.log(`RSS start ${mib(rss[0])} MiB, end ${mib(rss[rss.length - 1])} MiB, max ${mib(Math.max(...rss))} MiB`)
  for (const f of [...new Set(failures)].slice(0, 10)) console.log(`  failure: ${f}`)
  process.exitCode = failures.length ? 1 : 0
}

const mib = (bytes: number) => (bytes / 1048576).toFixed(1)

main().catch((e: unknown) => {
  console.error(e)
  process.exit(1)
})
