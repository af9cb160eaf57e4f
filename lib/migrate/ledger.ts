/**
 * The ledger: one row per applied statement (a BEGIN ... COMMIT block counts as one), in a schema
 * of its own, so that DDL on the user's tables never conflicts with it. DSQL has no advisory
 * locks, so runners claim a statement by inserting its row ('running'): the primary key lets one
 * insert win, the others see the claim and wait for it to become 'applied'. While a statement
 * runs, its runner refreshes the claim's heartbeat from another connection; a claim whose
 * heartbeat stopped belongs to a runner that died, and its outcome is unknown.
 */
import type postgres from 'postgres'
import { isOccError } from '../retry'
import { MigrationError } from './errors'

export interface LedgerRow {
  file: string
  statement: number
  checksum: string
  state: 'running' | 'applied'
  runner: string
  /** Seconds since the claim's last heartbeat (server clock). */
  age: number
}

type Sql = postgres.Sql

export const DEFAULT_LEDGER_SCHEMA = 'postgres_dsql_migrate'

export class Ledger {
  readonly table: string

  constructor(
    private readonly conn: Sql,
    private readonly pool: Sql,
    readonly schema: string,
    private readonly runner: string,
  ) {
    this.table = `${ident(schema)}.ledger`
  }

  async exists(): Promise<boolean> {
    const rows = await this.conn.unsafe('SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = $2', [this.schema, 'ledger'])
    return rows.length > 0
  }

  /** Creates the schema and table, one DDL statement per transaction; a concurrent runner may win either race. */
  async ensure(): Promise<void> {
    if (await this.exists()) return
    const schemaExists = async () => (await this.conn.unsafe('SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1', [this.schema])).length > 0
    await createOnce(schemaExists, () => this.conn.unsafe(`CREATE SCHEMA ${ident(this.schema)}`), `the ledger schema ${ident(this.schema)}`)
    await createOnce(
      () => this.exists(),
      () =>
        this.conn.unsafe(`CREATE TABLE ${this.table} (
  file text NOT NULL,
  statement integer NOT NULL,
  line integer NOT NULL,
  checksum text NOT NULL,
  state text NOT NULL,
  runner text NOT NULL,
  heartbeat timestamptz NOT NULL,
  applied_at timestamptz,
  PRIMARY KEY (file, statement)
)`),
      `the ledger table ${this.table}`,
    )
  }

  async rows(): Promise<LedgerRow[]> {
    const rows = await this.conn.unsafe(`SELECT file, statement, checksum, state, runner, extract(epoch FROM now() - heartbeat)::float8 AS age FROM ${this.table}`)
    return rows as unknown as LedgerRow[]
  }

  async row(file: string, statement: number): Promise<LedgerRow | undefined> {
    const rows = await this.conn.unsafe(
      `SELECT file, statement, checksum, state, runner, extract(epoch FROM now() - heartbeat)::float8 AS age FROM ${this.table} WHERE file = $1 AND statement = $2`,
      [file, statement],
    )
    return rows[0] as unknown as LedgerRow | undefined
  }

  /** True when this runner now owns the statement; false when another runner's claim won. */
  async claim(file: string, statement: number, line: number, checksum: string): Promise<boolean> {
    try {
      await this.conn.unsafe(`INSERT INTO ${this.table} (file, statement, line, checksum, state, runner, heartbeat) VALUES ($1, $2, $3, $4, 'running', $5, now())`, [
        file,
        statement,
        line,
        checksum,
        this.runner,
      ])
      return true
    } catch (err) {
      if ((err as { code?: string }).code === '23505' || isOccError(err)) return false
      throw err
    }
  }

  heartbeat(file: string, statement: number): Promise<unknown> {
    return this.pool.unsafe(`UPDATE ${this.table} SET heartbeat = now() WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'running'`, [file, statement, this.runner])
  }

  markApplied(file: string, statement: number): Promise<unknown> {
    return occRetry(() =>
      this.conn.unsafe(`UPDATE ${this.table} SET state = 'applied', applied_at = now(), heartbeat = now() WHERE file = $1 AND statement = $2 AND runner = $3`, [
        file,
        statement,
        this.runner,
      ]),
    )
  }

  /** Gives up this runner's claim after a failure, so that the next run tries the statement again. */
  release(file: string, statement: number): Promise<unknown> {
    return occRetry(() => this.conn.unsafe(`DELETE FROM ${this.table} WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'running'`, [file, statement, this.runner]))
  }

  /** The SQL a person runs to settle a stale claim, once they know what happened. */
  settleHint(file: string, statement: number): string {
    const where = `WHERE file = ${quote(file)} AND statement = ${statement}`
    return `if it did not take effect, run \`DELETE FROM ${this.table} ${where}\` and migrate again; if it did, run \`UPDATE ${this.table} SET state = 'applied' ${where}\``
  }
}

async function createOnce(exists: () => Promise<boolean>, create: () => Promise<unknown>, what: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    if (await exists()) return
    try {
      await create()
      return
    } catch (err) {
      // Another runner is creating it (duplicate object, unique violation or a conflict): look
      // again once it has committed. Anything else (no permission) will not change by waiting.
      if (attempt >= 8 || !RACE.has((err as { code?: string }).code ?? '')) throw ledgerError(err, what)
      await new Promise((resolve) => setTimeout(resolve, 25 * 2 ** attempt))
    }
  }
}

/** What a concurrent runner's CREATE makes ours fail with: duplicate schema, table or type, unique violation, OCC. */
const RACE = new Set(['42P06', '42P07', '42710', '23505', '40001'])

function ledgerError(err: unknown, what: string): MigrationError {
  const e = err as { message?: string; code?: string }
  return new MigrationError(
    'MIGRATE_LEDGER',
    `Could not create ${what}: ${e.message ?? String(err)}${e.code ? ` (SQLSTATE ${e.code})` : ''}. ` +
      'Run migrate as admin, or pass a schema this role may create tables in: ledgerSchema / --ledger-schema (e.g. myschema).',
    { cause: err },
  )
}

async function occRetry<T>(run: () => Promise<T>, attempts = 5): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await run()
    } catch (err) {
      if (i >= attempts || !isOccError(err)) throw err
      await new Promise((resolve) => setTimeout(resolve, 20 * 2 ** i))
    }
  }
}

export function ident(name: string): string {
  return `"${name.replace(/"/g, '""')}"`
}

const quote = (value: string): string => `'${value.replace(/'/g, "''")}'`
