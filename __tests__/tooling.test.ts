/**
 * The jest preset and the vitest global setup, used as a consumer would: this package is built
 * into a scratch project's node_modules, and jest / vitest run there in a child process. Each
 * run's tests must reach the stand-in through the environment alone, and nothing may remain after.
 */
import { execFile } from 'node:child_process'
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { dsql, DsqlConfigError } from '../lib'
import { loadTestOptions, startTestDsql } from '../lib/testing'

const root = resolve(__dirname, '..')
/** The README's declaration that types vitest's inject('postgresDsql'). */
const README_VITEST_TYPES = /```typescript\n(declare module 'vitest'[\s\S]*?)```/.exec(readFileSync(join(root, 'README.md'), 'utf8'))?.[1] ?? 'README has no vitest declaration'
let scratch: string

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env): Promise<{ code: number; output: string; pid?: number }> {
  return new Promise((done) => {
    const child = execFile(cmd, args, { cwd, env, timeout: 240_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) =>
      done({ code: err ? ((err as { code?: number }).code ?? 1) : 0, output: stdout + stderr, pid: child.pid }),
    )
  })
}

describe('in a scratch project', () => {
/** node_modules/postgres-dsql as npm would install it (package.json, jest-preset.js, dist, certs), built from lib/. */
beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'postgres-dsql-tooling-'))
  // Run as root, the stand-in runs PostgreSQL as another user, who must reach the binaries.
  chmodSync(scratch, 0o755)
  const pkg = join(scratch, 'node_modules', 'postgres-dsql')
  mkdirSync(join(pkg, 'scripts'), { recursive: true })
  const built = await run(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.build.json', '--outDir', join(pkg, 'dist')], root)
  if (built.code !== 0) throw new Error(`build failed:\n${built.output}`)
  for (const file of ['package.json', 'jest-preset.js', 'scripts/esm-wrappers.js']) cpSync(join(root, file), join(pkg, file))
  symlinkSync(join(root, 'certs'), join(pkg, 'certs'))
  // The package's own dependencies, and the test runners the scratch projects use.
  symlinkSync(join(root, 'node_modules'), join(pkg, 'node_modules'))
  symlinkSync(join(root, 'node_modules', 'vitest'), join(scratch, 'node_modules', 'vitest'))
  const wrapped = await run(process.execPath, [join(pkg, 'scripts', 'esm-wrappers.js')], pkg)
  if (wrapped.code !== 0) throw new Error(`esm-wrappers failed:\n${wrapped.output}`)
}, 240_000)

afterAll(() => rmSync(scratch, { recursive: true, force: true }))

/** A clean environment, with a developer's AWS settings that must not reach the tests, and a private TMPDIR. */
function childEnv(tmp: string): NodeJS.ProcessEnv {
  return { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: tmp, AWS_PROFILE: 'developer', AWS_SESSION_TOKEN: 'not-for-tests', AWS_EC2_METADATA_DISABLED: 'true' }
}

/** Processes whose command line names `dir` (PostgreSQL runs with its data directory there). */
function processesUnder(dir: string): string[] {
  return readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .flatMap((pid) => {
      try {
        const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ')
        return cmdline.includes(dir) ? [`${pid}: ${cmdline}`] : []
      } catch {
        return []
      }
    })
}

/** What each scratch test file checks, in CommonJS/ESM-neutral JavaScript: `dsql` and `report` come from the file's header. */
const checks = (file: string) => `
  const plain = dsql()
  const [me] = await plain\`select current_user as "user", current_schema() as schema\`
  expect(me).toEqual({ user: 'admin', schema: 'public' })
  // A role the test makes logs in once mapped to the IAM identity the setup exports, as on DSQL.
  await plain.unsafe('create role ${file}_login with login')
  await plain.unsafe("AWS IAM GRANT ${file}_login TO '" + process.env.POSTGRES_DSQL_IAM_ARN + "'")
  await plain.end()
  const login = dsql({ host: process.env.CLUSTER_ENDPOINT, user: '${file}_login' })
  expect((await login\`select current_user as u\`)[0].u).toBe('${file}_login')
  await login.end()
  const app = dsql({ host: process.env.CLUSTER_ENDPOINT, user: 'appuser' })
  const rows = await app\`select name from myschema.seeded order by name\`
  expect(rows.map((r) => r.name)).toEqual(['a;b', 'c'])
  await app.end()
  report(${JSON.stringify(file)}, {
    pid: process.pid, endpoint: process.env.CLUSTER_ENDPOINT, caFile: process.env.PGSSLROOTCERT,
    profile: process.env.AWS_PROFILE ?? null, sessionToken: process.env.AWS_SESSION_TOKEN ?? null,
  })
`

