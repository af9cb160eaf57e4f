/**
 * Connection pool examples: a pool, concurrent queries with Promise.all, a reserved connection,
 * a transaction retried on optimistic concurrency conflicts, and a clean shutdown.
 *
 *   CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws npx ts-node samples/pool.ts
 */
import dsql, { type DsqlOptions } from '../lib'
import { withTarget } from './target'

export async function pool(options: DsqlOptions): Promise<void> {
  // A pool of up to 5 connections; each new one gets its own IAM token. `retry` makes
  // sql.begin re-run the whole transaction when DSQL reports a conflict (SQLSTATE 40001).
  const sql = dsql({ max: 5, retry: { maxRetries: 5 }, ...options })
  try {
    // Concurrent queries: postgres.js spreads them over the pool.
    const results = await Promise.all([1, 2, 3, 4, 5, 6, 7, 8].map((n) => sql`select ${n}::int * 2 as doubled`))
    const doubled = results.map(([row]) => row.doubled)
    if (doubled.join() !== '2,4,6,8,10,12,14,16') throw new Error(`unexpected results ${doubled.join()}`)
    console.log(`8 concurrent queries over the pool: ${doubled.join(', ')}`)

    // A reserved connection: the same session for several statements, then back to the pool.
    const reserved = await sql.reserve()
    try {
      const [a] = await reserved`select pg_backend_pid() as pid`
      const [b] = await reserved`select pg_backend_pid() as pid`
      if (a.pid !== b.pid) throw new Error('a reserved connection changed session')
      console.log(`Reserved connection: backend ${a.pid} for both statements`)
    } finally {
      reserved.release()
    }

    // A transaction; on an OCC conflict the callback runs again in a fresh transaction, so it
    // must not have side effects outside the database.
    await sql`create table if not exists pool_counter (id int primary key, value int not null)`
    await sql`insert into pool_counter values (1, 0) on conflict (id) do update set value = 0`
    await Promise.all(
      [1, 2, 3].map(() =>
        sql.begin(async (tx) => {
          const [{ value }] = await tx`select value from pool_counter where id = 1`
          await tx`update pool_counter set value = ${value + 1} where id = 1`
        }),
      ),
    )
    const [{ value }] = await sql`select value from pool_counter where id = 1`
    if (value !== 3) throw new Error(`counter is ${value}, expected 3`)
    console.log(`Three concurrent transactions incremented the counter to ${value}`)
    await sql`drop table pool_counter`
  } finally {
    // Waits for running queries, then closes every connection.
    await sql.end({ timeout: 5 })
  }
}

if (require.main === module) {
  withTarget((options) => pool(options)).then(
    () => console.log('pool: ok'),
    (err: unknown) => {
      console.error('pool failed:', err instanceof Error ? err.message : err)
      process.exit(1)
    },
  )
}
