/** `npx postgres-dsql` as a user runs it: a child process, its exit code, its output, its environment. */
import { execFile, spawn } from 'node:child_process'
import { chmodSync, existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { WireClient } from './helpers/wire'
import { target } from './helpers/target'

const root = resolve(__dirname, '..')
const CLI = ['-r', join(__dirname, 'helpers', 'register-ts.js'), join(root, 'lib', 'cli.ts')]
const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }
const scratch = mkdtempSync(join(tmpdir(), 'cli-test-'))
// Every test starts CLI processes: generous on a shared machine.
jest.setTimeout(120_000)

interface Run {
  code: number
  stdout: string
  stderr: string
}

/** The user's environment: the stand-in's keys, and none of the variables the CLI reads unless a test sets them. */
function baseEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const t = target()
  const env: NodeJS.ProcessEnv = { ...process.env, AWS_ACCESS_KEY_ID: t.credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: t.credentials.secretAccessKey }
  for (const name of Object.keys(env)) if (/^(PG|CLUSTER_|DSQL_)/.test(name) || /^AWS_(PROFILE|SESSION_TOKEN|REGION|DEFAULT_REGION)$/.test(name)) delete env[name]
  return { ...env, AWS_CONFIG_FILE: join(scratch, 'no-aws-config'), AWS_SHARED_CREDENTIALS_FILE: join(scratch, 'no-aws-credentials'), ...extra }
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((done) => {
    execFile(file, args, { env, cwd: scratch, timeout: 90_000 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? 1) : 0
      done({ code: typeof code === 'number' ? code : 1, stdout, stderr })
    })
  })
}

const cli = (args: string[], extra: NodeJS.ProcessEnv = {}) => run(process.execPath, [...CLI, ...args], baseEnv(extra))
/** A shell line that runs the CLI, for scripts that `eval` or source its output. */
const cliLine = `"${process.execPath}" ${CLI.map((a) => `"${a}"`).join(' ')}`

async function login(token: string, user: string, port = target().port, ca = target().ca, servername = target().host) {
  const client = await WireClient.connect({ port, servername, ca, user, password: token })
  try {
    return (await client.query('select current_user')).rows[0][0]
  } finally {
    await client.close()
  }
}

afterAll(() => {
  // Only the scratch folder of this file; the stand-ins remove their own.
  require('node:fs').rmSync(scratch, { recursive: true, force: true })
})

describe('usage', () => {
  test('--version and --help exit 0; --help of every command works without an endpoint', async () => {
    const [v, help, helpWord, ...commands] = await Promise.all([
      cli(['--version']), cli(['--help']), cli(['help']), ...['token', 'psql', 'local'].map((c) => cli([c, '--help'])),
    ])
    expect(v).toEqual({ code: 0, stdout: `${version}\n`, stderr: '' })
    expect(help.code).toBe(0)
    expect(help.stdout).toMatch(/token .*\n.*psql .*\n.*local /)
    expect(helpWord.stdout).toBe(help.stdout)
    for (const [i, name] of ['token', 'psql', 'local'].entries()) {
      expect(commands[i].code).toBe(0)
      expect(commands[i].stdout).toMatch(new RegExp(`^Usage: postgres-dsql ${name}`))
    }
    expect(commands[0].stdout).toMatch(/--host ENDPOINT +PGHOST, CLUSTER_ENDPOINT/)
    expect(commands[0].stdout).toMatch(/--user ROLE +PGUSER, CLUSTER_USER/)
  })

  test('no command, an unknown command or an unknown flag print usage and exit 2', async () => {
    const [none, unknown, flag] = await Promise.all([cli([]), cli(['nope']), cli(['token', '--hots', 'x'])])
    expect(none.code).toBe(2)
    expect(none.stdout).toBe('')
    expect(none.stderr).toMatch(/^No command given\.\n\nUsage: postgres-dsql <command>/)
    expect(unknown.code).toBe(2)
    expect(unknown.stderr).toMatch(/^Unknown command "nope"\.\n\nUsage: postgres-dsql <command>/)
    expect(flag.code).toBe(2)
    expect(flag.stderr).toMatch(/Unknown option '--hots'[\s\S]*Usage: postgres-dsql token/)
  })
})

