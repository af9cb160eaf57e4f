/**
 * Every TypeScript block in README.md runs against the stand-in, as a user would paste it, and
 * every `console.log(x) // value` line in it is checked; so the README cannot rot.
 */
import { execFile } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import dsql from '../lib'
import { startLocalDsql } from '../lib/local'
import { main } from '../lib/cli'
import { target } from './helpers/target'

const root = resolve(__dirname, '..')
const readme = readFileSync(join(root, 'README.md'), 'utf8')
const blocks = [...readme.matchAll(/```(\w+)\n([\s\S]*?)```/g)].map((m) => ({ lang: m[1], code: m[2] }))
const tsBlocks = blocks.filter((b) => b.lang === 'ts')

/** Imports stay on top; the rest runs in an async main; `console.log(x) // v` becomes a check. */
function script(code: string): string {
  const lines = code.replace(/'postgres-dsql\/(\w+)'/g, (_, sub: string) => `'${join(root, 'lib', sub)}'`).replace(/'postgres-dsql'/g, `'${join(root, 'lib')}'`).split('\n')
  const imports = lines.filter((l) => l.startsWith('import '))
  // A module's `export const handler = ...` runs as a local inside main().
  const body = lines.filter((l) => !l.startsWith('import ')).map((l) => l.replace(/^export (?=const |async function |function )/, '')).map((line) => {
    const m = /^(\s*)console\.log\((.*)\) \/\/ (.*)$/.exec(line)
    if (!m) return line
    try {
      new Function(`return (${m[3]})`)
    } catch {
      return line
    }
    return `${m[1]}__check(${m[2]}, ${m[3]}, ${JSON.stringify(m[3])})`
  })
  return [
    ...imports,
    "import { isDeepStrictEqual } from 'node:util'",
    'function __check(actual: unknown, expected: unknown, text: string) {',
    '  const plain = JSON.parse(JSON.stringify(actual))',
    '  if (!isDeepStrictEqual(plain, expected)) throw new Error(`README says ${text}, got ${JSON.stringify(plain)}`)',
    '}',
    'async function main() {',
    ...body,
    '}',
    'main().catch((e) => { console.error(e); process.exit(1) })',
  ].join('\n')
}

function run(file: string): Promise<{ code: number; output: string }> {
  // Blocks reach the stand-in through the environment jest's global setup (postgres-dsql's own)
  // exported, and import the ORMs (dev dependencies) from a temporary directory.
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_PATH: join(root, 'node_modules') }
  return new Promise((done) => {
    execFile(process.execPath, ['-r', 'ts-node/register/transpile-only', file], { env, cwd: root, timeout: 60_000 }, (err, stdout, stderr) =>
      done({ code: err ? ((err as { code?: number }).code ?? 1) : 0, output: stdout + stderr }),
    )
  })
}

test('README has TypeScript examples', () => {
  expect(tsBlocks.length).toBeGreaterThanOrEqual(3)
})

test.each(tsBlocks.map((b, i) => [i + 1, b.code] as const))('README TypeScript block %i runs', async (_i, code) => {
  const dir = mkdtempSync(join(tmpdir(), 'readme-'))
  const file = join(dir, 'block.ts')
  writeFileSync(file, script(code))
  const { code: exit, output } = await run(file)
  if (exit !== 0) throw new Error(`block failed (exit ${exit}):\n${output}`)
  expect(exit).toBe(0)
}, 90_000)

test('every npm script and CLI command the README names exists', () => {
  const scripts = Object.keys((JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts)
  const named = [...readme.matchAll(/npm run ([\w:-]+)/g)].map((m) => m[1])
  expect(named.length).toBeGreaterThan(0)
  for (const name of named) expect(scripts).toContain(name)
  const cli = readFileSync(join(root, 'lib', 'cli.ts'), 'utf8')
  for (const [, command] of readme.matchAll(/npx postgres-dsql (\w+)/g)) expect(cli).toContain(`command === '${command}'`)
})

test('README SQL blocks run on a fresh stand-in as admin, one statement at a time, as on DSQL', async () => {
  const sqlBlocks = blocks.filter((b) => b.lang === 'sql')
  expect(sqlBlocks.length).toBeGreaterThan(0)
  const local = await startLocalDsql({ iamArn: 'arn:aws:iam::123456789012:role/my-app' })
  const sql = dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials })
  try {
    for (const block of sqlBlocks)
      for (const statement of block.code.split(';').map((x) => x.trim()).filter(Boolean)) await sql.unsafe(statement)
    // The role the block created logs in with the keys of the identity it was granted to.
    const app = dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, user: 'appuser' })
    const [row] = await app`select current_user, current_schema()`
    await app.end()
    expect(row).toEqual({ current_user: 'appuser', current_schema: 'myschema' })
  } finally {
    await sql.end()
    await local.stop()
  }
}, 60_000)

test('the README\'s token command prints a token for the endpoint it names', async () => {
  const t = target()
  const line = readme.split('\n').find((l) => l.startsWith('npx postgres-dsql token '))
  expect(line).toBeDefined()
  const args = (line as string).replace(/#.*$/, '').trim().split(/\s+/).slice(2).map((a) => a.replace('<id>.dsql.us-east-1.on.aws', t.host))
  const saved = { ...process.env }
  let printed = ''
  const write = jest.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => ((printed += String(chunk)), true))
  try {
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: t.credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: t.credentials.secretAccessKey })
    delete process.env.AWS_PROFILE
    expect(await main(args)).toBe(0)
  } finally {
    write.mockRestore()
    process.env = saved
  }
  expect(printed).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnectAdmin&X-Amz-Algorithm=AWS4-HMAC-SHA256&`))
})
