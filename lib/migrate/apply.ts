/**
 * Runs one unit on the runner's connection: a statement in its own transaction, or the file's
 * own BEGIN ... COMMIT block. After CREATE INDEX ASYNC (and ALTER TABLE ASYNC) it waits for the
 * job, so the next statement can rely on the index; a failed job fails the statement.
 */
import type postgres from 'postgres'
import { startsWith, type Token } from '../local/lexer'
import { MigrationError } from './errors'
import type { Statement, Unit } from './files'

export interface JobWait {
  timeoutMs: number
  /** First pause between polls of a job that wait_for_job returned on unfinished. */
  pollMs: number
}

/**
 * Runs one unit. A transaction (the file's BEGIN ... COMMIT block, or DML with `record`, the
 * ledger's statements that record it) goes as one simple query: the server runs all of it or
 * none of it, even when the answer is lost, and the connection is never lost in the middle of a
 * transaction (which would leave postgres.js 3.4.9's sql.end() waiting for it forever).
 */
export async function runUnit(conn: postgres.Sql, unit: Unit, file: string, jobs: JobWait, record?: string[]): Promise<void> {
  const started: { job: string; index: string | undefined }[] = []
  const collect = (statement: Statement, rows: readonly unknown[] | undefined) => {
    const job = isAsyncDdl(statement) ? (rows?.[0] as { job_id?: unknown } | undefined)?.job_id : undefined
    if (typeof job === 'string') started.push({ job, index: indexName(statement) })
  }
  if (!unit.block && !record) collect(unit.statements[0], await conn.unsafe(unit.statements[0].text))
  else {
    const [first, ...rest] = unit.statements
    // The ledger's statements come right after the file's BEGIN; DML alone runs in the implicit
    // transaction of the one query.
    const texts = unit.block ? [first.text, ...(record ?? []), ...rest.map((s) => s.text)] : [...(record ?? []), first.text]
    let results: readonly (readonly unknown[])[]
    try {
      results = (await conn.unsafe(texts.join(';\n')).simple()) as unknown as readonly (readonly unknown[])[]
    } catch (err) {
      // A failure leaves the file's BEGIN open (a lost connection took it with it).
      if (unit.block && !connectionLost(err)) await conn.unsafe('ROLLBACK').catch(() => undefined)
      throw err
    }
    const skip = unit.block ? (record?.length ?? 0) : 0
    rest.forEach((statement, i) => collect(statement, results[i + 1 + skip]))
  }
  for (const { job, index } of started)
    await waitForJob(conn, job, index, file, unit, jobs).catch((err: unknown) => {
      if (!connectionLost(err)) throw err
      // The statement committed (it returned its job); only the build's outcome is not known here.
      throw new MigrationError(
        'MIGRATE_CONNECTION_LOST',
        `${file}:${unit.line}: statement ${unit.number}: the connection was lost while waiting for its index job ${job} (${(err as Error).message}). ` +
          `The statement took effect; the job may still be running: \`SELECT status, details FROM sys.jobs WHERE job_id = '${job}'\`. ` +
          `Once it says completed, settle it as applied; if it failed, drop what it left${index ? ` (DROP INDEX IF EXISTS ${index})` : ''} and settle it as not applied.`,
        { file, statement: unit.number, line: unit.line, cause: err },
      )
    })
}

/**
 * DML only (one statement, or a BEGIN ... COMMIT block of them): DSQL lets the ledger's row
 * commit in the same transaction, so the unit's outcome is never in doubt. DDL cannot share a
 * transaction with DML on DSQL, and SET, CALL and the like stay outside transactions too.
 */
export function isAtomic(unit: Unit): boolean {
  if (!unit.block) return isDml(unit.statements[0])
  const last = unit.statements[unit.statements.length - 1]
  return startsWith(last.tokens, 'commit') || startsWith(last.tokens, 'end') ? unit.statements.slice(1, -1).every(isDml) : false
}