describe('token', () => {
  test('--host and --user: a token the stand-in accepts, for the right action', async () => {
    const t = target()
    const admin = await cli(['token', '--host', t.host])
    expect(admin.code).toBe(0)
    expect(admin.stdout).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnectAdmin&`))
    expect(await login(admin.stdout.trim(), 'admin')).toBe('admin')

    const app = await cli(['token', '--host', t.host, '--user', 'appuser', '--expires-in', '60'])
    expect(app.stdout).toMatch(/\?Action=DbConnect&.*X-Amz-Expires=60&/)
    expect(await login(app.stdout.trim(), 'appuser')).toBe('appuser')
  })

  test('PGUSER=appuser signs DbConnect for appuser; PG* come before CLUSTER_*, flags before both', async () => {
    const t = target()
    const [pg, cluster, flags, pgFirst] = await Promise.all([
      cli(['token'], { PGHOST: t.host, PGUSER: 'appuser' }),
      cli(['token'], { CLUSTER_ENDPOINT: t.host, CLUSTER_USER: 'appuser' }),
      cli(['token', '--host', t.host, '--user', 'admin'], { PGHOST: 'nothere.example.com', PGUSER: 'appuser' }),
      cli(['token'], { PGHOST: t.host, CLUSTER_ENDPOINT: 'nothere.example.com', PGUSER: 'appuser', CLUSTER_USER: 'admin' }),
    ])
    for (const r of [pg, cluster, pgFirst]) {
      expect(r).toMatchObject({ code: 0, stderr: '' })
      expect(r.stdout).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnect&`))
    }
    expect(await login(pg.stdout.trim(), 'appuser')).toBe('appuser')
    expect(await login(cluster.stdout.trim(), 'appuser')).toBe('appuser')
    expect(flags.stdout).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnectAdmin&`))
    expect(await login(flags.stdout.trim(), 'admin')).toBe('admin')
  })

  test('errors name the flags and environment variables the CLI reads, not library options', async () => {
    const t = target()
    const cases: [string[], NodeJS.ProcessEnv, RegExp][] = [
      [['token'], {}, /pass --host <cluster-id>\.dsql\.<region>\.on\.aws or set PGHOST or CLUSTER_ENDPOINT/],
      [['token', '--host', 'db.example.com'], {}, /for "db\.example\.com": pass --region, set AWS_REGION/],
      [['token'], { PGHOST: 'db.example.com' }, /for PGHOST="db\.example\.com": pass --region/],
      [['token', '--host', t.host, '--expires-in', '0'], {}, /--expires-in 0 is out of range/],
      [['token', '--host', t.host, '--expires-in', 'soon'], {}, /--expires-in "soon" is not a number of seconds/],
      [['token', '--host', t.host], { PGPORT: 'x' }, /PGPORT "x" is not a TCP port/],
      [['token', '--host', t.host, '--port', '70000'], {}, /--port 70000 is not a TCP port/],
      [['token', '--host', t.host], { PGSSLROOTCERT: '/nope/ca.pem' }, /Cannot read PGSSLROOTCERT "\/nope\/ca\.pem"/],
      [['token', '--host', t.host, '--sslrootcert', '/nope/ca.pem'], {}, /Cannot read --sslrootcert "\/nope\/ca\.pem"/],
      [['token', '--host', t.host, '--region', 'us-west-2'], {}, /--region "us-west-2" contradicts the endpoint's region/],
    ]
    const results = await Promise.all(cases.map(([args, env]) => cli(args, env)))
    results.forEach((r, i) => {
      expect({ args: cases[i][0], code: r.code, stdout: r.stdout }).toEqual({ args: cases[i][0], code: 1, stdout: '' })
      expect(r.stderr).toMatch(cases[i][2])
      expect(r.stderr).toMatch(/^postgres-dsql: /)
      expect(r.stderr).not.toMatch(/`|tokenDurationSecs/)
    })
  })
})

