/**
 * `postgres-dsql/migrate` and `npx postgres-dsql migrate` against a stand-in of its own with
 * DSQL's dialect on: what a generic migrator fails on applies, a failure resumes, edits of applied
 * statements are refused, concurrent runners apply once, and the lint agrees with the stand-in.
 */
import { execFile } from 'node:child_process'
import { cpSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { dsql, DsqlConfigError, type DsqlSql } from '../lib'
import { startLocalDsql, type LocalDsql } from '../lib/local'
import { check, migrate, plan, MigrationError } from '../lib/migrate'
import { isAtomic } from '../lib/migrate/apply'
import { readMigrations, splitSql } from '../lib/migrate/files'
import { DEFAULT_LEDGER_SCHEMA, Ledger } from '../lib/migrate/ledger'

let local: LocalDsql
let sql: DsqlSql
const connection = () => ({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials })

beforeAll(async () => {
  local = await startLocalDsql({ roles: ['appuser'] })
  sql = dsql({ ...connection(), onnotice: () => undefined })
}, 60_000)
afterAll(async () => {
  await sql?.end()
  await local?.stop()
})

/** A directory holding these files. The ledger is keyed by file name: each test uses its own names. */
function migrations(files: Record<string, string>, dir = mkdtempSync(join(tmpdir(), 'migrations-'))): string {
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
  return dir
}

const ledger = (prefix: string) =>
  sql<{ file: string; statement: number; state: string }[]>`
    select file, statement, state from postgres_dsql_migrate.ledger where file like ${prefix + '%'} order by file, statement`

async function rejection(promise: Promise<unknown>): Promise<MigrationError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  )
  expect(err).toBeInstanceOf(MigrationError)
  return err as MigrationError
}

describe('splitting', () => {
  test('a real lexer: strings, dollar quotes, comments and BEGIN ATOMIC bodies never split a statement', () => {
    const text = [
      "-- a comment; with a semicolon",
      "INSERT INTO t VALUES ('a;b', E'it\\'s; fine', $$x;y$$, $tag$ $$ ; $tag$);",
      '/* nested /* comment; */ still; */ SELECT ";" FROM "semi;colon";',
      'CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql',
      'BEGIN ATOMIC',
      '  SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END;',
      '  SELECT 3;',
      'END;',
      'SELECT 4',
    ].join('\n')
    const statements = splitSql(text)
    expect(statements.map((s) => [s.line, s.text.split('\n')[0]])).toEqual([
      [2, "INSERT INTO t VALUES ('a;b', E'it\\'s; fine', $$x;y$$, $tag$ $$ ; $tag$)"],
      [3, 'SELECT ";" FROM "semi;colon"'],
      [4, 'CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql'],
      [9, 'SELECT 4'],
    ])
    expect(statements[2].text.endsWith('SELECT 3;\nEND')).toBe(true)
  })
})

describe('what shares a transaction with its ledger row', () => {
  test('DML and blocks of DML do; DDL, SET, CALL, SELECT ... INTO and a block that rolls back do not', () => {
    const units = (text: string) => {
      const dir = migrations({ 'kind.sql': text })
      return readMigrations(dir)[0].units.map(isAtomic)
    }
    expect(units("INSERT INTO t VALUES (1);\nUPDATE t SET n = 2;\nDELETE FROM t;\nSELECT 1;\nWITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x;\nBEGIN;\nINSERT INTO t VALUES (1);\nUPDATE t SET n = 3;\nCOMMIT;\n")).toEqual(
      [true, true, true, true, true, true],
    )
    expect(
      units('CREATE TABLE t (n int);\nSET search_path = s;\nCALL sys.wait_for_job(\'x\');\nSELECT * INTO u FROM t;\nBEGIN;\nCREATE TABLE v (n int);\nCOMMIT;\nBEGIN;\nINSERT INTO t VALUES (1);\nROLLBACK;\nCOMMENT ON TABLE t IS \'x\';\n'),
    ).toEqual([false, false, false, false, false, false, false])
  })
})

