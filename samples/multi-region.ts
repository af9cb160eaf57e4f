/**
 * A multi-Region cluster: the endpoints in preference order (your own Region first). New
 * connections fail over to the next endpoint when one cannot be reached, and come back when it
 * answers again. Against two local stand-in Regions unless CLUSTER_ENDPOINT lists the endpoints.
 *
 *   CLUSTER_ENDPOINT=<id1>.dsql.us-east-1.on.aws,<id2>.dsql.us-east-2.on.aws npx ts-node samples/multi-region.ts
 */
import dsql, { DsqlCommitUnknownError, type DsqlOptions } from '../lib'
import { startLocalDsql, type LocalDsql } from '../lib/local'

export async function multiRegion(options: DsqlOptions, impair?: () => Promise<void>): Promise<void> {
  const sql = dsql({ max: 2, retry: true, ...options })
  try {
    await sql`create table if not exists mr_orders (id uuid primary key default gen_random_uuid(), item text not null)`
    await sql`insert into mr_orders (item) values ('first')`
    console.log(`Connected to ${sql.options.dsql.lastHost}`)
    if (impair) {
      await impair()
      // In-flight work on the lost Region fails; with retry on, a transaction that never reached
      // COMMIT runs again on the next connection, which goes to the other Region.
      try {
        await sql.begin((tx) => tx`insert into mr_orders (item) values ('second')`)
      } catch (err) {
        // Its COMMIT was sent and the answer lost: check before running it again.
        if (!(err instanceof DsqlCommitUnknownError)) throw err
      }
      console.log(`After losing a Region: connected to ${sql.options.dsql.lastHost}`)
    }
    const [{ n }] = await sql`select count(*)::int as n from mr_orders`
    console.log(`${n} orders, the same in every Region`)
    await sql`drop table mr_orders`
  } finally {
    await sql.end({ timeout: 5 })
  }
}

async function main(): Promise<void> {
  const endpoints = process.env.CLUSTER_ENDPOINT
  if (endpoints) return multiRegion({ host: endpoints.split(','), user: process.env.CLUSTER_USER || 'admin' })
  const local: LocalDsql = await startLocalDsql({ regions: ['us-east-1', 'us-east-2'] })
  console.log(`No CLUSTER_ENDPOINT set: two local stand-in Regions (${local.regions.map((r) => r.region).join(', ')}).`)
  try {
    const options: DsqlOptions = {
      host: local.regions.map((r) => r.host),
      hostaddr: local.regions.map((r) => r.hostaddr),
      port: local.regions.map((r) => r.port),
      sslrootcert: local.caFile,
      credentials: local.credentials,
    }
    await multiRegion(options, () => local.stopRegion(local.regions[0].region))
  } finally {
    await local.stop()
  }
}

if (require.main === module) {
  main().then(
    () => console.log('multi-region: ok'),
    (err: unknown) => {
      console.error('multi-region failed:', err instanceof Error ? err.message : err)
      process.exit(1)
    },
  )
}
