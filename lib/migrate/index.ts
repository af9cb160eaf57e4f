/**
 * `postgres-dsql/migrate`: schema migrations that Aurora DSQL accepts. Every statement runs in its
 * own transaction (DSQL allows one DDL per transaction, never with DML) unless the file wraps a
 * block in BEGIN ... COMMIT; CREATE INDEX ASYNC is waited for; a ledger table records each
 * applied statement, so a failed run resumes where it stopped and concurrent runners (two
 * deploys) apply each statement once, without advisory locks, which DSQL does not have.
 *
 *   import { migrate } from 'postgres-dsql/migrate'
 *   const { applied } = await migrate(sql, { dir: 'migrations' })
 */
import { randomUUID } from 'node:crypto'
import type postgres from 'postgres'
import { DsqlConfigError } from '../errors'
import { isOccError } from '../retry'
import { runUnit } from './apply'
import { MigrationError, type Finding } from './errors'
import { readMigrations, summary, type MigrationFile, type Unit } from './files'
import { DEFAULT_LEDGER_SCHEMA, Ledger, type LedgerRow } from './ledger'
import { formatFinding, lint, loadDialect } from './lint'

export { MigrationError, type Finding, type MigrationErrorCode } from './errors'
export { formatFinding } from './lint'
export { DEFAULT_LEDGER_SCHEMA } from './ledger'

export interface MigrateOptions {
  /** Directory of `*.sql` files, applied in lexicographic order. Default `migrations`. */
  dir?: string
  /** Schema of the ledger table, created on first run. Default `postgres_dsql_migrate`; a role that cannot create schemas names one it owns. */
  ledgerSchema?: string
  /** Check pending statements against DSQL's rules before applying any (needs libpg-query; skipped without it). Default true. */
  lint?: boolean
  /** Longest wait for one CREATE INDEX ASYNC job. Default 3600. */
  jobTimeoutSecs?: number
  /** A claim whose runner has not refreshed it for this long belongs to a runner that stopped. Default 60. */
  leaseSecs?: number
  /** Progress lines (applied files, waits for another runner). */
  log?: (line: string) => void
}

export interface MigrateResult {
  /** The files of which this call applied at least one statement, in order. */
  applied: string[]
}

export interface PlannedStatement {
  file: string
  statement: number
  line: number
  /** The statement's first line, shortened. */
  summary: string
}

/** Any postgres.js `sql` (e.g. from `dsql()`), whatever its custom types. */
export type MigrateSql = postgres.Sql<Record<string, unknown>> | postgres.Sql

/** Applies the pending statements of `dir`; resolves to the files this call applied. */
export async function migrate(sql: MigrateSql, options: MigrateOptions = {}): Promise<MigrateResult> {
  const settings = resolve(options)
  const files = readMigrations(settings.dir)
  const pool = sql as postgres.Sql
  // The heartbeat runs on a second connection while the reserved one runs a statement: with a
  // single connection it would queue behind it, and the run would never end.
  const max = Number(pool.options?.max)
  if (max < 2)
    throw new DsqlConfigError(
      `migrate needs a pool of at least 2 connections (max: ${max} was given): one runs the statements, the other keeps their claims alive. Pass max: 2 or more.`,
    )
  const conn = await pool.reserve()
  try {
    const ledger = new Ledger(conn, pool, settings.ledgerSchema, randomUUID())
    await ledger.ensure()
    const pending = pendingUnits(files, await ledger.rows())
    if (settings.lint && pending.length) {
      const findings = await lintIfInstalled(pending, settings.log)
      if (findings.length) throw lintError(findings, 'Nothing was applied')
    }
    const applied: string[] = []
    for (const { file, units } of pending) {
      let count = 0
      for (const unit of units) if (await applyUnit(conn, ledger, file.name, unit, settings)) count++
      if (count) {
        applied.push(file.name)
        settings.log(`${file.name}: applied ${count} statement${count === 1 ? '' : 's'}`)
      }
    }
    if (!pending.length) settings.log(`Nothing to apply: ${files.length} file${files.length === 1 ? ' is' : 's are'} up to date.`)
    else if (!applied.length) settings.log('Nothing left to apply: another runner applied the pending statements.')
    return { applied }
  } finally {
    conn.release()
  }
}

