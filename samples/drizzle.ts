/**
 * Drizzle ORM on Aurora DSQL: `drizzle(dsql(...))` with drizzle-orm/postgres-js. Creates a table,
 * inserts and selects through Drizzle, then makes another writer change a row between a
 * transaction's read and its write: DSQL fails the transaction with an OCC conflict (40001),
 * which `retryOcc` sees through Drizzle's error wrapping and runs again. As `admin` the table is
 * in `public`, as any other role in `myschema`: the connector picks the schema, Drizzle's
 * unqualified table names follow it.
 *
 *   CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws CLUSTER_USER=admin npx ts-node samples/drizzle.ts
 *
 * Without CLUSTER_ENDPOINT it runs against a local DSQL stand-in. In your own code, import from
 * 'postgres-dsql' instead of '../lib'.
 */
import { join } from 'node:path'
import { eq, sql } from 'drizzle-orm'
import { integer, pgTable, uuid, varchar } from 'drizzle-orm/pg-core'
import { drizzle } from 'drizzle-orm/postgres-js'
import dsql, { isOccError, retryOcc, type DsqlOptions } from '../lib'
import { withTarget } from './target'

const pet = pgTable('drizzle_pet', {
  id: uuid('id').primaryKey().defaultRandom(),
  name: varchar('name', { length: 30 }).notNull(),
  visits: integer('visits').notNull().default(0),
})

export async function drizzleSample(options: DsqlOptions): Promise<void> {
  const client = dsql({
    sslrootcert: process.env.PGSSLROOTCERT ?? join(__dirname, '..', 'certs', 'AmazonRootCA1.pem'),
    ...options,
  })
  const db = drizzle(client)
  try {
    const [where] = await db.execute<{ user: string; schema: string }>(sql`select current_user as "user", current_schema() as schema`)
    console.log(`Connected as ${where.user}, schema ${where.schema}`)

    // DDL on its own: DSQL runs one DDL statement per transaction, and never with DML.
    await db.execute(sql`create table if not exists drizzle_pet (
      id uuid primary key default gen_random_uuid(),
      name varchar(30) not null,
      visits int not null default 0)`)
    const [rex] = await db.insert(pet).values({ name: 'Rex' }).returning()
    const [found] = await db.select().from(pet).where(eq(pet.id, rex.id))
    console.log(`Inserted and selected ${found.name} (${found.visits} visits)`)

    let attempts = 0
    const conflicts: string[] = []
    await retryOcc(async () => {
      attempts++
      try {
        await db.transaction(async (tx) => {
          const [{ visits }] = await tx.select({ visits: pet.visits }).from(pet).where(eq(pet.id, rex.id))
          // Another writer commits a change to the same row after this transaction read it.
          if (attempts === 1) await client`update drizzle_pet set visits = visits + 1 where id = ${rex.id}`
          await tx.update(pet).set({ visits: visits + 1 }).where(eq(pet.id, rex.id))
        })
      } catch (err) {
        if (isOccError(err)) conflicts.push(errorChain(err))
        throw err
      }
    })
    const [after] = await db.select({ visits: pet.visits }).from(pet).where(eq(pet.id, rex.id))
    console.log(`OCC conflict (${conflicts.join('; ')}) retried: ${attempts} attempts, ${after.visits} visits`)

    await db.delete(pet).where(eq(pet.id, rex.id))
    await db.execute(sql`drop table drizzle_pet`)
  } finally {
    await client.end()
  }
}

/** e.g. "DrizzleQueryError wrapping PostgresError 40001": each error's class and code, along `cause`. */
function errorChain(err: unknown): string {
  const names: string[] = []
  for (let e = err; e && typeof e === 'object'; e = (e as { cause?: unknown }).cause)
    names.push([e.constructor.name, (e as { code?: unknown }).code].filter((x) => typeof x === 'string').join(' '))
  return names.join(' wrapping ')
}

if (require.main === module) {
  withTarget((options) => drizzleSample(options)).then(
    () => console.log('drizzle: ok'),
    (err: unknown) => {
      console.error('drizzle failed:', err instanceof Error ? err.message : err)
      process.exit(1)
    },
  )
}
