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
import { connectionLost, isAtomic, runUnit } from './apply'
import { MigrationError, type Finding } from './errors'
import { readMigrations, summary, type MigrationFile, type Unit } from './files'
import { ClaimLost, DEFAULT_LEDGER_SCHEMA, Ledger, type LedgerRow, type Outcome } from './ledger'
import { proveOutcome } from './settle'
import { formatFinding, lint, loadDialect } from './lint'

export { MigrationError, type Finding, type MigrationErrorCode } from './errors'
export { formatFinding } from './lint'
export { DEFAULT_LEDGER_SCHEMA, type Outcome } from './ledger'

export interface MigrateOptions {
  /** Directory of `*.sql` files, applied in lexicographic order. Default `migrations`. */
  dir?: string
  /** Schema of the ledger table, created on first run. Default `postgres_dsql_migrate`; a role that cannot create schemas names one it owns. */
  ledgerSchema?: string
  /** Check pending statements against DSQL's rules before applying any (needs libpg-query; skipped without it). Default true. */
  lint?: boolean
  /** Longest wait for one CREATE INDEX ASYNC job. Default 3600. */
  jobTimeoutSecs?: number
  /** A claim whose runner has not refreshed it for this long belongs to a runner that stopped (DML: 300 s more). Default 60. */
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
  const ledger = new Ledger(conn, pool, settings.ledgerSchema, randomUUID())
  try {
    await ledger.ensure()
    const rows = await ledger.rows()
    const pending = pendingUnits(files, rows)
    if (settings.lint && pending.length) {
      const findings = await lintIfInstalled(pending, settings.log)
      if (findings.length) throw lintError(findings, 'Nothing was applied')
    }
    await settleDeadClaims(conn, ledger, pending, rows, settings)
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
  } catch (err) {
    if (connectionLost(err) || (err instanceof MigrationError && connectionLost(err.cause))) ledger.usePool()
    throw err
  } finally {
    // A reserved connection that was lost is back in the pool, closed; releasing it would make
    // postgres.js 3.4.9 write to the socket it dropped (and crash the process).
    if (!ledger.onPool) conn.release()
  }
}

/**
 * Records the outcome of a statement whose runner lost it (MIGRATE_CONNECTION_LOST,
 * MIGRATE_STALE_CLAIM), as `--settle file:n=applied|not-applied` does: 'applied' records it as
 * done; 'not-applied' removes its claim, so that the next run applies it. A statement being
 * applied by a live runner, or already applied, is refused.
 */
export async function settle(
  sql: MigrateSql,
  target: { file: string; statement: number; outcome: Outcome },
  options: Pick<MigrateOptions, 'ledgerSchema' | 'leaseSecs'> = {},
): Promise<void> {
  const settings = resolve(options)
  const { file, statement, outcome } = target
  if (outcome !== 'applied' && outcome !== 'not-applied') throw new DsqlConfigError(`The outcome to settle is 'applied' or 'not-applied', not ${JSON.stringify(outcome)}.`)
  if (!Number.isInteger(statement) || statement < 1) throw new DsqlConfigError(`statement must be a statement number (1 or more), not ${JSON.stringify(statement)}.`)
  const pool = sql as postgres.Sql
  const ledger = new Ledger(pool, pool, settings.ledgerSchema, '')
  const row = (await ledger.exists()) ? await ledger.row(file, statement) : undefined
  const where = { file, statement }
  if (!row || row.state === 'applied')
    throw new MigrationError('MIGRATE_SETTLE', `${file}: statement ${statement} ${row ? 'was applied' : 'has no claim in the ledger'}: there is nothing to settle.`, where)
  if (!dead(row, settings))
    throw new MigrationError('MIGRATE_SETTLE', `${file}: statement ${statement} is being applied by a runner that reported ${Math.round(row.age)} s ago: let it finish.`, where)
  if (row.state === 'claimed' && outcome === 'applied')
    throw new MigrationError(
      'MIGRATE_SETTLE',
      `${file}: statement ${statement} is DML, recorded in its own transaction: its runner stopped before it committed, so it did not take effect. The next run applies it; settle it as not-applied only to hurry that.`,
      where,
    )
  if (!(await ledger.settle(file, statement, outcome, row.runner)))
    throw new MigrationError('MIGRATE_SETTLE', `${file}: statement ${statement}: another runner changed its claim meanwhile: look again.`, where)
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
  const atomic = isAtomic(unit)
  for (;;) {
    if (!(await claim(conn, ledger, file, unit, atomic, settings))) return false
    if (await runClaimed(conn, ledger, file, unit, atomic, settings)) return true
  }
}