// Statement by statement: the semicolon inside the string literal is not a boundary.
const SEED = `-- applied before the tests
create table myschema.seeded (name text primary key);
grant select on myschema.seeded to appuser;
insert into myschema.seeded values ('a;b'), ('c');
`

interface Report {
  pid: number
  endpoint: string
  caFile: string
  profile: string | null
  sessionToken: string | null
}

function reports(dir: string): Report[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.report.json'))
    .map((f) => JSON.parse(readFileSync(join(dir, f), 'utf8')) as Report)
}

function expectNothingLeft(tmp: string, seen: Report[]): void {
  for (const { caFile } of seen) expect(existsSync(caFile)).toBe(false)
  expect(readdirSync(tmp).filter((name) => name.startsWith('postgres-dsql-local-'))).toEqual([])
  expect(processesUnder(tmp)).toEqual([])
}

test.each([
  ["preset: 'postgres-dsql'", 'preset', `{ preset: 'postgres-dsql', transform: {} }`],
  // Beside another preset (ts-jest's, for one): the same through globalSetup and globalTeardown.
  ["globalSetup: 'postgres-dsql/jest/setup'", 'explicit', `{ globalSetup: 'postgres-dsql/jest/setup', globalTeardown: 'postgres-dsql/jest/teardown', transform: {} }`],
])('%s gives every jest worker a stand-in reached through the environment', async (_name, dir, config) => {
  const app = join(scratch, `jest-${dir}`)
  const tmp = join(scratch, `jest-${dir}-tmp`)
  mkdirSync(app)
  mkdirSync(tmp)
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'jest-app', private: true, 'postgres-dsql': { roles: ['appuser'], setupSql: 'schema.sql' } }))
  writeFileSync(join(app, 'schema.sql'), SEED)
  writeFileSync(join(app, 'jest.config.js'), `module.exports = ${config}\n`)
  for (const name of ['one', 'two'])
    writeFileSync(
      join(app, `${name}.test.js`),
      `const { dsql } = require('postgres-dsql')
const { writeFileSync } = require('node:fs')
const report = (file, data) => writeFileSync(__dirname + '/' + file + '.report.json', JSON.stringify(data))
test('reaches the stand-in', async () => {${checks(name)}})
`,
    )
  const jest = join(root, 'node_modules', 'jest', 'bin', 'jest.js')
  const { code, output, pid } = await run(process.execPath, [jest, '--ci', '--maxWorkers=2', '--cacheDirectory', join(scratch, `jest-${dir}-cache`), '--json', '--outputFile=results.json'], app, childEnv(tmp))
  if (code !== 0) throw new Error(`scratch jest failed (exit ${code}):\n${output}`)
  const results = JSON.parse(readFileSync(join(app, 'results.json'), 'utf8')) as { numPassedTests: number; numFailedTests: number }
  expect(results).toMatchObject({ numPassedTests: 2, numFailedTests: 0 })

  const seen = reports(app)
  expect(seen).toHaveLength(2)
  // In workers (not jest's own process), one stand-in: the same endpoint and none of the developer's AWS settings.
  for (const r of seen) expect(r.pid).not.toBe(pid)
  expect(new Set(seen.map((r) => r.endpoint)).size).toBe(1)
  expect(seen[0].endpoint).toMatch(/^[a-z0-9]{26}\.dsql\.us-east-1\.on\.aws$/)
  for (const r of seen) expect(r).toMatchObject({ profile: null, sessionToken: null })
  expectNothingLeft(tmp, seen)
}, 240_000)