describe('applying', () => {
  test('files a generic migrator fails on all apply: several DDL in a file, DML after DDL, an ASYNC index and a statement that needs it', async () => {
    // What a generic migrator does, one transaction per file, is what DSQL refuses.
    await expect(sql.begin((tx) => [tx.unsafe('CREATE TABLE generic_a (id int)'), tx.unsafe('CREATE TABLE generic_b (id int)')])).rejects.toMatchObject({
      code: '0A000',
      message: 'multiple ddl statements not supported in a transaction',
    })

    const dir = mkdtempSync(join(tmpdir(), 'samples-'))
    cpSync(join(__dirname, '..', 'samples', 'migrations'), dir, { recursive: true })
    const pending = await plan(sql, { dir })
    expect(pending.map((p) => `${p.file}:${p.line}`)).toEqual([
      '001_accounts.sql:3', '001_accounts.sql:10', '001_accounts.sql:16', '002_unique_email.sql:3', '002_unique_email.sql:5', '003_welcome_invoices.sql:2', '003_welcome_invoices.sql:8',
    ])
    const lines: string[] = []
    await expect(migrate(sql, { dir, log: (line) => lines.push(line) })).resolves.toEqual({ applied: ['001_accounts.sql', '002_unique_email.sql', '003_welcome_invoices.sql'] })
    expect(lines).toEqual(['001_accounts.sql: applied 3 statements', '002_unique_email.sql: applied 2 statements', '003_welcome_invoices.sql: applied 2 statements'])

    expect(await sql`select email, plan from accounts order by email`).toEqual([
      { email: 'ada@example.com', plan: 'pro' },
      { email: 'alan@example.com', plan: 'pro' },
    ])
    const [constraint] = await sql`select contype from pg_constraint where conname = 'accounts_email_key'`
    expect(constraint).toEqual({ contype: 'u' })
    expect(await sql`select count(*)::int as n from invoices`).toEqual([{ n: 1 }])
    expect(await sql`select obj_description('invoices'::regclass) as comment`).toEqual([{ comment: 'One row per invoice; amounts in cents.' }])

    // Run again: nothing pending, nothing applied twice.
    lines.length = 0
    await expect(migrate(sql, { dir, log: (line) => lines.push(line) })).resolves.toEqual({ applied: [] })
    expect(lines).toEqual(['Nothing to apply: 3 files are up to date.'])
    expect(await plan(sql, { dir })).toEqual([])
    expect(await sql`select count(*)::int as n from accounts`).toEqual([{ n: 2 }])
  })

  test('a failing statement stops the run, names file, statement and line, and the next run resumes at it', async () => {
    const dir = migrations({
      'resume_1.sql': 'CREATE TABLE resume_t (n int);\n\nINSERT INTO resume_t VALUES (1);\n\n-- fails: no such table yet\nINSERT INTO resume_missing VALUES (2);\nINSERT INTO resume_t VALUES (3);\n',
      'resume_2.sql': 'INSERT INTO resume_t VALUES (4);\n',
    })
    const err = await rejection(migrate(sql, { dir }))
    expect(err).toMatchObject({ code: 'MIGRATE_FAILED', file: 'resume_1.sql', statement: 3, line: 6 })
    expect(err.message).toMatch(/^resume_1\.sql:6: statement 3 failed: relation "resume_missing" does not exist \(SQLSTATE 42P01\)/)
    expect(err.cause).toMatchObject({ code: '42P01' })
    expect(await sql`select n from resume_t order by n`).toEqual([{ n: 1 }])
    expect(await ledger('resume_')).toEqual([
      { file: 'resume_1.sql', statement: 1, state: 'applied' },
      { file: 'resume_1.sql', statement: 2, state: 'applied' },
    ])

    // Editing the part not yet applied is allowed; the applied part does not run again.
    migrations({ 'resume_1.sql': 'CREATE TABLE resume_t (n int);\n\nINSERT INTO resume_t VALUES (1);\n\n-- fixed\nINSERT INTO resume_t VALUES (2);\nINSERT INTO resume_t VALUES (3);\n' }, dir)
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['resume_1.sql', 'resume_2.sql'] })
    expect(await sql`select n from resume_t order by n`).toEqual([{ n: 1 }, { n: 2 }, { n: 3 }, { n: 4 }])
  })

  test('a failing BEGIN ... COMMIT block is rolled back whole and retried whole', async () => {
    const dir = migrations({ 'block_1.sql': 'CREATE TABLE block_t (n int);\nBEGIN;\nINSERT INTO block_t VALUES (1);\nINSERT INTO block_t VALUES (1 / 0);\nCOMMIT;\n' })
    const err = await rejection(migrate(sql, { dir }))
    expect(err).toMatchObject({ code: 'MIGRATE_FAILED', file: 'block_1.sql', statement: 2, line: 2 })
    expect(err.message).toContain('the BEGIN ... COMMIT block at line 2 (rolled back) failed: division by zero')
    expect(await sql`select n from block_t`).toEqual([])
    migrations({ 'block_1.sql': 'CREATE TABLE block_t (n int);\nBEGIN;\nINSERT INTO block_t VALUES (1);\nINSERT INTO block_t VALUES (2 / 1);\nCOMMIT;\n' }, dir)
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['block_1.sql'] })
    expect(await sql`select n from block_t order by n`).toEqual([{ n: 1 }, { n: 2 }])
  })

  test('a BEGIN ... COMMIT block holding one DDL runs as one transaction, and its index job is waited for', async () => {
    const dir = migrations({ 'ddlblock_1.sql': 'CREATE TABLE ddlblock_t (n int);\nBEGIN;\nCREATE INDEX ASYNC ddlblock_by_n ON ddlblock_t (n);\nCOMMIT;\nSELECT 1;\n' })
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['ddlblock_1.sql'] })
    expect(await sql`select status from sys.jobs where object_name = 'ddlblock_by_n'`).toEqual([{ status: 'completed' }])
    expect(await ledger('ddlblock_')).toEqual([1, 2, 3].map((statement) => ({ file: 'ddlblock_1.sql', statement, state: 'applied' })))
  })

  test('a statement that conflicts with another transaction (OCC) is run again', async () => {
    await sql`create table occ_t (id int primary key, n int)`
    await sql`insert into occ_t values (1, 0)`
    const dir = migrations({ 'occ_1.sql': 'UPDATE occ_t SET n = n + 1 WHERE id = 1;\n' })
    // Another transaction holds the row: the stand-in answers DSQL's conflict (40001) instead of waiting.
    const holder = await sql.reserve()
    const lines: string[] = []
    let running: Promise<unknown> | undefined
    try {
      await holder`begin`
      await holder`update occ_t set n = 10 where id = 1`
      running = migrate(sql, { dir, log: (line) => lines.push(line) })
      for (let i = 0; i < 1200 && !lines.length; i++) await new Promise((r) => setTimeout(r, 50))
    } finally {
      await holder`commit`
      holder.release()
    }
    await expect(running).resolves.toEqual({ applied: ['occ_1.sql'] })
    expect(lines[0]).toMatch(/^occ_1\.sql: statement 1 conflicted with another transaction \(.*\(OC00[01]\)\); trying again\.$/)
    expect(await sql`select n from occ_t`).toEqual([{ n: 11 }])
  }, 120_000)

  test('an index build that fails is reported for its file and statement, and what needs the index does not run', async () => {
    const dir = migrations({
      'badindex_1.sql': "CREATE TABLE badindex_t (email text);\nINSERT INTO badindex_t VALUES ('a'), ('a');\nCREATE UNIQUE INDEX ASYNC badindex_key ON badindex_t (email);\nALTER TABLE badindex_t ADD CONSTRAINT badindex_key UNIQUE USING INDEX badindex_key;\n",
    })
    const err = await rejection(migrate(sql, { dir }))
    // The statement returns its job at once (as on DSQL); the job fails on the duplicate keys.
    expect(err).toMatchObject({ code: 'MIGRATE_JOB', file: 'badindex_1.sql', statement: 3, line: 3 })
    expect(err.message).toMatch(/^badindex_1\.sql:3: statement 3: job \w+ failed: could not create unique index "badindex_key".*Key \(email\)=\(a\) is duplicated\./)
    expect(err.message).toContain('Fix the cause, drop what the job may have left (DROP INDEX IF EXISTS badindex_key), and run migrate again: it resumes at this statement.')
    expect(await ledger('badindex_')).toEqual([
      { file: 'badindex_1.sql', statement: 1, state: 'applied' },
      { file: 'badindex_1.sql', statement: 2, state: 'applied' },
    ])
    expect(await sql`select 1 from pg_constraint where conname = 'badindex_key'`).toEqual([])

    // Doing what the message says resumes at the index: it is built, and the constraint uses it.
    await sql`delete from badindex_t`
    await sql.unsafe(err.message.match(/\((DROP INDEX [^)]+)\)/)?.[1] ?? 'missing')
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['badindex_1.sql'] })
    expect(await sql`select contype from pg_constraint where conname = 'badindex_key'`).toEqual([{ contype: 'u' }])
  })

  test('duplicates written while the index job runs fail the job; the half-built index it leaves is named for DROP INDEX IF EXISTS', async () => {
    await sql`create table late_t (email text)`
    await sql`insert into late_t values ('a'), ('b')`
    const dir = migrations({ 'late_1.sql': 'CREATE UNIQUE INDEX ASYNC late_key ON late_t (email);\nSELECT 1;\n' })
    local.holdJobs()
    let running: Promise<unknown> | undefined
    try {
      running = migrate(sql, { dir }).catch((e: unknown) => e)
      // The job is submitted and held: the index exists, is not ready, and does not enforce yet.
      for (let i = 0; i < 1200; i++) {
        const [job] = await sql`select status from sys.jobs where object_name = 'late_key' and status in ('submitted', 'processing')`
        if (job) break
        await new Promise((r) => setTimeout(r, 50))
      }
      await sql`insert into late_t values ('a')`
    } finally {
      local.releaseJobs()
    }
    const err = (await running) as MigrationError
    expect(err).toBeInstanceOf(MigrationError)
    expect(err).toMatchObject({ code: 'MIGRATE_JOB', file: 'late_1.sql', statement: 1, line: 1 })
    expect(err.message).toMatch(/job \w+ failed: .*could not create unique index "late_key"/)
    expect(await sql`select count(*)::int as n from pg_class where relname = 'late_key'`).toEqual([{ n: 1 }])
    expect(await ledger('late_')).toEqual([])

    await sql`delete from late_t where email = 'a'`
    await sql.unsafe(err.message.match(/\((DROP INDEX IF EXISTS [^)]+)\)/)?.[1] ?? 'missing')
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['late_1.sql'] })
    expect(await sql`select indisvalid from pg_index where indexrelid = 'late_key'::regclass`).toEqual([{ indisvalid: true }])
  }, 120_000)

  test('the same file checked out on Windows (CRLF line ends, a byte order mark) is the same migration', async () => {
    const text = "-- accounts\nCREATE TABLE crlf_t (\n  n int\n);\nINSERT INTO crlf_t VALUES (1);\n"
    const dir = migrations({ 'crlf_1.sql': '\uFEFF' + text.replace(/\n/g, '\r\n') })
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['crlf_1.sql'] })
    expect(readMigrations(dir)[0].units.map((u) => u.line)).toEqual([2, 5])
    migrations({ 'crlf_1.sql': text }, dir)
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: [] })
    expect(await sql`select n from crlf_t`).toEqual([{ n: 1 }])
  })

  test('an edited applied statement is refused, naming the file, and that run applies nothing, not even new files', async () => {
    const dir = migrations({ 'edit_1.sql': 'CREATE TABLE edit_t (n int);\nINSERT INTO edit_t VALUES (1);\n' })
    await migrate(sql, { dir })
    // Comments and blank lines around statements are not part of them.
    migrations({ 'edit_1.sql': '-- the first migration\n\nCREATE TABLE edit_t (n int);\n\nINSERT INTO edit_t VALUES (1);\n' }, dir)
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: [] })

    migrations({ 'edit_1.sql': 'CREATE TABLE edit_t (n int);\nINSERT INTO edit_t VALUES (100);\n', 'edit_2.sql': 'INSERT INTO edit_t VALUES (2);\n' }, dir)
    const err = await rejection(migrate(sql, { dir }))
    expect(err).toMatchObject({ code: 'MIGRATE_EDITED', file: 'edit_1.sql' })
    expect(err.message).toMatch(/applied statements were edited in edit_1\.sql:2 \(statement 2 differs from what was applied\).*Nothing was applied/)
    expect(await sql`select n from edit_t`).toEqual([{ n: 1 }])
    expect(await ledger('edit_2')).toEqual([])
    await expect(plan(sql, { dir })).rejects.toMatchObject({ code: 'MIGRATE_EDITED' })
  })

  test('two runners started at once apply every statement exactly once, and both succeed', async () => {
    const inserts = (from: number) => Array.from({ length: 10 }, (_, i) => `INSERT INTO race_t VALUES (${from + i});`).join('\n')
    const dir = migrations({
      'race_1.sql': `CREATE TABLE race_t (n int);\n${inserts(0)}\nCREATE INDEX ASYNC race_by_n ON race_t (n);\n${inserts(10)}\n`,
      'race_2.sql': `CREATE TABLE race_u (n int);\nINSERT INTO race_u SELECT n FROM race_t;\n${inserts(20)}\n`,
      'race_3.sql': `BEGIN;\n${inserts(30)}\nCOMMIT;\n`,
    })
    // A third runner holds statement 1, so that both start racing from the same point once it is done.
    await migrate(sql, { dir: migrations({ 'race_0.sql': 'SELECT 1;\n' }) })
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat)
              values ('race_1.sql', 1, 1, ${readMigrations(dir)[0].units[0].checksum}, 'running', 'third-runner', now())`
    // Two deploys: separate pools, separate sessions, the same files.
    const other = dsql({ ...connection(), onnotice: () => undefined })
    try {
      const logs: string[][] = [[], []]
      // A generous lease: the hand-made claim is never refreshed, however slow this machine is.
      const runs = [migrate(sql, { dir, leaseSecs: 600, log: (l) => logs[0].push(l) }), migrate(other, { dir, leaseSecs: 600, log: (l) => logs[1].push(l) })]
      for (let i = 0; i < 1200 && !(logs[0].length && logs[1].length); i++) await new Promise((r) => setTimeout(r, 50))
      const waited = logs.map((l) => l[0])
      // The third runner finishes statement 1 (here by hand: the table, then its ledger row).
      await sql`create table race_t (n int)`
      await sql`update postgres_dsql_migrate.ledger set state = 'applied' where file = 'race_1.sql' and statement = 1`
      const results = await Promise.all(runs)
      expect(waited).toEqual(Array(2).fill('race_1.sql: statement 1 is being applied by another runner; waiting for it.'))
      expect(new Set(results.flatMap((r) => r.applied))).toEqual(new Set(['race_1.sql', 'race_2.sql', 'race_3.sql']))

      // The claim itself: of two runners inserting the same statement's row, one wins.
      const [a, b] = [new Ledger(sql, sql, DEFAULT_LEDGER_SCHEMA, 'runner-a'), new Ledger(other, other, DEFAULT_LEDGER_SCHEMA, 'runner-b')]
      expect(await a.claim('race_9.sql', 1, 1, 'x', false)).toBe(true)
      expect(await b.claim('race_9.sql', 1, 1, 'x', true)).toBe(false)
    } finally {
      await other.end()
    }
    // Each INSERT would add its row again if it ran twice.
    const rows = await sql`select n, count(*)::int as copies from race_t group by n order by n`
    expect(rows).toEqual(Array.from({ length: 40 }, (_, n) => ({ n, copies: 1 })))
    expect(await sql`select count(*)::int as n from race_u`).toEqual([{ n: 20 }])
    const recorded = (await ledger('race_')).filter((r) => r.file !== 'race_9.sql')
    expect(recorded.every((r) => r.state === 'applied')).toBe(true)
    expect(recorded).toHaveLength(1 + 22 + 12 + 1)
  }, 120_000)

  test('two runners on a cluster without a ledger both create it and succeed', async () => {
    const dir = migrations({ 'fresh_1.sql': 'CREATE TABLE fresh_t (n int);\nINSERT INTO fresh_t VALUES (1);\n' })
    const other = dsql({ ...connection(), onnotice: () => undefined })
    try {
      const results = await Promise.all([migrate(sql, { dir, ledgerSchema: 'fresh_ledger' }), migrate(other, { dir, ledgerSchema: 'fresh_ledger' })])
      expect(results.flatMap((r) => r.applied)).toEqual(['fresh_1.sql'])
    } finally {
      await other.end()
    }
    expect(await sql`select n from fresh_t`).toEqual([{ n: 1 }])
    expect(await sql`select statement, state from fresh_ledger.ledger order by statement`).toEqual([
      { statement: 1, state: 'applied' },
      { statement: 2, state: 'applied' },
    ])
  })

  test("a runner waits for another runner's claim, and a claim whose runner stopped is reported with how to settle it", async () => {
    const dir = migrations({ 'claim_1.sql': 'CREATE TABLE claim_t (n int);\nINSERT INTO claim_t VALUES (1);\nINSERT INTO claim_t VALUES (2);\n' })
    await migrate(sql, { dir: migrations({ 'claim_0.sql': 'SELECT 1;\n' }) }) // creates the ledger
    // Another runner is in the middle of statement 1 (its claim is fresh).
    const checksum = readMigrations(dir)[0].units[0].checksum
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat)
              values ('claim_1.sql', 1, 1, ${checksum}, 'running', 'other-runner', now())`
    const lines: string[] = []
    const running = migrate(sql, { dir, leaseSecs: 600, log: (line) => lines.push(line) })
    for (let i = 0; i < 1200 && !lines.length; i++) await new Promise((r) => setTimeout(r, 50))
    expect(lines).toEqual(['claim_1.sql: statement 1 is being applied by another runner; waiting for it.'])
    // The other runner finishes it (here by hand: the table, then its ledger row).
    await sql`create table claim_t (n int)`
    await sql`update postgres_dsql_migrate.ledger set state = 'applied' where file = 'claim_1.sql' and statement = 1`
    await expect(running).resolves.toEqual({ applied: ['claim_1.sql'] })
    expect(await sql`select n from claim_t order by n`).toEqual([{ n: 1 }, { n: 2 }])

    // A runner that died while a statement ran alone (not in one transaction with its ledger row):
    // its claim's heartbeat is old, the outcome unknown. The run refuses before applying anything.
    migrations({ 'claim_2.sql': 'ALTER TABLE claim_t ADD COLUMN m int;\n', 'claim_3.sql': 'INSERT INTO claim_t VALUES (4);\n' }, dir)
    const stale = readMigrations(dir)[1].units[0].checksum
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat)
              values ('claim_2.sql', 1, 1, ${stale}, 'running', 'dead-runner', now() - interval '1 hour')`
    const err = await rejection(migrate(sql, { dir }))
    expect(err).toMatchObject({ code: 'MIGRATE_STALE_CLAIM', file: 'claim_2.sql', statement: 1, line: 1 })
    expect(err.message).toBe(
      'claim_2.sql:1: statement 1: it was claimed by a runner that stopped reporting 3600 s ago, so whether it took effect is unknown. Check, then ' +
        "if it took effect, run `npx postgres-dsql migrate --settle claim_2.sql:1=applied` (or `UPDATE \"postgres_dsql_migrate\".ledger SET state = 'applied' WHERE file = 'claim_2.sql' AND statement = 1`); " +
        "if it did not, run `npx postgres-dsql migrate --settle claim_2.sql:1=not-applied` (or `DELETE FROM \"postgres_dsql_migrate\".ledger WHERE file = 'claim_2.sql' AND statement = 1`) and migrate again. Nothing was applied.",
    )
    expect(await ledger('claim_3')).toEqual([])
    // It did not take effect (no column m): settled as the message says, the next run applies it.
    const settle = /`(DELETE FROM [^`]+)`\) and migrate again/.exec(err.message)?.[1]
    await sql.unsafe(settle as string)
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['claim_2.sql', 'claim_3.sql'] })
    expect(await sql`select n, m from claim_t order by n`).toEqual([1, 2, 4].map((n) => ({ n, m: null })))
  }, 120_000)
})

describe('a lost connection', () => {
  /** The backend running a query like `pattern` for a runner (not this test's own session). */
  async function backend(pattern: string): Promise<number> {
    for (let i = 0; i < 1200; i++) {
      const [row] = await sql<{ pid: number }[]>`select pid from pg_stat_activity where query like ${pattern} and state = 'active' and pid <> pg_backend_pid()`
      if (row) return row.pid
      await new Promise((r) => setTimeout(r, 50))
    }
    throw new Error(`no backend runs ${pattern}`)
  }

  test('DML shares its transaction with its ledger row: lost mid-statement, it is not half-recorded, and the next run applies it exactly once', async () => {
    const dir = migrations({ 'lostdml_1.sql': 'CREATE TABLE lostdml_t (n int);\nINSERT INTO lostdml_t SELECT 1 FROM pg_sleep(600);\nINSERT INTO lostdml_t VALUES (2);\n' })
    const running = migrate(sql, { dir }).catch((e: unknown) => e)
    const pid = await backend('%INSERT INTO lostdml_t SELECT 1 FROM pg_sleep(600)')
    // While the statement runs, its own transaction already holds the ledger row's update.
    const [locks] = await sql`select count(*)::int as n from pg_locks where pid = ${pid} and relation = 'postgres_dsql_migrate.ledger'::regclass and mode = 'RowExclusiveLock'`
    expect(locks).toEqual({ n: 1 })
    expect(await ledger('lostdml_')).toEqual([
      { file: 'lostdml_1.sql', statement: 1, state: 'applied' },
      { file: 'lostdml_1.sql', statement: 2, state: 'claimed' },
    ])
    // The server ends the session under the statement, as a network failure would.
    await sql`select pg_terminate_backend(${pid})`
    const err = (await running) as MigrationError
    expect(err).toBeInstanceOf(MigrationError)
    expect(err).toMatchObject({ code: 'MIGRATE_CONNECTION_LOST', file: 'lostdml_1.sql', statement: 2, line: 2 })
    expect(err.message).toMatch(
      /^lostdml_1\.sql:2: statement 2: the connection was lost while it ran \(.+\)\. It and its ledger row were one transaction, so it took effect completely or not at all, and the ledger records which: run migrate again/,
    )
    // Nothing uncertain is left: the claim is released, the statement had no effect.
    expect(await ledger('lostdml_')).toEqual([{ file: 'lostdml_1.sql', statement: 1, state: 'applied' }])
    expect(await sql`select n from lostdml_t`).toEqual([])

    // The rest of the file may still change (here the sleep goes); the next run applies it once.
    migrations({ 'lostdml_1.sql': 'CREATE TABLE lostdml_t (n int);\nINSERT INTO lostdml_t SELECT 1;\nINSERT INTO lostdml_t VALUES (2);\n' }, dir)
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['lostdml_1.sql'] })
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: [] })
    expect(await sql`select n from lostdml_t order by n`).toEqual([{ n: 1 }, { n: 2 }])
  }, 120_000)

  test('an outage under a DML statement: no crash, and once the endpoint answers again its claim is taken over and applied once', async () => {
    const dir = migrations({ 'outage_1.sql': 'CREATE TABLE outage_t (n int);\nINSERT INTO outage_t SELECT 1 FROM pg_sleep(600);\n' })
    const runner = dsql({ ...connection(), onnotice: () => undefined })
    const running = migrate(runner, { dir }).catch((e: unknown) => e)
    const pid = await backend('%INSERT INTO outage_t SELECT 1 FROM pg_sleep(600)')
    let err: unknown
    try {
      // Every client connection drops (the runner's and the pool's): nothing can be cleaned up now.
      await local.stopGateway()
      err = await running
    } finally {
      await local.startGateway()
    }
    expect(err).toMatchObject({ code: 'MIGRATE_CONNECTION_LOST', file: 'outage_1.sql', statement: 2 })
    // The server runs the statement on, in its transaction with the ledger's row; here it ends
    // before committing (rather than when the sleep ends).
    await sql`select pg_terminate_backend(${pid})`
    expect(await sql`select n from outage_t`).toEqual([])
    // Statement 2 is not recorded as applied. Its claim stays while nothing could remove it (it
    // goes if the endpoint answered again first); a claim whose lease ended is taken over: DML
    // that did not commit left no trace. The text of a statement not yet applied may change.
    const [claim] = await sql`select state from postgres_dsql_migrate.ledger where file = 'outage_1.sql' and statement = 2`
    expect([undefined, { state: 'claimed' }]).toContainEqual(claim)
    migrations({ 'outage_1.sql': 'CREATE TABLE outage_t (n int);\nINSERT INTO outage_t SELECT 1;\n' }, dir)
    await sql`update postgres_dsql_migrate.ledger set heartbeat = now() - interval '1 hour' where file = 'outage_1.sql' and statement = 2`
    const lines: string[] = []
    await expect(migrate(sql, { dir, log: (l) => lines.push(l) })).resolves.toEqual({ applied: ['outage_1.sql'] })
    if (claim) expect(lines[0]).toBe('outage_1.sql: statement 2: its runner stopped before it committed; applying it.')
    expect(await sql`select n from outage_t`).toEqual([{ n: 1 }])
    // The runner's pool: postgres.js 3.4.9 keeps the query of a reserved connection lost in the
    // outage once a later connect on that slot failed, and its end() would wait for it (a
    // lib/connect matter, like the crash release() would cause); a timeout ends it.
    await runner.end({ timeout: 5 })
  }, 120_000)

  test('DML that commits after its answer was lost is recorded by that same commit, and never runs again', async () => {
    const dir = migrations({ 'aftercommit_1.sql': 'CREATE TABLE aftercommit_t (n int);\nINSERT INTO aftercommit_t SELECT 1 FROM pg_sleep(8);\n' })
    const runner = dsql({ ...connection(), onnotice: () => undefined })
    const running = migrate(runner, { dir }).catch((e: unknown) => e)
    const pid = await backend('%INSERT INTO aftercommit_t SELECT 1 FROM pg_sleep(8)')
    let err: unknown
    try {
      // The client is gone while the server is in the statement: the server finishes the query,
      // commits it, and only then finds nobody to answer. The runner cannot know it committed.
      await local.stopGateway()
      err = await running
    } finally {
      await local.startGateway()
    }
    expect(err).toMatchObject({ code: 'MIGRATE_CONNECTION_LOST', file: 'aftercommit_1.sql', statement: 2 })
    for (let i = 0; i < 1200 && (await sql`select 1 from pg_stat_activity where pid = ${pid}`).length; i++) await new Promise((r) => setTimeout(r, 50))
    expect(await sql`select n from aftercommit_t`).toEqual([{ n: 1 }])
    // The ledger row committed with it: the next run knows, and does not apply it again.
    expect(await ledger('aftercommit_')).toEqual([1, 2].map((statement) => ({ file: 'aftercommit_1.sql', statement, state: 'applied' })))
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: [] })
    expect(await sql`select n from aftercommit_t`).toEqual([{ n: 1 }])
    await runner.end({ timeout: 5 }) // see the test above
  }, 120_000)

  test('DDL lost while it runs keeps its claim, names the way to settle it; the next run refuses and applies nothing until it is settled', async () => {
    const dir = migrations({
      'lostddl_1.sql': 'CREATE TABLE lostddl_t (email text);\nCREATE INDEX ASYNC lostddl_by_email ON lostddl_t (email);\nINSERT INTO lostddl_t VALUES (\'a\');\n',
    })
    local.holdJobs()
    let err: MigrationError
    try {
      const running = migrate(sql, { dir }).catch((e: unknown) => e)
      // The index statement committed and returned its job; the runner waits for the job.
      await sql`select pg_terminate_backend(${await backend('CALL sys.wait_for_job(%')})`
      err = (await running) as MigrationError
    } finally {
      local.releaseJobs()
    }
    expect(err).toBeInstanceOf(MigrationError)
    expect(err).toMatchObject({ code: 'MIGRATE_CONNECTION_LOST', file: 'lostddl_1.sql', statement: 2, line: 2 })
    const [{ job_id: job }] = await sql<{ job_id: string }[]>`select job_id from sys.jobs where object_name = 'lostddl_by_email'`
    expect(err.message).toContain(`lostddl_1.sql:2: statement 2: the connection was lost while waiting for its index job ${job} (`)
    expect(err.message).toContain(
      `The statement took effect; the job may still be running: \`SELECT status, details FROM sys.jobs WHERE job_id = '${job}'\`. ` +
        'Once it says completed, settle it as applied; if it failed, drop what it left (DROP INDEX IF EXISTS lostddl_by_email) and settle it as not applied. ' +
        'Until then migrate goes no further: if it took effect, run `npx postgres-dsql migrate --settle lostddl_1.sql:2=applied`',
    )
    expect(await ledger('lostddl_')).toEqual([
      { file: 'lostddl_1.sql', statement: 1, state: 'applied' },
      { file: 'lostddl_1.sql', statement: 2, state: 'unknown' },
    ])

    // The next run (a new file too) refuses at once and applies nothing, not even what comes before.
    migrations({ 'lostddl_0.sql': 'CREATE TABLE lostddl_early (n int);\n' }, dir)
    const refused = await rejection(migrate(sql, { dir }))
    expect(refused).toMatchObject({ code: 'MIGRATE_STALE_CLAIM', file: 'lostddl_1.sql', statement: 2, line: 2 })
    expect(refused.message).toMatch(/^lostddl_1\.sql:2: statement 2: its runner lost the connection while it ran, so whether it took effect is unknown\. Check, then .*Nothing was applied\.$/s)
    expect(await sql`select 1 from pg_tables where tablename = 'lostddl_early'`).toEqual([])
    expect(await sql`select n from lostddl_t`.catch(() => 'no column n')).toBe('no column n')

    // The job completes; settled as applied with the command the message names, the run goes on.
    await sql`call sys.wait_for_job(${job})`
    expect(await sql`select status from sys.jobs where job_id = ${job}`).toEqual([{ status: 'completed' }])
    expect(await cli([dir, '--settle', 'lostddl_1.sql:2=applied'], local.env)).toEqual({ code: 0, out: 'lostddl_1.sql: statement 2 settled as applied.\n', err: '' })
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['lostddl_0.sql', 'lostddl_1.sql'] })
    expect(await sql`select email from lostddl_t`).toEqual([{ email: 'a' }])
    expect(await ledger('lostddl_1')).toEqual([1, 2, 3].map((statement) => ({ file: 'lostddl_1.sql', statement, state: 'applied' })))
  }, 120_000)

  test('a CREATE TABLE whose outcome was lost is settled by the catalog: recorded when the table exists, applied again when it does not', async () => {
    const dir = migrations({
      'catalog_1.sql': 'CREATE TABLE catalog_a (n int);\nINSERT INTO catalog_a VALUES (1);\n',
      'catalog_2.sql': 'CREATE TABLE IF NOT EXISTS public."Catalog_B" (n int);\nINSERT INTO "Catalog_B" VALUES (2);\n',
    })
    await migrate(sql, { dir: migrations({ 'catalog_0.sql': 'SELECT 1;\n' }) })
    const [a, b] = readMigrations(dir).map((f) => f.units[0].checksum)
    // Runners that lost the connection under each CREATE TABLE: the first did create its table.
    await sql`create table catalog_a (n int)`
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat) values
              ('catalog_1.sql', 1, 1, ${a}, 'unknown', 'lost-runner', now()), ('catalog_2.sql', 1, 1, ${b}, 'unknown', 'lost-runner', now())`
    const lines: string[] = []
    await expect(migrate(sql, { dir, log: (l) => lines.push(l) })).resolves.toEqual({ applied: ['catalog_1.sql', 'catalog_2.sql'] })
    expect(lines.slice(0, 2)).toEqual([
      "catalog_1.sql: statement 1's outcome was unknown (its runner lost the connection); the table it creates exists, so it took effect: recorded as applied.",
      "catalog_2.sql: statement 1's outcome was unknown (its runner lost the connection); the table it creates does not exist, so it did not take effect: applying it again.",
    ])
    expect(await sql`select n from catalog_a`).toEqual([{ n: 1 }])
    expect(await sql`select n from "Catalog_B"`).toEqual([{ n: 2 }])
    expect((await ledger('catalog_')).filter((r) => r.file !== 'catalog_0.sql').every((r) => r.state === 'applied')).toBe(true)
  })

  test('DML too big to share a transaction with its ledger row (DSQL: 3,000 rows) runs alone and is recorded after', async () => {
    const dir = migrations({ 'big_1.sql': 'CREATE TABLE big_t (n int);\nINSERT INTO big_t SELECT generate_series(1, 3000);\n' })
    const lines: string[] = []
    await expect(migrate(sql, { dir, log: (l) => lines.push(l) })).resolves.toEqual({ applied: ['big_1.sql'] })
    expect(lines[0]).toMatch(/^big_1\.sql: statement 2 does not fit in one transaction with its ledger row \(.*\(?transaction row limit exceeded.*\); running it alone\.$/)
    expect(await sql`select count(*)::int as n from big_t`).toEqual([{ n: 3000 }])
    expect(await ledger('big_')).toEqual([1, 2].map((statement) => ({ file: 'big_1.sql', statement, state: 'applied' })))
  })

  test('--settle refuses what has nothing to settle, a live claim, and a malformed target', async () => {
    const dir = migrations({ 'settle_1.sql': 'CREATE TABLE settle_t (n int);\nALTER TABLE settle_t ADD COLUMN m int;\n' })
    await migrate(sql, { dir: migrations({ 'settle_0.sql': 'SELECT 1;\n' }) })
    const checksum = readMigrations(dir)[0].units[1].checksum
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat)
              values ('settle_1.sql', 2, 2, ${checksum}, 'running', 'live-runner', now())`
    const env = { ...local.env, CLUSTER_USER: undefined, PGUSER: undefined, AWS_PROFILE: undefined }
    expect(await cli([dir, '--settle', 'settle_1.sql:2=applied'], env)).toMatchObject({ code: 1, err: expect.stringContaining('settle_1.sql: statement 2 is being applied by a runner that reported') })
    expect(await cli([dir, '--settle', 'settle_1.sql:1=applied'], env)).toMatchObject({ code: 1, err: 'postgres-dsql migrate: settle_1.sql: statement 1 has no claim in the ledger: there is nothing to settle.\n' })
    expect(await cli([dir, '--settle', 'settle_0.sql:1=not-applied'], env)).toMatchObject({ code: 1, err: expect.stringContaining('settle_0.sql: statement 1 was applied: there is nothing to settle.') })
    expect(await cli([dir, '--settle', 'settle_1.sql:2=done'], env)).toMatchObject({ code: 2, err: expect.stringContaining('--settle takes FILE:N=applied or FILE:N=not-applied') })
    expect(await cli([dir, '--settle', 'settle_1.sql:2=applied', '--dry-run'], env)).toMatchObject({ code: 2 })
    // A dead DML claim did not take effect: it cannot be settled as applied (the next run takes it over).
    migrations({ 'settle_2.sql': 'INSERT INTO settle_t (n) VALUES (7);\n' }, dir)
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat)
              values ('settle_2.sql', 1, 1, ${readMigrations(dir)[1].units[0].checksum}, 'claimed', 'dead-runner', now() - interval '1 hour')`
    expect(await cli([dir, '--settle', 'settle_2.sql:1=applied'], env)).toMatchObject({ code: 1, err: expect.stringContaining('settle_2.sql: statement 1 is DML, recorded in its own transaction') })
    // Once its runner is gone (its lease ran out), not-applied removes the claim: the next run applies it.
    await sql`update postgres_dsql_migrate.ledger set heartbeat = now() - interval '1 hour' where file = 'settle_1.sql'`
    expect(await cli([dir, '--settle', 'settle_1.sql:2=not-applied'], env)).toEqual({ code: 0, out: 'settle_1.sql: statement 2 settled as not-applied: the next run applies it.\n', err: '' })
    await sql`create table settle_t (n int)`
    await sql`insert into postgres_dsql_migrate.ledger (file, statement, line, checksum, state, runner, heartbeat)
              values ('settle_1.sql', 1, 1, ${readMigrations(dir)[0].units[0].checksum}, 'applied', 'a-runner', now())`
    await expect(migrate(sql, { dir })).resolves.toEqual({ applied: ['settle_1.sql', 'settle_2.sql'] })
    expect(await sql`select column_name from information_schema.columns where table_name = 'settle_t' order by ordinal_position`).toEqual([{ column_name: 'n' }, { column_name: 'm' }])
    expect(await sql`select n from settle_t`).toEqual([{ n: 7 }])
  })
})

describe('checking against DSQL\'s rules', () => {
  const bad = {
    'lint_1.sql': '-- orders\nCREATE TABLE lint_orders (\n  id serial PRIMARY KEY,\n  day date\n);\nCREATE INDEX lint_by_day ON lint_orders (day);\n',
    'lint_2.sql': 'BEGIN;\nCREATE TABLE lint_a (n int);\nCREATE TABLE lint_b (n int);\nCOMMIT;\n\nTRUNCATE lint_orders;\n',
  }

  test('--check reports serial, CREATE INDEX, DDL in one block and TRUNCATE with file, line and the DSQL way, and applies nothing', async () => {
    const dir = migrations(bad)
    const { code, out, err } = await cli([dir, '--check', '--host', local.host, '--hostaddr', local.hostaddr, '--port', String(local.port), '--sslrootcert', local.caFile])
    expect(code).toBe(1)
    expect(out).toBe('')
    const lines = err.trim().split('\n')
    expect(lines.slice(0, 4)).toEqual([
      expect.stringMatching(/^lint_1\.sql:3: \[serial\] statement 1: type "serial" does not exist \(42704\)\. DSQL way: use `bigint GENERATED BY DEFAULT AS IDENTITY \(CACHE 65536\)`/),
      expect.stringMatching(/^lint_1\.sql:6: \[create-index\] statement 2: .*DSQL way: write CREATE INDEX ASYNC/),
      expect.stringMatching(/^lint_2\.sql:3: \[one-ddl-per-transaction\] statement 1: multiple ddl statements not supported in a transaction/),
      expect.stringMatching(/^lint_2\.sql:6: \[truncate\] statement 2: unsupported statement: Truncate \(0A000\)\. DSQL way: DELETE in batches of at most 3,000 rows/),
    ])
    expect(lines[4]).toBe('postgres-dsql migrate: 4 findings; nothing was applied.')
    expect(await sql`select 1 from pg_tables where tablename like 'lint_%'`).toEqual([])
    expect(await ledger('lint_')).toEqual([])

    // The same rules refuse the run before it applies anything, and the stand-in agrees with each.
    const refused = await rejection(migrate(sql, { dir }))
    expect(refused).toMatchObject({ code: 'MIGRATE_LINT', file: 'lint_1.sql', line: 3 })
    expect(refused.findings.map((f) => f.rule)).toEqual(['serial', 'create-index', 'one-ddl-per-transaction', 'truncate'])
    expect(await sql`select 1 from pg_tables where tablename like 'lint_%'`).toEqual([])
    await expect(sql.unsafe('CREATE TABLE lint_orders (id serial PRIMARY KEY)')).rejects.toMatchObject({ code: '42704', message: 'type "serial" does not exist' })
    await expect(sql.unsafe('TRUNCATE pg_class')).rejects.toMatchObject({ code: '0A000', message: 'unsupported statement: Truncate' })
  })

  test('--check without an endpoint checks every file offline; a clean directory passes', async () => {
    const { code, err } = await cli([migrations(bad), '--check'], { CLUSTER_ENDPOINT: undefined, PGHOST: undefined })
    expect(code).toBe(1)
    expect(err).toContain('lint_1.sql:3: [serial]')
    expect(await check(null, { dir: join(__dirname, '..', 'samples', 'migrations') })).toEqual([])
    const clean = await cli([join(__dirname, '..', 'samples', 'migrations'), '--check'], { CLUSTER_ENDPOINT: undefined, PGHOST: undefined })
    expect(clean).toMatchObject({ code: 0, out: "No findings: the statements of every file follow DSQL's rules.\n" })
  })
})

describe('without libpg-query', () => {
  test('migrate applies (saying it skipped the lint) and --check says how to install it', async () => {
    const dir = migrations({ 'noparser_1.sql': 'CREATE TABLE noparser_t (n int);\nINSERT INTO noparser_t VALUES (1);\n' })
    const applied = await child(['migrate', dir])
    expect(applied).toEqual({ code: 0, out: "libpg-query is not installed: applying without checking against DSQL's rules first.\nnoparser_1.sql: applied 2 statements\n", err: '' })
    expect(await sql`select n from noparser_t`).toEqual([{ n: 1 }])
    const checked = await child(['migrate', dir, '--check'])
    expect(checked.code).toBe(1)
    expect(checked.err).toContain('needs the libpg-query package')
    expect(checked.err).toContain('npm i -D libpg-query@16')
  }, 300_000)
})

describe('options', () => {
  test('bad options are config errors that say what to pass, before anything connects', async () => {
    await expect(migrate(sql, { ledgerSchema: 'a"b' })).rejects.toThrow(new DsqlConfigError('ledgerSchema must be a plain schema name such as "postgres_dsql_migrate", not "a\\"b".'))
    await expect(migrate(sql, { jobTimeoutSecs: -1 })).rejects.toThrow(DsqlConfigError)
    await expect(plan(sql, { dir: '' })).rejects.toThrow(/dir must be the path of a directory/)
    await expect(migrate(sql, { dir: join(tmpdir(), 'no-such-dir-for-migrate') })).rejects.toMatchObject({ code: 'MIGRATE_FILES', message: expect.stringContaining('No migrations directory at') })
    const unclosed = migrations({ 'unclosed_1.sql': 'SELECT 1;\nBEGIN;\nINSERT INTO x VALUES (1);\n' })
    await expect(plan(sql, { dir: unclosed })).rejects.toMatchObject({ code: 'MIGRATE_FILES', message: 'unclosed_1.sql:2: BEGIN without COMMIT: end the block with COMMIT.' })
  })

  test('a role that may not create the ledger schema is told to name one it may use', async () => {
    const app = dsql({ ...connection(), user: 'appuser', onnotice: () => undefined })
    try {
      const dir = migrations({ 'role_1.sql': 'CREATE TABLE role_t (n int);\n' })
      const err = await rejection(migrate(app, { dir, ledgerSchema: 'role_ledger' }))
      expect(err.code).toBe('MIGRATE_LEDGER')
      expect(err.message).toMatch(/^Could not create the ledger schema "role_ledger": permission denied for database postgres \(SQLSTATE 42501\)\. /)
      expect(err.message).toContain('Run migrate as admin, or pass a schema this role may create tables in: ledgerSchema / --ledger-schema (e.g. myschema).')
      expect(err.cause).toMatchObject({ code: '42501' })
      // The way out it names works.
      await expect(migrate(app, { dir, ledgerSchema: 'myschema' })).resolves.toEqual({ applied: ['role_1.sql'] })
      expect(await app`select count(*)::int as n from myschema.ledger`).toEqual([{ n: 1 }])
    } finally {
      await app.end()
    }
  })

  test('a pool of one connection is refused before anything runs: the claim heartbeat would wait forever behind the reserved connection', async () => {
    const single = dsql({ ...connection(), max: 1, onnotice: () => undefined })
    try {
      const dir = migrations({ 'single_1.sql': 'CREATE TABLE single_t (n int);\n' })
      const err = await migrate(single, { dir }).catch((e: unknown) => e)
      expect(err).toBeInstanceOf(DsqlConfigError)
      expect((err as Error).message).toBe(
        'migrate needs a pool of at least 2 connections (max: 1 was given): one runs the statements, the other keeps their claims alive. Pass max: 2 or more.',
      )
      expect(await sql`select 1 from pg_tables where tablename = 'single_t'`).toEqual([])
    } finally {
      await single.end()
    }
  })
})

describe('the command', () => {
  test('exit 0 when applied or nothing is pending, 1 naming file and line when a statement fails, 2 for bad usage; --dry-run applies nothing', async () => {
    const dir = migrations({ 'cli_1.sql': 'CREATE TABLE cli_t (n int);\nINSERT INTO cli_t VALUES (1);\n' })
    // Connected the way the other commands are: the environment (CLUSTER_ENDPOINT, PGHOSTADDR, PGPORT, PGSSLROOTCERT, AWS_*).
    const env = { ...local.env, CLUSTER_USER: undefined, PGUSER: undefined, AWS_PROFILE: undefined }
    const dry = await cli([dir, '--dry-run'], env)
    expect(dry).toEqual({ code: 0, out: 'cli_1.sql:1  statement 1  CREATE TABLE cli_t (n int)\ncli_1.sql:2  statement 2  INSERT INTO cli_t VALUES (1)\n2 statements to apply.\n', err: '' })
    expect(await ledger('cli_')).toEqual([])

    expect(await cli([dir], env)).toEqual({ code: 0, out: 'cli_1.sql: applied 2 statements\n', err: '' })
    expect(await cli([dir], env)).toEqual({ code: 0, out: 'Nothing to apply: 1 file is up to date.\n', err: '' })
    expect(await cli([dir, '--dry-run'], env)).toMatchObject({ code: 0, out: 'Nothing to apply.\n' })

    migrations({ 'cli_2.sql': '\n\nINSERT INTO cli_nope VALUES (1);\n' }, dir)
    const failed = await cli([dir], env)
    expect(failed.code).toBe(1)
    expect(failed.err).toMatch(/^postgres-dsql migrate: cli_2\.sql:3: statement 1 failed: relation "cli_nope" does not exist \(SQLSTATE 42P01\)/)

    expect((await cli([dir, '--bogus'], env)).code).toBe(2)
    expect((await cli([dir, '--check', '--dry-run'], env)).code).toBe(2)
    expect(await cli([join(dir, 'nowhere')], env)).toMatchObject({ code: 1, err: expect.stringContaining('No migrations directory at') })
    expect(await cli([dir], { ...env, CLUSTER_ENDPOINT: undefined, PGHOST: undefined })).toMatchObject({ code: 2, err: expect.stringContaining('No DSQL endpoint') })
    expect(await cli(['--help'])).toMatchObject({ code: 0, out: expect.stringMatching(/^Usage: postgres-dsql migrate \[dir\]/) })
  })
})

/** Runs the command in a node process where `libpg-query` cannot be found, as when it is not installed. */
function child(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const hide = join(mkdtempSync(join(tmpdir(), 'no-libpg-query-')), 'hide.js')
  writeFileSync(
    hide,
    `const Module = require('node:module')
