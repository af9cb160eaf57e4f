/** `npx postgres-dsql migrate [dir]`: flags, connection from the environment, exit codes. */
import { parseArgs } from 'node:util'
import { dsql, type DsqlOptions } from '../index'
import { DsqlError } from '../errors'
import { check, formatFinding, migrate, plan, settle, MigrationError, type MigrateOptions, type Outcome } from './index'

export const MIGRATE_USAGE = `Usage: postgres-dsql migrate [dir] [--check | --dry-run | --settle FILE:N=OUTCOME] [--host ENDPOINT] [--user ROLE] [options]

Applies the pending *.sql files of dir (default ./migrations) in lexicographic order: each
statement in its own transaction (or the file's own BEGIN ... COMMIT block), waiting for
CREATE INDEX ASYNC jobs, recorded in a ledger table so that a failed run resumes where it
stopped and concurrent runs apply each statement once.

  --check             check pending statements against DSQL's rules (needs libpg-query); apply nothing.
                      Without an endpoint, checks every statement of every file.
  --dry-run           print the pending statements; apply nothing
  --settle FILE:N=applied|not-applied
                      record the outcome of statement N of FILE, left unknown by a lost
                      connection (the error names it); apply nothing
  --no-lint           apply without checking against DSQL's rules first
  --ledger-schema S   schema of the ledger table (default postgres_dsql_migrate)
  --schema S          schema the statements run in (default: public for admin, myschema for others)
  --job-timeout SECS  longest wait for one index job (default 3600)
  --host, --user, --region, --profile, --hostaddr, --port, --sslrootcert
                      as for the other commands; defaults from PGHOST or CLUSTER_ENDPOINT,
                      PGUSER or CLUSTER_USER, PGHOSTADDR, PGPORT, PGSSLROOTCERT and the AWS chain.

Exit status: 0 applied (or nothing pending), 1 a statement failed or was refused, 2 bad usage.`

const OPTIONS = {
  host: { type: 'string' },
  user: { type: 'string' },
  region: { type: 'string' },
  profile: { type: 'string' },
  hostaddr: { type: 'string' },
  port: { type: 'string' },
  sslrootcert: { type: 'string' },
  schema: { type: 'string' },
  'ledger-schema': { type: 'string' },
  'job-timeout': { type: 'string' },
  check: { type: 'boolean' },
  'dry-run': { type: 'boolean' },
  settle: { type: 'string' },
  'no-lint': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const

export async function runMigrateCli(argv: string[]): Promise<number> {
  let parsed
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true })
  } catch (err) {
    return fail(`${(err as Error).message}\n\n${MIGRATE_USAGE}`, 2)
  }
  const { values, positionals } = parsed
  if (values.help) return out(MIGRATE_USAGE, 0)
  if (positionals.length > 1) return fail(`One directory only, not ${positionals.length}.\n\n${MIGRATE_USAGE}`, 2)
  if ([values.check, values['dry-run'], values.settle !== undefined].filter(Boolean).length > 1) return fail('Use one of --check, --dry-run and --settle.', 2)
  const target = values.settle === undefined ? undefined : /^(.+):([1-9][0-9]*)=(applied|not-applied)$/.exec(values.settle)
  if (values.settle !== undefined && !target)
    return fail(`--settle takes FILE:N=applied or FILE:N=not-applied (e.g. 002_index.sql:3=applied), not "${values.settle}".`, 2)
  const jobTimeout = values['job-timeout'] === undefined ? undefined : Number(values['job-timeout'])
  if (jobTimeout !== undefined && !(jobTimeout > 0)) return fail(`--job-timeout must be a positive number of seconds, not "${values['job-timeout']}".`, 2)
  const options: MigrateOptions = {
    dir: positionals[0] ?? 'migrations',
    ledgerSchema: values['ledger-schema'],
    lint: !values['no-lint'],
    jobTimeoutSecs: jobTimeout,
    log: (line) => out(line, 0),
  }
  const host = values.host ?? (process.env.PGHOST || undefined) ?? (process.env.CLUSTER_ENDPOINT || undefined)
  const connection: DsqlOptions = definedOnly({
    host,
    user: values.user ?? (process.env.PGUSER || undefined) ?? (process.env.CLUSTER_USER || undefined),
    region: values.region,
    profile: values.profile,
    hostaddr: values.hostaddr,
    port: values.port === undefined ? undefined : Number(values.port),
    sslrootcert: values.sslrootcert,
    schema: values.schema,
  })
  try {
    // --check needs no cluster: without an endpoint it checks every file.
    if (values.check && !host) return report(await check(null, options), 'statements of every file')
    const sql = dsql({ ...connection, max: 2, onnotice: (notice) => void process.stderr.write(`NOTICE: ${String(notice.message)}\n`) })
    try {
      if (values.check) return report(await check(sql, options), 'pending statements')
      if (target) {
        const [, file, statement, outcome] = target
        await settle(sql, { file, statement: Number(statement), outcome: outcome as Outcome }, options)
        return out(`${file}: statement ${statement} settled as ${outcome}${outcome === 'applied' ? '' : ': the next run applies it'}.`, 0)
      }
      if (values['dry-run']) {
        const planned = await plan(sql, options)
        if (!planned.length) return out('Nothing to apply.', 0)
        for (const p of planned) out(`${p.file}:${p.line}  statement ${p.statement}  ${p.summary}`, 0)
        return out(`${planned.length} statement${planned.length === 1 ? '' : 's'} to apply.`, 0)
      }
      await migrate(sql, options)
      return 0
    } finally {
      await sql.end({ timeout: 5 })
    }
  } catch (err) {
    if (err instanceof MigrationError) return fail(err.message, 1)
    if (err instanceof DsqlError) return fail(err.message, err.code === 'DSQL_CONFIG' ? 2 : 1)
    const e = err as { message?: string; code?: string }
    return fail(`${e.message ?? String(err)}${e.code ? ` (${e.code})` : ''}`, 1)
  }
}

function report(findings: MigrationError['findings'], what: string): number {
  if (!findings.length) return out(`No findings: the ${what} follow DSQL's rules.`, 0)
  for (const f of findings) process.stderr.write(formatFinding(f) + '\n')
  return fail(`${findings.length} finding${findings.length === 1 ? '' : 's'}; nothing was applied.`, 1)
}

function out(text: string, code: number): number {
  process.stdout.write(text + '\n')
  return code
}

function fail(text: string, code: number): number {
  process.stderr.write(`postgres-dsql migrate: ${text}\n`)
  return code
}

function definedOnly<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T
}