/** What `migrate` would apply now, without changing anything (not even creating the ledger). */
export async function plan(sql: MigrateSql, options: MigrateOptions = {}): Promise<PlannedStatement[]> {
  const settings = resolve(options)
  const files = readMigrations(settings.dir)
  const pending = pendingUnits(files, await readLedger(sql as postgres.Sql, settings.ledgerSchema))
  return pending.flatMap(({ file, units }) => units.map((unit) => ({ file: file.name, statement: unit.number, line: unit.line, summary: summary(unit) })))
}

/**
 * Checks statements against DSQL's rules and applies nothing: the pending ones when `sql` is
 * given, every file's statements when it is null. Needs libpg-query.
 */
export async function check(sql: MigrateSql | null, options: MigrateOptions = {}): Promise<Finding[]> {
  const settings = resolve(options)
  const files = readMigrations(settings.dir)
  const dialect = await loadDialect()
  const rows = sql ? await readLedger(sql as postgres.Sql, settings.ledgerSchema) : []
  return lint(dialect, pendingUnits(files, rows))
}

function resolve(options: MigrateOptions) {
  const ledgerSchema = options.ledgerSchema ?? DEFAULT_LEDGER_SCHEMA
  if (typeof ledgerSchema !== 'string' || !/^[A-Za-z_][A-Za-z0-9_$]{0,62}$/.test(ledgerSchema))
    throw new DsqlConfigError(`ledgerSchema must be a plain schema name such as "${DEFAULT_LEDGER_SCHEMA}", not ${JSON.stringify(ledgerSchema)}.`)
  const dir = options.dir ?? 'migrations'
  if (typeof dir !== 'string' || !dir) throw new DsqlConfigError(`dir must be the path of a directory of *.sql files, not ${JSON.stringify(dir)}.`)
  return {
    dir,
    ledgerSchema,
    lint: options.lint ?? true,
    jobs: { timeoutMs: seconds('jobTimeoutSecs', options.jobTimeoutSecs, 3600) * 1000, pollMs: 100 },
    leaseSecs: seconds('leaseSecs', options.leaseSecs, 60),
    log: options.log ?? (() => undefined),
  }
}
type Settings = ReturnType<typeof resolve>

function seconds(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw new DsqlConfigError(`${name} must be a positive number of seconds, not ${JSON.stringify(value)}.`)
  return value
}

async function readLedger(sql: postgres.Sql, schema: string): Promise<LedgerRow[]> {
  const ledger = new Ledger(sql, sql, schema, '')
  return (await ledger.exists()) ? ledger.rows() : []
}

/**
 * The units not yet applied, file by file. An applied unit whose text changed refuses the whole
 * run: it names every such file, and nothing is applied.
 */
function pendingUnits(files: MigrationFile[], rows: LedgerRow[]): { file: MigrationFile; units: Unit[] }[] {
  const applied = new Map(rows.filter((r) => r.state === 'applied').map((r) => [`${r.file}\0${r.statement}`, r]))
  const edited: string[] = []
  let firstFile: string | undefined
  for (const file of files)
    for (const row of rows.filter((r) => r.file === file.name && r.state === 'applied')) {
      const unit = file.units[row.statement - 1]
      if (unit && unit.checksum === row.checksum) continue
      firstFile ??= file.name
      edited.push(unit ? `${file.name}:${unit.line} (statement ${row.statement} differs from what was applied)` : `${file.name} (statement ${row.statement} was applied and is gone)`)
    }
  if (edited.length)
    throw new MigrationError(
      'MIGRATE_EDITED',
      `Refusing to migrate: applied statements were edited in ${edited.join(', ')}. ` +
        'Restore them as they were applied and put the change in a new file. Nothing was applied.',
      { file: firstFile },
    )
  return files
    .map((file) => ({ file, units: file.units.filter((u) => !applied.has(`${file.name}\0${u.number}`)) }))
    .filter((f) => f.units.length > 0)
}

async function lintIfInstalled(pending: { file: MigrationFile; units: Unit[] }[], log: (line: string) => void): Promise<Finding[]> {
  try {
    return lint(await loadDialect(), pending)
  } catch (err) {
    if (err instanceof MigrationError && err.code === 'MIGRATE_NO_PARSER') {
      log('libpg-query is not installed: applying without checking against DSQL\'s rules first.')
      return []
    }
    throw err
  }
}

