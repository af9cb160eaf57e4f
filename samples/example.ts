/**
 * The seed example: connect to Aurora DSQL with postgres.js, create a table, insert a row with
 * parameters, read it back and clean up. As `admin` it works in `public` with an admin token; as
 * any other role in `myschema` with a standard token: postgres-dsql picks both from the user.
 *
 *   CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws CLUSTER_USER=admin npx ts-node samples/example.ts
 *
 * Without CLUSTER_ENDPOINT it runs against a local DSQL stand-in. In your own code, import from
 * 'postgres-dsql' and 'postgres-dsql/local' instead of '../lib'.
 */
import { join } from 'node:path'
import dsql, { type DsqlOptions } from '../lib'
import { withTarget } from './target'

export async function example(options: DsqlOptions): Promise<void> {
  const sql = dsql({
    sslrootcert: process.env.PGSSLROOTCERT ?? join(__dirname, '..', 'certs', 'AmazonRootCA1.pem'),
    ...options,
  })
  try {
    const [where] = await sql`select current_user as "user", current_schema() as schema`
    console.log(`Connected as ${where.user}, schema ${where.schema}`)

    await sql`
      create table if not exists owner (
        id uuid not null default gen_random_uuid(),
        name varchar(30) not null,
        city varchar(80) not null,
        telephone varchar(20) default null,
        primary key (id)
      )`
    const wanted = { name: 'John Doe', city: 'Anytown', telephone: '555-555-1999' }
    const [inserted] = await sql`insert into owner ${sql(wanted)} returning id`
    const [row] = await sql`select id, name, city, telephone from owner where id = ${inserted.id}`

    for (const [column, value] of Object.entries({ ...wanted, id: inserted.id }))
      if (row[column] !== value) throw new Error(`owner.${column} is ${JSON.stringify(row[column])}, expected ${JSON.stringify(value)}`)
    if (!/^[0-9a-f-]{36}$/.test(row.id)) throw new Error(`owner.id ${row.id} is not a uuid`)
    console.log(`Inserted and read back owner ${row.id}: ${row.name}, ${row.city}, ${row.telephone}`)

    await sql`delete from owner where id = ${row.id}`
    await sql`drop table owner`
  } finally {
    // A script must end its sql: the pool's open connection would keep Node running.
    await sql.end()
  }
}

if (require.main === module) {
  withTarget((options) => example(options)).then(
    () => console.log('example: ok'),
    (err: unknown) => {
      console.error('example failed:', err instanceof Error ? err.message : err)
      process.exit(1)
    },
  )
}