/** True once this runner holds the unit's claim; false when it is applied. Waits while a live runner holds it. */
async function claim(conn: postgres.Sql, ledger: Ledger, file: string, unit: Unit, atomic: boolean, settings: Settings): Promise<boolean> {
  const where = { file, statement: unit.number, line: unit.line }
  let announced = false
  try {
    for (let pause = 50; ; pause = Math.min(pause * 2, 1_000)) {
      const row = await ledger.row(file, unit.number)
      // DML records itself in its own transaction: a dead runner's claim did not take effect (and
      // its text may have changed since, as any statement not yet applied may).
      if (row?.state === 'claimed' && dead(row, settings)) {
        if (!(await ledger.takeOver(file, unit.number, row.runner, unit.checksum))) continue
        settings.log(`${file}: statement ${unit.number}: its runner stopped before it committed; applying it.`)
        return true
      }
      if (row && row.checksum !== unit.checksum)
        throw new MigrationError(
          'MIGRATE_EDITED',
          `${file}:${unit.line}: statement ${unit.number} was ${row.state === 'applied' ? 'applied' : 'claimed by another runner'} with different text. ` +
            'Runners must apply the same files: restore it and put the change in a new file.',
          where,
        )
      if (row?.state === 'applied') return false
      if (!row) {
        if (await ledger.claim(file, unit.number, unit.line, unit.checksum, atomic)) return true
        continue
      }
      if (dead(row, settings)) {
        if (await settleByCatalog(conn, ledger, file, unit, row, settings)) continue
        throw unsettled(ledger, [{ file, unit, row }], '')
      }
      if (!announced) settings.log(`${file}: statement ${unit.number} is being applied by another runner; waiting for it.`)
      announced = true
      await new Promise((resolve) => setTimeout(resolve, pause))
    }
  } catch (err) {
    if (!connectionLost(err)) throw err
    // Nothing of the statement ran: a claim this runner may have committed goes, through another connection.
    ledger.usePool()
    await bounded(ledger.release(file, unit.number))
    throw new MigrationError(
      'MIGRATE_CONNECTION_LOST',
      `${file}:${unit.line}: the connection was lost before statement ${unit.number} ran (${(err as Error).message}): nothing of it was applied. Run migrate again: it resumes at this statement.`,
      { ...where, cause: err },
    )
  }
}

/** A claim whose runner is gone: it lost its connection under the statement, or stopped refreshing the claim. */
function dead(row: LedgerRow, settings: Settings): boolean {
  // A DML claim is not refreshed while its transaction runs (on DSQL the refresh would make that
  // transaction fail its commit), but DSQL ends any transaction after 300 s.
  return row.state === 'unknown' || row.age > settings.leaseSecs + (row.state === 'claimed' ? TRANSACTION_SECS : 0)
}

/** DSQL's longest transaction (54000 after it). */
const TRANSACTION_SECS = 300

/**
 * Before applying anything: the pending statements whose outcome is unknown are settled by the
 * catalog where it can tell, or refuse the run, which then applies nothing at all.
 */
