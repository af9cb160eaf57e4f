/**
 * The ledger: one row per applied statement (a BEGIN ... COMMIT block counts as one), in a schema
 * of its own, so that DDL on the user's tables never conflicts with it. DSQL has no advisory
 * locks, so runners claim a statement by inserting its row: the primary key lets one insert win,
 * the others see the claim and wait for it to become 'applied'. While a statement runs, its
 * runner refreshes the claim's heartbeat from another connection; a claim whose heartbeat
 * stopped belongs to a runner that died. States:
 * - 'claimed': DML, whose transaction also turns the row 'applied', so a dead runner's claim
 *   did not take effect: another runner takes it over.
 * - 'running': DDL or SET (which cannot share a transaction with the ledger's row on DSQL): if
 *   its runner dies, whether it took effect is unknown until settled.
 * - 'unknown': its runner lost the connection while it ran: to be settled.
 */
import type postgres from 'postgres'
import { isOccError } from '../retry'
import { MigrationError } from './errors'

export interface LedgerRow {
  file: string
  statement: number
  checksum: string
  state: 'claimed' | 'running' | 'unknown' | 'applied'
  runner: string
  /** Seconds since the claim's last heartbeat (server clock). */
  age: number
}

type Sql = postgres.Sql

export const DEFAULT_LEDGER_SCHEMA = 'postgres_dsql_migrate'

/** What a person (or the catalog) says happened to a statement whose outcome was unknown. */
export type Outcome = 'applied' | 'not-applied'

/** The unit's transaction found that its claim was taken over: it rolls back, and the runner looks again. */
export class ClaimLost extends Error {}

export class Ledger {
  readonly table: string

  constructor(
    private conn: Sql,
    private readonly pool: Sql,
    readonly schema: string,
    readonly runner: string,
  ) {
    this.table = `${ident(schema)}.ledger`
  }

  /** The runner's connection was lost: the rest goes through the pool (a new connection). */
  usePool(): void {
    this.conn = this.pool
  }

  get onPool(): boolean {
    return this.conn === this.pool
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
  async claim(file: string, statement: number, line: number, checksum: string, atomic: boolean): Promise<boolean> {
    try {
      await this.conn.unsafe(`INSERT INTO ${this.table} (file, statement, line, checksum, state, runner, heartbeat) VALUES ($1, $2, $3, $4, $5, $6, now())`, [
        file,
        statement,
        line,
        checksum,
        atomic ? 'claimed' : 'running',
        this.runner,
      ])
      return true
    } catch (err) {
      if ((err as { code?: string }).code === '23505' || isOccError(err)) return false
      throw err
    }
  }

  /** From another connection, while a statement that runs alone runs. */
  heartbeat(file: string, statement: number): Promise<unknown> {
    return this.pool.unsafe(`UPDATE ${this.table} SET heartbeat = now() WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'running'`, [file, statement, this.runner])
  }

  /** Renews a DML claim between two attempts of its transaction (on the runner's connection). */
  refresh(file: string, statement: number): Promise<unknown> {
    return occRetry(() =>
      this.conn.unsafe(`UPDATE ${this.table} SET heartbeat = now() WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'claimed'`, [file, statement, this.runner]),
    )
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

  /**
   * The statements that record a DML unit in its own transaction: its claim becomes 'applied' as
   * it commits. A claim no longer this runner's (taken over once its lease ran out) fails the
   * first one (division by zero), which rolls the unit back; see owns(). Literals, not
   * parameters: they travel in one simple query with the unit.
   */
  recording(file: string, statement: number): string[] {
    const mine = `file = ${literal(file)} AND statement = ${statement} AND runner = ${literal(this.runner)} AND state = 'claimed'`
    return [`SELECT 1 / count(*) FROM ${this.table} WHERE ${mine}`, `UPDATE ${this.table} SET state = 'applied', applied_at = now(), heartbeat = now() WHERE ${mine}`]
  }

  /** Whether this runner still holds a DML claim (after its unit failed: taken over, or its own failure). */
  async owns(file: string, statement: number): Promise<boolean> {
    const row = await this.row(file, statement)
    return row?.runner === this.runner && row.state === 'claimed'
  }

  /** A DML claim whose statement must run alone after all (too big to share its transaction): it becomes a plain one. */
  demote(file: string, statement: number): Promise<unknown> {
    return this.conn.unsafe(`UPDATE ${this.table} SET state = 'running', heartbeat = now() WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'claimed'`, [file, statement, this.runner])
  }

  /** Takes over a dead runner's DML claim (it did not take effect); false when someone else moved first. */
  async takeOver(file: string, statement: number, dead: string, checksum: string): Promise<boolean> {
    const done = await occRetry(() =>
      this.conn.unsafe(
        `UPDATE ${this.table} SET runner = $4, checksum = $5, heartbeat = now() WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'claimed'`,
        [file, statement, dead, this.runner, checksum],
      ),
    ).catch((err: unknown) => (isOccError(err) ? { count: 0 } : Promise.reject(err)))
    return done.count === 1
  }

  /** Gives up this runner's claim after a failure, so that the next run tries the statement again. */
  release(file: string, statement: number): Promise<unknown> {
    return occRetry(() =>
      this.conn.unsafe(`DELETE FROM ${this.table} WHERE file = $1 AND statement = $2 AND runner = $3 AND state IN ('claimed', 'running')`, [file, statement, this.runner]),
    )
  }

  /** This runner lost its connection while the statement ran: the claim stays, marked for settling at once rather than after its lease. */
  markUnknown(file: string, statement: number): Promise<unknown> {
    return this.pool.unsafe(`UPDATE ${this.table} SET state = 'unknown' WHERE file = $1 AND statement = $2 AND runner = $3 AND state = 'running'`, [file, statement, this.runner])
  }

  /**
   * Records what happened to a statement whose outcome was unknown: 'applied' keeps it as done,
   * 'not-applied' removes the claim so that the next run applies it. Only a claim of `runner`
   * when given (so that a concurrent runner's move wins); true when a claim was settled.
   */
  async settle(file: string, statement: number, outcome: Outcome, runner?: string): Promise<boolean> {
    const where = `WHERE file = $1 AND statement = $2 AND state <> 'applied'${runner === undefined ? '' : ' AND runner = $3'}`
    const params = runner === undefined ? [file, statement] : [file, statement, runner]
    const done = await occRetry(() =>
      outcome === 'applied'
        ? this.conn.unsafe(`UPDATE ${this.table} SET state = 'applied', applied_at = now() ${where}`, params)
        : this.conn.unsafe(`DELETE FROM ${this.table} ${where}`, params),
    )
    return done.count === 1
  }

  /** The two ways a person settles a claim whose outcome is unknown, once they know what happened. */
  settleHint(file: string, statement: number): string {
    const where = `WHERE file = ${quote(file)} AND statement = ${statement}`
    const cli = `npx postgres-dsql migrate${this.schema === DEFAULT_LEDGER_SCHEMA ? '' : ` --ledger-schema ${this.schema}`} --settle ${file}:${statement}`
    return (
      `if it took effect, run \`${cli}=applied\` (or \`UPDATE ${this.table} SET state = 'applied' ${where}\`); ` +
      `if it did not, run \`${cli}=not-applied\` (or \`DELETE FROM ${this.table} ${where}\`) and migrate again`
    )
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

/** A string literal whatever standard_conforming_strings says, as PostgreSQL's quote_literal writes it. */
const literal = (value: string): string => (value.includes('\\') ? `E${quote(value.replace(/\\/g, '\\\\'))}` : quote(value))