test("globalSetup: 'postgres-dsql/vitest' provides the stand-in to vitest through inject and the environment", async () => {
  const app = join(scratch, 'vitest-app')
  const tmp = join(scratch, 'vitest-tmp')
  mkdirSync(app)
  mkdirSync(tmp)
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'vitest-app', private: true, type: 'module' }))
  writeFileSync(join(app, 'postgres-dsql.config.json'), JSON.stringify({ roles: ['appuser'], setupSql: 'schema.sql' }))
  writeFileSync(join(app, 'schema.sql'), SEED)
  writeFileSync(join(app, 'vitest.config.js'), `export default { test: { globalSetup: ['postgres-dsql/vitest'] } }\n`)
  for (const name of ['one', 'two'])
    writeFileSync(
      join(app, `${name}.test.js`),
      `import { expect, inject, test } from 'vitest'
import dsql from 'postgres-dsql'
import { writeFileSync } from 'node:fs'
const report = (file, data) => writeFileSync(new URL(file + '.report.json', import.meta.url), JSON.stringify(data))
test('reaches the stand-in', async () => {
  const target = inject('postgresDsql')
  expect(target.host).toBe(process.env.CLUSTER_ENDPOINT)
  expect(target.port).toBe(Number(process.env.PGPORT))
  expect(target.iamArn).toBe(process.env.POSTGRES_DSQL_IAM_ARN)
  expect(Object.keys(target).sort()).toEqual(['caFile', 'credentials', 'env', 'host', 'hostaddr', 'iamArn', 'port', 'region'])
${checks(name)}})
`,
    )
  const vitest = join(root, 'node_modules', 'vitest', 'vitest.mjs')
  const { code, output } = await run(process.execPath, [vitest, 'run', '--reporter=json', '--outputFile=results.json'], app, childEnv(tmp))
  if (code !== 0) throw new Error(`scratch vitest failed (exit ${code}):\n${output}`)
  const results = JSON.parse(readFileSync(join(app, 'results.json'), 'utf8')) as { numPassedTests: number; numFailedTests: number }
  expect(results).toMatchObject({ numPassedTests: 2, numFailedTests: 0 })

  const seen = reports(app)
  expect(seen).toHaveLength(2)
  expect(new Set(seen.map((r) => r.endpoint)).size).toBe(1)
  for (const r of seen) expect(r).toMatchObject({ profile: null, sessionToken: null })
  expectNothingLeft(tmp, seen)

  // The README's declaration types inject('postgresDsql') (here under node16 ESM): a wrong type must not compile.
  writeFileSync(join(app, 'types.ts'), `import type { DsqlTestTarget } from 'postgres-dsql/vitest'
import { inject } from 'vitest'
${README_VITEST_TYPES}
export const host: string = inject('postgresDsql').host
export const wrong: number = inject('postgresDsql').caFile
`)
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
  const typed = await run(process.execPath, [tsc, '--noEmit', '--strict', '--skipLibCheck', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--typeRoots', join(root, 'node_modules', '@types'), '--types', 'node', 'types.ts'], app)
  expect(typed.output).toMatch(/types\.ts\(\d+,14\): error TS2322: Type 'string' is not assignable to type 'number'/)
  expect(typed.output.trim().split('\n')).toHaveLength(1)
}, 240_000)
})

