/**
 * The yardstick of issue 12: postgres.js's own test suite (tests/index.js at the version we
 * depend on), run twice against one local stand-in with `dialect: false` (a plain relay to
 * PostgreSQL 16): once with plain postgres.js (TLS, the IAM token as its password), once with
 * `postgres` replaced by dsql(). Prints every test that passes plain but not through dsql(),
 * apart from the exceptions in scripts/postgres-js-suite/exceptions.json (each with its reason).
 *
 *   npx ts-node scripts/postgres-js-suite.ts <postgres.js checkout or git dir> [ref, default v3.4.9]
 *
 * No postgres.js code is kept in this repository: its tests are taken from the checkout into a
 * temporary folder, with its runner (tests/test.js), bootstrap and src/index.js replaced by ours
 * from scripts/postgres-js-suite/. Exit code 1 when a test passes plain but fails through dsql()
 * and is not an exception.
 */
import { execFileSync, spawn } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { buildSync } from 'esbuild'
import { startLocalDsql, type LocalDsql } from '../lib/local'

interface Outcome {
  name: string
  line: number
  status: 'pass' | 'fail' | 'timeout' | 'crash'
  error?: string
}

interface Exception {
  test: string
  reason: string
}

const root = resolve(__dirname, '..')
const own = join(__dirname, 'postgres-js-suite')

function checkout(source: string, ref: string, dir: string): void {
  if (existsSync(join(source, 'tests', 'index.js')) && !existsSync(join(source, 'HEAD'))) {
    cpSync(join(source, 'tests'), join(dir, 'tests'), { recursive: true })
    return
  }
  const archive = execFileSync('git', ['-C', source, 'archive', ref, 'tests'], { maxBuffer: 64 * 1024 * 1024 })
  execFileSync('tar', ['-x', '-C', dir], { input: archive })
}

function prepare(source: string, ref: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'postgres-js-suite-'))
  checkout(source, ref, dir)
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }))
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'), 'dir')
  cpSync(join(own, 'runner.mjs'), join(dir, 'tests', 'test.js'))
  cpSync(join(own, 'bootstrap.mjs'), join(dir, 'tests', 'bootstrap.js'))
  mkdirSync(join(dir, 'src'))
  cpSync(join(own, 'shim.mjs'), join(dir, 'src', 'index.js'))
  // dsql() as the package would ship it: lib/ bundled, its dependencies (postgres.js too) external.
  buildSync({
    entryPoints: [join(root, 'lib', 'index.ts')],
    bundle: true,
    platform: 'node',
    format: 'cjs',
    packages: 'external',
    outfile: join(dir, 'dsql.cjs'),
    logLevel: 'error',
  })
  return dir
}

function runSuite(dir: string, local: LocalDsql, mode: 'plain' | 'dsql'): Promise<Outcome[]> {
  const results = join(dir, `${mode}.json`)
  const env: NodeJS.ProcessEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG') && !k.startsWith('AWS_')))
  Object.assign(env, {
    SUITE_RESULTS: results,
    SUITE_TARGET: JSON.stringify({
      mode,
      host: local.host,
      port: local.port,
      region: local.region,
      ca: local.ca,
      caFile: local.caFile,
      credentials: local.credentials,
      dsqlModule: join(dir, 'dsql.cjs'),
    }),
    AWS_EC2_METADATA_DISABLED: 'true',
  })
  return new Promise((done, fail) => {
    process.stdout.write(`${mode}: `)
    const child = spawn(process.execPath, ['index.js'], { cwd: join(dir, 'tests'), env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stdout.on('data', (chunk: Buffer) => process.stdout.write(chunk.toString().replace(/[^.x\n]/g, '')))
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
    // A run that never finishes (a test that hangs the process) is a finding too: stop it.
    const timer = setTimeout(() => child.kill('SIGKILL'), 20 * 60 * 1000)
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      if (!existsSync(results)) return fail(new Error(`${mode} run ended (${code ?? signal}) without results:\n${stderr.slice(-3000)}`))
      done(JSON.parse(readFileSync(results, 'utf8')) as Outcome[])
    })
  })
}

const key = (o: Outcome) => `${o.name} (line ${o.line})`

async function main(): Promise<void> {
  const [source, ref = 'v3.4.9'] = process.argv.slice(2)
  if (!source) throw new Error('usage: npx ts-node scripts/postgres-js-suite.ts <postgres.js checkout or git dir> [ref]')
  const exceptions = JSON.parse(readFileSync(join(own, 'exceptions.json'), 'utf8')) as Exception[]
  const dir = prepare(resolve(source), ref)
  const local = await startLocalDsql({ dialect: false })
  let plain: Outcome[]
  let through: Outcome[]
  try {
    plain = await runSuite(dir, local, 'plain')
    through = await runSuite(dir, local, 'dsql')
  } finally {
    await local.stop()
  }
  const byName = new Map(through.map((o) => [key(o), o]))
  const passedPlain = plain.filter((o) => o.status === 'pass')
  const passedBoth = passedPlain.filter((o) => byName.get(key(o))?.status === 'pass')
  const lost = passedPlain.filter((o) => byName.get(key(o))?.status !== 'pass')
  const excused = lost.filter((o) => exceptions.some((e) => e.test === o.name))
  const regressions = lost.filter((o) => !excused.includes(o))
  const gained = through.filter((o) => o.status === 'pass' && plain.find((p) => key(p) === key(o))?.status !== 'pass')
  const crashes = through.filter((o) => o.status === 'crash')

  console.log(`\npostgres.js ${ref} tests: ${plain.length}`)
  console.log(`  pass plain: ${passedPlain.length}; of those pass through dsql(): ${passedBoth.length}; exceptions: ${excused.length}; failing: ${regressions.length}`)
  console.log(`  pass only through dsql(): ${gained.length}; crashes through dsql(): ${crashes.length}`)
  const unused = exceptions.filter((e) => !lost.some((o) => o.name === e.test))
  if (unused.length) console.log(`  exceptions that did not apply: ${unused.map((e) => e.test).join('; ')}`)
  if (excused.length) {
    console.log('\nExceptions (cannot apply to DSQL):')
    for (const o of excused) console.log(`  ${key(o)}: ${exceptions.find((e) => e.test === o.name)?.reason}`)
  }
  if (regressions.length) {
    console.log('\nPass plain, fail through dsql():')
    for (const o of regressions) console.log(`  ${key(o)}: ${byName.get(key(o))?.status} ${byName.get(key(o))?.error ?? ''}`)
  }
  if (process.env.SUITE_KEEP) console.log(`\nkept ${dir}`)
  else rmSync(dir, { recursive: true, force: true })
  if (regressions.length) process.exitCode = 1
}

main().catch((err: unknown) => {
  console.error(err)
  process.exitCode = 1
})