async function settleDeadClaims(conn: postgres.Sql, ledger: Ledger, pending: { file: MigrationFile; units: Unit[] }[], rows: LedgerRow[], settings: Settings): Promise<void> {
  const units = new Map(pending.flatMap(({ file, units }) => units.map((unit) => [`${file.name}\0${unit.number}`, unit])))
  const unknown: { file: string; unit: Unit; row: LedgerRow }[] = []
  for (const row of rows) {
    const unit = units.get(`${row.file}\0${row.statement}`)
    if (!unit || row.state === 'applied' || row.state === 'claimed' || !dead(row, settings)) continue
    if (row.checksum === unit.checksum && (await settleByCatalog(conn, ledger, row.file, unit, row, settings))) continue
    unknown.push({ file: row.file, unit, row })
  }
  if (unknown.length) throw unsettled(ledger, unknown, ' Nothing was applied.')
}

/** Settles a dead claim when the catalog proves its outcome (see proveOutcome); true when the claim changed. */
async function settleByCatalog(conn: postgres.Sql, ledger: Ledger, file: string, unit: Unit, row: LedgerRow, settings: Settings): Promise<boolean> {
  const outcome = await proveOutcome(conn, unit)
  if (!outcome) return false
  // Another runner may settle it at the same moment: only the claim as it was read changes.
  if (await ledger.settle(file, unit.number, outcome, row.runner))
    settings.log(
      `${file}: statement ${unit.number}'s outcome was unknown (its runner ${row.state === 'unknown' ? 'lost the connection' : 'stopped'}); ` +
        (outcome === 'applied' ? 'the table it creates exists, so it took effect: recorded as applied.' : 'the table it creates does not exist, so it did not take effect: applying it again.'),
    )
  return true
}

function unsettled(ledger: Ledger, claims: { file: string; unit: Unit; row: LedgerRow }[], outcome: string): MigrationError {
  const lines = claims.map(({ file, unit, row }) => {
    const why = row.state === 'unknown' ? 'its runner lost the connection while it ran' : `it was claimed by a runner that stopped reporting ${Math.round(row.age)} s ago`
    return `${file}:${unit.line}: statement ${unit.number}: ${why}, so whether it took effect is unknown. Check, then ${ledger.settleHint(file, unit.number)}.`
  })
  const [{ file, unit }] = claims
  return new MigrationError('MIGRATE_STALE_CLAIM', `${lines.join('\n')}${outcome}`, { file, statement: unit.number, line: unit.line })
}

/**
 * Runs a unit this runner claimed and records it: DML in one transaction with its ledger row,
 * anything else alone and then recorded. False when the claim was taken over before it committed.
 */
async function runClaimed(conn: postgres.Sql, ledger: Ledger, file: string, unit: Unit, atomic: boolean, settings: Settings): Promise<boolean> {
  let shared = atomic
  let stop = async (): Promise<void> => undefined
  try {
    if (shared) shared = await runShared(conn, ledger, file, unit, settings)
    if (!shared) {
      stop = keepClaimed(ledger, file, unit.number, settings.leaseSecs)
      await runWithOccRetry(conn, unit, file, settings)
    }
  } catch (err) {
    await stop()
    if (err instanceof ClaimLost) return false
    if (err instanceof MigrationError && err.code === 'MIGRATE_JOB_TIMEOUT')
      throw new MigrationError(err.code, `${err.message} ${ledger.settleHint(file, unit.number)}.`, { file, statement: unit.number, line: unit.line })
    if (connectionLost(err) || (err instanceof MigrationError && err.code === 'MIGRATE_CONNECTION_LOST')) throw await lostWhileRunning(ledger, file, unit, err, shared)
    await ledger.release(file, unit.number).catch(() => undefined)
    if (err instanceof MigrationError) throw err
    throw failed(err, file, unit)
  }
  await stop()
  if (!shared) await recordApplied(ledger, file, unit)
  return true
}

/** The unit and its ledger row in one transaction; false when it must run alone after all. */
async function runShared(conn: postgres.Sql, ledger: Ledger, file: string, unit: Unit, settings: Settings): Promise<boolean> {
  try {
    await runWithOccRetry(conn, unit, file, settings, ledger.recording(file, unit.number), ledger)
    return true
  } catch (err) {
    if (connectionLost(err)) throw err
    if (!(await ledger.owns(file, unit.number))) throw new ClaimLost(`${file}: statement ${unit.number} was taken over by another runner`)
    // The ledger's row crossed a per-transaction limit (DSQL: 3,000 rows) that the statement alone may not.
    if ((err as { code?: string }).code !== '54000') throw err
    settings.log(`${file}: statement ${unit.number} does not fit in one transaction with its ledger row (${(err as Error).message}); running it alone.`)
    await ledger.demote(file, unit.number)
    return false
  }
}