describe('options', () => {
  let dir: string
  beforeEach(() => (dir = mkdtempSync(join(tmpdir(), 'postgres-dsql-options-'))))
  afterEach(() => rmSync(dir, { recursive: true, force: true }))

  test('come from postgres-dsql.config.* before package.json', () => {
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ 'postgres-dsql': { roles: ['frompkg'] } }))
    expect(loadTestOptions(dir)).toEqual({ roles: ['frompkg'] })
    writeFileSync(join(dir, 'postgres-dsql.config.cjs'), `module.exports = { roles: ['fromfile'], dialect: false }`)
    expect(loadTestOptions(dir)).toEqual({ roles: ['fromfile'], dialect: false })
  })

  test('none at all is fine', () => {
    expect(loadTestOptions(dir)).toEqual({})
  })

  test.each([
    [{ role: ['x'] }, /unknown option `role`; known: roles, /],
    [{ migrations: 7 }, /`migrations` must be the path of a directory of \*\.sql files, got 7/],
    [{ setupSql: 3 }, /`setupSql` must be the path of a SQL file, got 3/],
    [['roles'], /expected an object of options/],
  ])('%j is refused clearly', (options, message) => {
    writeFileSync(join(dir, 'postgres-dsql.config.json'), JSON.stringify(options))
    expect(() => loadTestOptions(dir)).toThrow(DsqlConfigError)
    expect(() => loadTestOptions(dir)).toThrow(message)
  })

  test.each([
    ['postgres-dsql.config.json', '{ "roles": ["x"], }'],
    ['postgres-dsql.config.cjs', 'module.exports = { roles: [x] }'],
    ['postgres-dsql.config.cjs', 'module.exports = { roles: ['],
    ['package.json', '{ "name": "app", "postgres-dsql": { } '],
  ])('a %s that does not load is a config error naming the file', (name, text) => {
    writeFileSync(join(dir, name), text)
    let thrown: unknown
    try {
      loadTestOptions(dir)
    } catch (err) {
      thrown = err
    }
    expect(thrown).toBeInstanceOf(DsqlConfigError)
    expect((thrown as Error).message).toContain(`${join(dir, name)}: could not be loaded (`)
  })

  test('an ES module config file is refused with what to do', () => {
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }))
    writeFileSync(join(dir, 'postgres-dsql.config.js'), `export default { roles: ['x'] }`)
    let thrown: unknown
    try {
      loadTestOptions(dir)
    } catch (err) {
      thrown = err
    }
    // Node 22.12+ loads ES modules with require(); older ones refuse, and the message says what to do.
    if (thrown) expect(String(thrown)).toMatch(/name it postgres-dsql\.config\.cjs/)
    else expect(loadTestOptions(dir)).toEqual({ roles: ['x'] })
  })

  test("a developer's AWS identity variables are removed for the tests and restored after", async () => {
    const mine = { AWS_PROFILE: 'developer', AWS_DEFAULT_PROFILE: 'developer', AWS_SESSION_TOKEN: 'mine', AWS_SECURITY_TOKEN: 'mine', AWS_CREDENTIAL_EXPIRATION: '2000-01-01T00:00:00Z' }
    const saved = Object.fromEntries(Object.keys(mine).map((k) => [k, process.env[k]]))
    Object.assign(process.env, mine)
    try {
      const { stop } = await startTestDsql(dir)
      try {
        expect(Object.keys(mine).filter((k) => process.env[k] !== undefined)).toEqual([])
        const sql = dsql({ max: 1 })
        try {
          expect(await sql`select 1 as one`).toEqual([{ one: 1 }])
        } finally {
          await sql.end()
        }
      } finally {
        await stop()
      }
      expect(Object.fromEntries(Object.keys(mine).map((k) => [k, process.env[k]]))).toEqual(mine)
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k]
        else process.env[k] = v
      }
    }
  }, 120_000)

  test('migrations are applied with postgres-dsql/migrate after setupSql; a failing one names file and line and stops the stand-in', async () => {
    mkdirSync(join(dir, 'db'))
    writeFileSync(join(dir, 'schema.sql'), 'create table base (id int primary key);\n')
    writeFileSync(join(dir, 'db', '001_orders.sql'), 'CREATE TABLE orders (id int PRIMARY KEY, base int);\nCREATE INDEX ASYNC orders_by_base ON orders (base);\nINSERT INTO orders VALUES (1, 1), (2, 1);\n')
    writeFileSync(join(dir, 'postgres-dsql.config.json'), JSON.stringify({ setupSql: 'schema.sql', migrations: 'db' }))
    const before = process.env.PGSSLROOTCERT
    const arnBefore = process.env.POSTGRES_DSQL_IAM_ARN
    const { target, stop } = await startTestDsql(dir)
    try {
      expect(process.env.POSTGRES_DSQL_IAM_ARN).toBe(target.iamArn)
      expect(target.env).toMatchObject({ POSTGRES_DSQL_IAM_ARN: target.iamArn, PGSSLROOTCERT: target.caFile })
      const sql = dsql({ max: 1 })
      try {
        expect(await sql`select count(*)::int as n from orders`).toEqual([{ n: 2 }])
        expect(await sql`select count(*)::int as n from base`).toEqual([{ n: 0 }])
      } finally {
        await sql.end()
      }
    } finally {
      await stop()
    }
    expect(process.env.PGSSLROOTCERT).toBe(before)
    expect(process.env.POSTGRES_DSQL_IAM_ARN).toBe(arnBefore)

    writeFileSync(join(dir, 'db', '002_bad.sql'), 'INSERT INTO orders VALUES (3, 1);\nINSERT INTO missing VALUES (1);\n')
    await expect(startTestDsql(dir)).rejects.toThrow(/^migrations: 002_bad\.sql:2: statement 2 failed: relation "missing" does not exist/)
    expect(process.env.PGSSLROOTCERT).toBe(before)
  }, 120_000)

  test('a failing setupSql statement names the file and line, stops the stand-in and leaves the environment alone', async () => {
    writeFileSync(join(dir, 'schema.sql'), `create table ok (id int primary key);\n\ncreate table bad (id serial primary key);\n`)
    writeFileSync(join(dir, 'postgres-dsql.config.json'), JSON.stringify({ setupSql: 'schema.sql' }))
    const before = process.env.PGSSLROOTCERT
    await expect(startTestDsql(dir)).rejects.toThrow(/setupSql: statement 2 of .*schema\.sql \(line 3\) failed: .*serial/i)
    expect(process.env.PGSSLROOTCERT).toBe(before)
  })
})