describe('psql', () => {
  /** A psql on PATH that reports what it was started with. */
  function fakePsql(): { path: string; report: () => Record<string, string> } {
    const dir = mkdtempSync(join(scratch, 'fake-psql-'))
    const report = join(dir, 'report')
    const names = ['PGHOST', 'PGHOSTADDR', 'PGPORT', 'PGUSER', 'PGSSLMODE', 'PGSSLROOTCERT', 'PGPASSWORD']
    writeFileSync(join(dir, 'psql'), `#!/bin/sh\nprintf '%s\\n' ${names.map((n) => `"$${n}"`).join(' ')} "$*" > "${report}"\nexit 3\n`)
    chmodSync(join(dir, 'psql'), 0o755)
    return {
      path: `${dir}:${process.env.PATH}`,
      report: () => Object.fromEntries(readFileSync(report, 'utf8').split('\n').slice(0, 8).map((v, i) => [names[i] ?? 'args', v])),
    }
  }

  test('flags: a fresh token, verify-full and the endpoint as server name; psql arguments after --', async () => {
    const t = target()
    const psql = fakePsql()
    const r = await cli(['psql', '--host', t.host, '--hostaddr', '127.0.0.1', '--port', String(t.port), '--sslrootcert', t.caFile, '--', '-c', 'select 1'], { PATH: psql.path })
    expect(r.code).toBe(3)
    const { PGPASSWORD, ...seen } = psql.report()
    expect(seen).toEqual({
      PGHOST: t.host, PGHOSTADDR: '127.0.0.1', PGPORT: String(t.port), PGUSER: 'admin', PGSSLMODE: 'verify-full', PGSSLROOTCERT: t.caFile, args: '-c select 1',
    })
    expect(await login(PGPASSWORD, 'admin')).toBe('admin')
  })

  test('the same settings from the environment, as token reads them', async () => {
    const t = target()
    const psql = fakePsql()
    const env = { PATH: psql.path, CLUSTER_ENDPOINT: t.host, PGUSER: 'appuser', PGHOSTADDR: '127.0.0.1', PGPORT: String(t.port), PGSSLROOTCERT: t.caFile }
    expect((await cli(['psql'], env)).code).toBe(3)
    const { PGPASSWORD, ...seen } = psql.report()
    expect(seen).toEqual({
      PGHOST: t.host, PGHOSTADDR: '127.0.0.1', PGPORT: String(t.port), PGUSER: 'appuser', PGSSLMODE: 'verify-full', PGSSLROOTCERT: t.caFile, args: '',
    })
    expect(PGPASSWORD).toMatch(new RegExp(`^${t.host}/\\?Action=DbConnect&`))
    expect(await login(PGPASSWORD, 'appuser')).toBe('appuser')
  })

  test('says how to install psql when it is missing', async () => {
    const r = await cli(['psql', '--host', target().host], { PATH: mkdtempSync(join(scratch, 'empty-path-')) })
    expect(r.code).toBe(127)
    expect(r.stderr).toMatch(/psql is not installed/)
  })
})