function lintError(findings: Finding[], outcome: string): MigrationError {
  const first = findings[0]
  return new MigrationError(
    'MIGRATE_LINT',
    `${findings.length} statement${findings.length === 1 ? '' : 's'} DSQL would refuse. ${outcome}.\n${findings.map(formatFinding).join('\n')}`,
    { file: first.file, statement: first.statement, line: first.line, findings },
  )
}

/** Claims, runs and records one unit; false when another runner applied it (or had already). */
async function applyUnit(conn: postgres.Sql, ledger: Ledger, file: string, unit: Unit, settings: Settings): Promise<boolean> {
  const where = { file, statement: unit.number, line: unit.line }
  let announced = false
  for (let pause = 50; ; pause = Math.min(pause * 2, 1_000)) {
    const row = await ledger.row(file, unit.number)
    if (row && row.checksum !== unit.checksum)
      throw new MigrationError(
        'MIGRATE_EDITED',
        `${file}:${unit.line}: statement ${unit.number} was ${row.state === 'applied' ? 'applied' : 'claimed by another runner'} with different text. ` +
          'Runners must apply the same files: restore it and put the change in a new file.',
        where,
      )
    if (row?.state === 'applied') return false
    if (!row) {
      if (await ledger.claim(file, unit.number, unit.line, unit.checksum)) break
      continue
    }
    if (row.age > settings.leaseSecs)
      throw new MigrationError(
        'MIGRATE_STALE_CLAIM',
        `${file}:${unit.line}: statement ${unit.number} was claimed by a runner that stopped reporting ${Math.round(row.age)} s ago, so whether it took effect is unknown. ` +
          `Check, then ${ledger.settleHint(file, unit.number)}.`,
        where,
      )
    if (!announced) settings.log(`${file}: statement ${unit.number} is being applied by another runner; waiting for it.`)
    announced = true
    await new Promise((resolve) => setTimeout(resolve, pause))
  }
  const stop = keepClaimed(ledger, file, unit.number, settings.leaseSecs)
  try {
    await runWithOccRetry(conn, unit, file, settings)
  } catch (err) {
    await stop()
    if (err instanceof MigrationError && err.code === 'MIGRATE_JOB_TIMEOUT')
      throw new MigrationError(err.code, `${err.message} ${ledger.settleHint(file, unit.number)}.`, where)
    await ledger.release(file, unit.number).catch(() => undefined)
    if (err instanceof MigrationError) throw err
    throw failed(err, file, unit)
  }
  await stop()
  await ledger.markApplied(file, unit.number)
  return true
}

/**
 * A statement that conflicted with another transaction (OCC, 40001: e.g. OC001 when application
 * traffic touches a table during its DDL) did not take effect: run it again, as AWS advises.
 */
async function runWithOccRetry(conn: postgres.Sql, unit: Unit, file: string, settings: Settings): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await runUnit(conn, unit, file, settings.jobs)
    } catch (err) {
      if (attempt >= OCC_ATTEMPTS || err instanceof MigrationError || !isOccError(err)) throw err
      settings.log(`${file}: statement ${unit.number} conflicted with another transaction (${(err as Error).message}); trying again.`)
      await new Promise((resolve) => setTimeout(resolve, Math.min(100 * 2 ** (attempt - 1), 2_000)))
    }
  }
}
const OCC_ATTEMPTS = 10

/** Refreshes the claim's heartbeat from another connection while the statement runs. */
function keepClaimed(ledger: Ledger, file: string, statement: number, leaseSecs: number): () => Promise<void> {
  let last: Promise<unknown> = Promise.resolve()
  const timer = setInterval(() => (last = ledger.heartbeat(file, statement).catch(() => undefined)), (leaseSecs * 1000) / 4)
  timer.unref()
  return async () => {
    clearInterval(timer)
    await last
  }
}

function failed(err: unknown, file: string, unit: Unit): MigrationError {
  const e = err as { message?: string; code?: string; position?: string }
  const state = e.code && /^[0-9A-Z]{5}$/.test(e.code) ? ` (SQLSTATE ${e.code})` : ''
  const what = unit.block ? `the BEGIN ... COMMIT block at line ${unit.line} (rolled back)` : `statement ${unit.number}`
  return new MigrationError(
    'MIGRATE_FAILED',
    `${file}:${unit.line}: ${what} failed: ${e.message ?? String(err)}${state}\n  ${summary(unit)}\n` +
      'Nothing after it was applied. Fix it and run migrate again: it resumes at this statement.',
    { file, statement: unit.number, line: unit.line, cause: err },
  )
}
