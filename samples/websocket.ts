/**
 * DSQL over WebSocket: the same `sql`, with the PostgreSQL protocol carried in the binary
 * messages of `wss://<endpoint>/` (port 443), for networks that pass only HTTPS and for runtimes
 * without TCP sockets. On Node before 22 it needs the `ws` package (`npm i ws`).
 *
 *   CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws npx ts-node samples/websocket.ts
 *
 * Without CLUSTER_ENDPOINT it runs against a local DSQL stand-in, which serves WSS on its port.
 */
import dsql, { type DsqlOptions } from '../lib'
import { withTarget } from './target'

export async function websocket(options: DsqlOptions): Promise<void> {
  // Every connection of the pool is a WebSocket; each one still gets a fresh IAM token.
  const sql = dsql({ ...options, transport: 'websocket', max: 3, retry: true })
  try {
    const [who] = await sql`select current_user as "user", current_schema() as schema`
    console.log(`Connected over WebSocket as ${who.user}, schema ${who.schema}`)

    const results = await Promise.all([1, 2, 3, 4, 5, 6].map((n) => sql`select ${n}::int * ${n}::int as square`))
    console.log(`6 concurrent queries on 3 WebSockets: ${results.map(([r]) => r.square).join(', ')}`)

    await sql`create table if not exists ws_sample (id int primary key, note text not null)`
    await sql.begin(async (tx) => {
      await tx`insert into ws_sample values (1, 'over wss') on conflict (id) do update set note = excluded.note`
    })
    const [row] = await sql`select note from ws_sample where id = 1`
    console.log(`Read back in a transaction: ${row.note}`)
    await sql`drop table ws_sample`
  } finally {
    await sql.end()
  }
}

if (require.main === module) {
  withTarget((options) => websocket(options)).then(
    () => console.log('websocket: ok'),
    (err: unknown) => {
      console.error('websocket failed:', err instanceof Error ? err.message : err)
      process.exit(1)
    },
  )
}
