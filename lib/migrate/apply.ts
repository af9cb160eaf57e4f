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

export async function runUnit(conn: postgres.Sql, unit: Unit, file: string, jobs: JobWait): Promise<void> {
  const started: { job: string; index: string | undefined }[] = []
  try {
    for (const statement of unit.statements) {
      const rows = await conn.unsafe(statement.text)
      const job = isAsyncDdl(statement) ? (rows[0] as { job_id?: unknown } | undefined)?.job_id : undefined
      if (typeof job === 'string') started.push({ job, index: indexName(statement) })
    }
  } catch (err) {
    if (unit.block) await conn.unsafe('ROLLBACK').catch(() => undefined)
    throw err
  }
  for (const { job, index } of started) await waitForJob(conn, job, index, file, unit, jobs)
}

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