/**
 * The connection was lost under the unit. DML shared its transaction with its ledger row: the
 * ledger tells whether it took effect, and its claim is released so that the next run applies it
 * if it did not. Anything else may have committed: its claim stays, marked for settling.
 */
async function lostWhileRunning(ledger: Ledger, file: string, unit: Unit, err: unknown, shared: boolean): Promise<MigrationError> {
  ledger.usePool()
  const where = { file, statement: unit.number, line: unit.line }
  if (err instanceof MigrationError) {
    await bounded(ledger.markUnknown(file, unit.number))
    return new MigrationError('MIGRATE_CONNECTION_LOST', `${err.message} Until then migrate goes no further: ${ledger.settleHint(file, unit.number)}.`, { ...where, cause: err.cause })
  }
  const said = `${file}:${unit.line}: statement ${unit.number}: the connection was lost while it ran (${(err as Error).message})`
  if (shared) {
    await bounded(ledger.release(file, unit.number))
    return new MigrationError(
      'MIGRATE_CONNECTION_LOST',
      `${said}. It and its ledger row were one transaction, so it took effect completely or not at all, and the ledger records which: run migrate again, it applies the statement only if it did not take effect.`,
      { ...where, cause: err },
    )
  }
  await bounded(ledger.markUnknown(file, unit.number))
  return new MigrationError(
    'MIGRATE_CONNECTION_LOST',
    `${said}, so whether it took effect is unknown. Its claim is kept and migrate goes no further until it is settled: check, then ${ledger.settleHint(file, unit.number)}.`,
    { ...where, cause: err },
  )
}

/** Records a unit that ran alone; it took effect, so a failure to record it says exactly that. */
async function recordApplied(ledger: Ledger, file: string, unit: Unit): Promise<void> {
  try {
    await ledger.markApplied(file, unit.number)
  } catch (err) {
    const lost = connectionLost(err)
    if (lost) ledger.usePool()
    const recorded = lost && (await bounded(ledger.markApplied(file, unit.number)))
    throw new MigrationError(
      'MIGRATE_CONNECTION_LOST',
      `${file}:${unit.line}: statement ${unit.number} took effect, then ${lost ? 'the connection was lost' : 'recording it failed'} (${(err as Error).message}). ` +
        (recorded ? 'It was recorded through another connection: run migrate again, it goes on after it.' : `Record it: ${ledger.settleHint(file, unit.number).split('; ')[0]}.`),
      { file, statement: unit.number, line: unit.line, cause: err },
    )
  }
}

/** Whether `work` settled within `ms`; it is never awaited longer (a dead network may hang it), and never left unhandled. */
function bounded(work: Promise<unknown>, ms = 5_000): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms).unref()))
  return Promise.race([work.then(() => true, () => false), late]).finally(() => clearTimeout(timer))
}

/**
 * A statement that conflicted with another transaction (OCC, 40001: e.g. OC001 when application
 * traffic touches a table during its DDL) did not take effect: run it again, as AWS advises.
 */
async function runWithOccRetry(conn: postgres.Sql, unit: Unit, file: string, settings: Settings, record?: string[], ledger?: Ledger): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await runUnit(conn, unit, file, settings.jobs, record)
    } catch (err) {
      if (attempt >= OCC_ATTEMPTS || err instanceof MigrationError || !isOccError(err)) throw err
      settings.log(`${file}: statement ${unit.number} conflicted with another transaction (${(err as Error).message}); trying again.`)
      await new Promise((resolve) => setTimeout(resolve, Math.min(100 * 2 ** (attempt - 1), 2_000)))
      // Each attempt is a new transaction: its claim starts a new lease (see dead()).
      if (record) await ledger?.refresh(file, unit.number)
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
