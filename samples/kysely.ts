/**
 * Kysely on Aurora DSQL: `new Kysely({ dialect: new PostgresJSDialect({ postgres: dsql(...) }) })`
 * (kysely-postgres-js). Creates a table with Kysely's schema builder, inserts and selects, then
 * makes another writer change a row between a transaction's read and its write: DSQL fails the
 * transaction with an OCC conflict (40001) and `retryOcc` runs it again. As `admin` the table is
 * in `public`, as any other role in `myschema`.
 *
 *   CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws CLUSTER_USER=admin npx ts-node samples/kysely.ts
 *
 * Without CLUSTER_ENDPOINT it runs against a local DSQL stand-in. In your own code, import from
 * 'postgres-dsql' instead of '../lib'.
 */
import { join } from 'node:path'
import { Kysely, sql, type Generated } from 'kysely'
import { PostgresJSDialect } from 'kysely-postgres-js'
import dsql, { isOccError, retryOcc, type DsqlOptions } from '../lib'
import { withTarget } from './target'

interface Database {
  kysely_pet: { id: Generated<string>; name: string; visits: Generated<number> }
}

export async function kyselySample(options: DsqlOptions): Promise<void> {
  const client = dsql({
    sslrootcert: process.env.PGSSLROOTCERT ?? join(__dirname, '..', 'certs', 'AmazonRootCA1.pem'),
    ...options,
  })
  const db = new Kysely<Database>({ dialect: new PostgresJSDialect({ postgres: client }) })
  try {
    const { rows: [where] } = await sql<{ user: string; schema: string }>`select current_user as "user", current_schema() as schema`.execute(db)
    console.log(`Connected as ${where.user}, schema ${where.schema}`)

    // DDL on its own: DSQL runs one DDL statement per transaction, and never with DML.
    await db.schema
      .createTable('kysely_pet')
      .ifNotExists()
      .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
      .addColumn('name', 'varchar(30)', (c) => c.notNull())
      .addColumn('visits', 'integer', (c) => c.notNull().defaultTo(0))
      .execute()
    const rex = await db.insertInto('kysely_pet').values({ name: 'Rex' }).returningAll().executeTakeFirstOrThrow()
    const found = await db.selectFrom('kysely_pet').selectAll().where('id', '=', rex.id).executeTakeFirstOrThrow()
    console.log(`Inserted and selected ${found.name} (${found.visits} visits)`)

    let attempts = 0
    const conflicts: string[] = []
    await retryOcc(async () => {
      attempts++
      try {
        await db.transaction().execute(async (trx) => {
          const { visits } = await trx.selectFrom('kysely_pet').select('visits').where('id', '=', rex.id).executeTakeFirstOrThrow()
          // Another writer commits a change to the same row after this transaction read it.
          if (attempts === 1) await client`update kysely_pet set visits = visits + 1 where id = ${rex.id}`
          await trx.updateTable('kysely_pet').set({ visits: visits + 1 }).where('id', '=', rex.id).execute()
        })
      } catch (err) {
        if (isOccError(err)) conflicts.push(errorChain(err))
        throw err
      }
    })
    const after = await db.selectFrom('kysely_pet').select('visits').where('id', '=', rex.id).executeTakeFirstOrThrow()
    console.log(`OCC conflict (${conflicts.join('; ')}) retried: ${attempts} attempts, ${after.visits} visits`)

    await db.deleteFrom('kysely_pet').where('id', '=', rex.id).execute()
    await db.schema.dropTable('kysely_pet').execute()
  } finally {
    // Ends the dsql() pool too.
    await db.destroy()
  }
}

/** e.g. "PostgresError 40001": each error's class and code, along `cause`. */
function errorChain(err: unknown): string {
  const names: string[] = []
  for (let e = err; e && typeof e === 'object'; e = (e as { cause?: unknown }).cause)
    names.push([e.constructor.name, (e as { code?: unknown }).code].filter((x) => typeof x === 'string').join(' '))
  return names.join(' wrapping ')
}

if (require.main === module) {
  withTarget((options) => kyselySample(options)).then(
    () => console.log('kysely: ok'),
    (err: unknown) => {
      console.error('kysely failed:', err instanceof Error ? err.message : err)
      process.exit(1)
    },
  )
}