const resolve = Module._resolveFilename
Module._resolveFilename = function (request, ...rest) {
  if (request === 'libpg-query') throw Object.assign(new Error("Cannot find module 'libpg-query'"), { code: 'MODULE_NOT_FOUND' })
  return resolve.call(this, request, ...rest)
}
`,
  )
  const env: NodeJS.ProcessEnv = { ...process.env, ...local.env }
  delete env.AWS_PROFILE
  const root = join(__dirname, '..')
  return new Promise((done) => {
    execFile(process.execPath, ['-r', hide, '-r', 'ts-node/register/transpile-only', join(root, 'lib', 'cli.ts'), ...args], { env, cwd: root, timeout: 120_000 }, (error, out, err) =>
      done({ code: error ? Number(error.code ?? 1) : 0, out, err }),
    )
  })
}

/** Runs the command in this process with stdout and stderr captured and `env` over the environment. */
async function cli(args: string[], env: Record<string, string | undefined> = {}): Promise<{ code: number; out: string; err: string }> {
  const { main } = await import('../lib/cli')
  const saved = { ...process.env }
  let out = ''
  let err = ''
  const stdout = jest.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => ((out += String(chunk)), true))
  const stderr = jest.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => ((err += String(chunk)), true))
  try {
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: local.credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: local.credentials.secretAccessKey, AWS_REGION: local.region })
    for (const [key, value] of Object.entries(env)) {
      if (value === undefined) delete process.env[key]
      else process.env[key] = value
    }
    delete process.env.AWS_PROFILE
    const code = await main(['migrate', ...args])
    return { code, out, err }
  } finally {
    stdout.mockRestore()
    stderr.mockRestore()
    process.env = saved
  }
}