describe('local', () => {
  /** A shell whose own AWS setup would sign with another identity if it leaked through. */
  const clashing = { AWS_PROFILE: 'someone-else', AWS_SESSION_TOKEN: 'not-for-these-keys' }

  function parseExports(text: string): Record<string, string> {
    return Object.fromEntries([...text.matchAll(/^export (\w+)=(.*)$/gm)].map((m) => [m[1], m[2].replace(/^'(.*)'$/, '$1')]))
  }

  async function gone(pid: number): Promise<boolean> {
    for (let i = 0; i < 600; i++) {
      try {
        process.kill(pid, 0)
      } catch {
        return true
      }
      await new Promise((r) => setTimeout(r, 100))
    }
    return false
  }

  test('foreground: unset and export lines that work in a shell with a clashing AWS setup; a dotenv file; Ctrl-C stops it', async () => {
    const dotenv = join(scratch, 'local.env')
    const out = join(scratch, 'local.sh')
    const child = spawn(process.execPath, [...CLI, 'local', '--dotenv', dotenv], { env: baseEnv(clashing), stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d))
    child.stderr.on('data', (d: Buffer) => (stderr += d))
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)))
    try {
      for (let i = 0; i < 900 && !stdout.includes('AWS_REGION=') && child.exitCode === null; i++) await new Promise((r) => setTimeout(r, 100))
      expect({ stdout, stderr }).toMatchObject({ stdout: expect.stringContaining('export AWS_REGION=') })
      expect(stdout.split('\n')[0]).toBe('unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_SECURITY_TOKEN AWS_CREDENTIAL_EXPIRATION')
      const env = parseExports(stdout)
      expect(Object.keys(env)).toEqual(expect.arrayContaining(['CLUSTER_ENDPOINT', 'PGHOST', 'PGHOSTADDR', 'PGPORT', 'PGSSLROOTCERT', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION', 'POSTGRES_DSQL_IAM_ARN']))

      // Sourced into a shell that has AWS_PROFILE and AWS_SESSION_TOKEN: the token is signed with the stand-in's keys.
      writeFileSync(out, stdout)
      const sourced = await run('bash', ['-c', `. "${out}" && ${cliLine} token --user appuser`], baseEnv(clashing))
      expect(sourced).toMatchObject({ code: 0, stderr: '' })
      const ca = readFileSync(env.PGSSLROOTCERT, 'utf8')
      expect(await login(sourced.stdout.trim(), 'appuser', Number(env.PGPORT), ca, env.CLUSTER_ENDPOINT)).toBe('appuser')

      // The dotenv file: owner-only, the same values, the clashing names emptied; enough for a clean process.
      expect(statSync(dotenv).mode & 0o777).toBe(0o600)
      const lines = readFileSync(dotenv, 'utf8').split('\n')
      expect(lines).toEqual(expect.arrayContaining(['AWS_PROFILE=', 'AWS_SESSION_TOKEN=', ...Object.entries(env).map(([k, v]) => `${k}=${v}`)]))
      const clean = { PATH: process.env.PATH, HOME: scratch }
      const loaded = await run(process.execPath, [`--env-file=${dotenv}`, ...CLI, 'token'], clean)
      expect(loaded).toMatchObject({ code: 0, stderr: '' })
      expect(await login(loaded.stdout.trim(), 'admin', Number(env.PGPORT), ca, env.CLUSTER_ENDPOINT)).toBe('admin')
    } finally {
      child.kill('SIGINT')
    }
    expect(await exited).toBe(0)
    expect(existsSync(dirname(parseExports(stdout).PGSSLROOTCERT))).toBe(false)
  }, 120_000)

  test('--print-env: eval "$(...)" returns once ready, the stand-in keeps running, kill $POSTGRES_DSQL_LOCAL_PID stops it', async () => {
    const script = [
      'set -e',
      `eval "$(${cliLine} local --print-env --roles reader)"`,
      'echo "profile=${AWS_PROFILE-unset} session=${AWS_SESSION_TOKEN-unset}"',
      'echo "pid=$POSTGRES_DSQL_LOCAL_PID port=$PGPORT endpoint=$CLUSTER_ENDPOINT ca=$PGSSLROOTCERT arn=$POSTGRES_DSQL_IAM_ARN"',
      `PGUSER=reader ${cliLine} token`,
    ].join('\n')
    const r = await run('bash', ['-c', script], baseEnv(clashing))
    const vars = Object.fromEntries([...r.stdout.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1], m[2]]))
    const pid = Number(vars.pid)
    try {
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: expect.stringMatching(/running in the background \(pid \d+\): kill \$POSTGRES_DSQL_LOCAL_PID stops it/) })
      expect(vars).toMatchObject({ profile: 'unset', session: 'unset', arn: expect.stringMatching(/^arn:aws:iam::\d{12}:role\//) })
      expect(pid).toBeGreaterThan(0)
      const token = r.stdout.trim().split('\n').pop() as string
      expect(token).toMatch(/\?Action=DbConnect&/)
      // The shell that ran eval has exited; the stand-in still answers.
      expect(await login(token, 'reader', Number(vars.port), readFileSync(vars.ca, 'utf8'), vars.endpoint)).toBe('reader')
    } finally {
      if (pid > 0) process.kill(pid, 'SIGTERM')
    }
    expect(await gone(pid)).toBe(true)
    expect(existsSync(dirname(vars.ca))).toBe(false)
  }, 120_000)

  test('--print-env reports a stand-in that cannot start, and exits 1', async () => {
    const r = await cli(['local', '--print-env', '--region', 'mars'])
    expect(r.code).toBe(1)
    expect(r.stdout).toBe('')
    expect(r.stderr).toMatch(/^postgres-dsql: .*region/)
  })
})