function isDml(statement: Statement): boolean {
  const t = statement.tokens
  const has = (word: string) => t.some((token) => token.kind === 'word' && token.value === word)
  if (startsWith(t, 'insert') || startsWith(t, 'update') || startsWith(t, 'delete')) return true
  // SELECT ... INTO creates a table (DDL); WITH may end in any of the DML statements.
  if (startsWith(t, 'select')) return !has('into')
  return startsWith(t, 'with') && (!has('into') || has('insert'))
}

/**
 * The connection failed under a statement (postgres.js's codes, the socket's, SQLSTATE class 08,
 * the server shutting the session): what it was running may have committed before the answer
 * was lost, and nothing more may be sent on it.
 */
export function connectionLost(err: unknown): boolean {
  const code = err && typeof err === 'object' ? (err as { code?: unknown }).code : undefined
  return typeof code === 'string' && (LOST.has(code) || /^08[0-9A-Z]{3}$/.test(code))
}
const LOST = new Set(['CONNECTION_CLOSED', 'CONNECTION_DESTROYED', 'CONNECTION_ENDED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', '57P01', '57P02', '57P03'])

function isAsyncDdl(statement: Statement): boolean {
  const t = statement.tokens
  const at = startsWith(t, 'create', 'index') ? 2 : startsWith(t, 'create', 'unique', 'index') ? 3 : -1
  return (at > 0 && t[at]?.kind === 'word' && t[at].value === 'async') || startsWith(t, 'alter', 'table', 'async')
}

/** The index a CREATE [UNIQUE] INDEX ASYNC [IF NOT EXISTS] statement names, as written; undefined when unnamed. */
function indexName(statement: Statement): string | undefined {
  const t = statement.tokens
  let at = t.findIndex((token) => token.kind === 'word' && token.value === 'async') + 1
  if (at === 0 || !startsWith(t, 'create')) return undefined
  if (startsWith(t.slice(at), 'if', 'not', 'exists')) at += 3
  const isName = (token: Token | undefined) => token?.kind === 'ident' || (token?.kind === 'word' && token.value !== 'on')
  if (!isName(t[at])) return undefined
  let end = at
  while (t[end + 1]?.kind === 'op' && t[end + 1].value === '.' && isName(t[end + 2])) end += 2
  return statement.text.slice(t[at].start - statement.tokens[0].start, t[end].end - statement.tokens[0].start)
}

/**
 * `CALL sys.wait_for_job` blocks until the job ends (DSQL documents a boolean for its outcome);
 * sys.jobs then says how it ended. A job still running when the call returns is waited again.
 */
async function waitForJob(conn: postgres.Sql, job: string, index: string | undefined, file: string, unit: Unit, wait: JobWait): Promise<void> {
  const deadline = Date.now() + wait.timeoutMs
  const where = { file, statement: unit.number, line: unit.line }
  for (let pause = wait.pollMs; ; pause = Math.min(pause * 2, 5_000)) {
    const [answer] = await conn.unsafe(`CALL sys.wait_for_job('${job.replace(/'/g, "''")}')`)
    const succeeded = answer ? Object.values(answer)[0] : undefined
    const [status] = (await conn.unsafe('SELECT status, details FROM sys.jobs WHERE job_id = $1', [job])) as unknown as { status: string; details: string | null }[]
    const state = status?.status ?? (succeeded === false ? 'failed' : 'completed')
    if (state === 'completed') return
    if (/fail|cancel/i.test(state) || succeeded === false)
      throw new MigrationError(
        'MIGRATE_JOB',
        `${file}:${unit.line}: statement ${unit.number}: job ${job} ${state}${status?.details ? `: ${status.details}` : ''}. ` +
          `Fix the cause, drop what the job may have left${index ? ` (DROP INDEX IF EXISTS ${index})` : ' (the index it was building)'}, and run migrate again: it resumes at this statement.`,
        where,
      )
    if (Date.now() + pause > deadline)
      throw new MigrationError(
        'MIGRATE_JOB_TIMEOUT',
        `${file}:${unit.line}: statement ${unit.number}: job ${job} is still ${state} after ${Math.round(wait.timeoutMs / 1000)} s. ` +
          'Allow more time with jobTimeoutSecs (--job-timeout), or wait for it (SELECT * FROM sys.jobs) and then',
        where,
      )
    await new Promise((resolve) => setTimeout(resolve, pause))
  }
}
