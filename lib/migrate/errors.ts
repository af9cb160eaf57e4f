import { DsqlError } from '../errors'

/** One thing `--check` (and `migrate` before it applies anything) found against DSQL's rules. */
export interface Finding {
  file: string
  line: number
  /** The unit's number in the file (a BEGIN ... COMMIT block counts as one). */
  statement: number
  /** A short stable name: `serial`, `create-index`, `truncate`, `one-ddl-per-transaction`, ... */
  rule: string
  /** What DSQL answers (SQLSTATE and message). */
  message: string
  /** The DSQL way to do it. */
  hint?: string
}

export type MigrationErrorCode =
  /** The directory or a file's BEGIN ... COMMIT structure. */
  | 'MIGRATE_FILES'
  /** A statement failed; the next run resumes at it. */
  | 'MIGRATE_FAILED'
  /** An applied statement was edited: nothing was applied. */
  | 'MIGRATE_EDITED'
  /** The lint found statements DSQL refuses: nothing was applied. */
  | 'MIGRATE_LINT'
  /** CREATE INDEX ASYNC's job failed: the next run tries the statement again. */
  | 'MIGRATE_JOB'
  /** The job did not finish in time: the statement stays claimed until settled. */
  | 'MIGRATE_JOB_TIMEOUT'
  /** The connection was lost around a statement; the message says whether it must be settled. */
  | 'MIGRATE_CONNECTION_LOST'
  /** A statement's outcome is unknown (its runner died or lost the connection): settle it. */
  | 'MIGRATE_STALE_CLAIM'
  /** `settle` was asked for a statement that has no outcome to settle. */
  | 'MIGRATE_SETTLE'
  /** The ledger's schema or table could not be created (e.g. the role may not create schemas). */
  | 'MIGRATE_LEDGER'
  /** `--check` needs libpg-query. */
  | 'MIGRATE_NO_PARSER'

/** Every error `migrate` raises itself; a failed statement's server error is the `cause`. */
export class MigrationError extends DsqlError {
  declare readonly code: MigrationErrorCode
  readonly file: string | undefined
  readonly statement: number | undefined
  readonly line: number | undefined
  readonly findings: Finding[]
  constructor(
    code: MigrationErrorCode,
    message: string,
    details: { file?: string; statement?: number; line?: number; findings?: Finding[]; cause?: unknown } = {},
  ) {
    super(code, message, details.cause === undefined ? undefined : { cause: details.cause })
    this.file = details.file
    this.statement = details.statement
    this.line = details.line
    this.findings = details.findings ?? []
  }
}
