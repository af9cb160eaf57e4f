/**
 * What the jest preset and the vitest global setup share: read the options, start one local
 * DSQL stand-in, prepare its database, and point this process's environment (inherited by the
 * test workers) at it, so that `dsql()` and `dsql({ host: process.env.CLUSTER_ENDPOINT })` reach it.
 */
import { existsSync, readFileSync } from 'node:fs'
import { isAbsolute, join, resolve } from 'node:path'
import dsql from './index'
import { DsqlConfigError } from './errors'
import { startLocalDsql, type LocalDsqlDialectOptions, type LocalDsqlOptions } from './local'
import { splitStatements } from './local/lexer'
import { migrate, MigrationError } from './migrate'

/** Options of `preset: 'postgres-dsql'` and `globalSetup: 'postgres-dsql/vitest'`. */
export interface DsqlTestOptions {
  /** Non-admin roles to create, each able to log in and use `myschema`. */
  roles?: string[]
  /** DSQL's dialect (default on), its per-transaction limits, or `false` for plain PostgreSQL. */
  dialect?: boolean | LocalDsqlDialectOptions
  region?: string
  clusterId?: string
  maxConnections?: number
  maxConnectionDurationSecs?: number
  connectionRate?: { perSecond: number; burst: number }
  latencyMs?: number
  lockTimeoutMs?: number
  /** A SQL file applied as admin before the tests, one statement at a time (DSQL: one DDL per transaction). */
  setupSql?: string
  /** A directory of migrations applied as admin with `postgres-dsql/migrate`, after `setupSql`. */
  migrations?: string
}

/** The running stand-in, as test files see it (vitest: `inject('postgresDsql')`). */
export interface DsqlTestTarget {
  host: string
  hostaddr: string
  port: number
  region: string
  caFile: string
  credentials: { accessKeyId: string; secretAccessKey: string }
  iamArn: string
  /** The variables set for the test workers. */
  env: Record<string, string>
}

export const CONFIG_FILES = ['postgres-dsql.config.js', 'postgres-dsql.config.cjs', 'postgres-dsql.config.json']
const KEYS = new Set(['roles', 'dialect', 'region', 'clusterId', 'maxConnections', 'maxConnectionDurationSecs', 'connectionRate', 'latencyMs', 'lockTimeoutMs', 'setupSql', 'migrations'])
/** The variable that names the stand-in's IAM identity (`AWS IAM GRANT role TO '<arn>'`). */
export const IAM_ARN_ENV = 'POSTGRES_DSQL_IAM_ARN'
/**
 * A developer's own AWS setup must not decide which keys the tests sign with: the variables that
 * pick another identity or pair with other keys (the same list `npx postgres-dsql local` unsets).
 */
const CLEARED = ['AWS_PROFILE', 'AWS_DEFAULT_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_SECURITY_TOKEN', 'AWS_CREDENTIAL_EXPIRATION']

/** The options in `dir`: a `postgres-dsql.config.{js,cjs,json}` file, else package.json's `"postgres-dsql"` key, else none. */
export function loadTestOptions(dir: string): DsqlTestOptions {
  const file = CONFIG_FILES.map((name) => join(dir, name)).find((path) => existsSync(path))
  if (file) return checkOptions(loadFile(file), file)
  const pkg = join(dir, 'package.json')
  if (!existsSync(pkg)) return {}
  const own = (loadFile(pkg) as Record<string, unknown> | null)?.['postgres-dsql']
  return own === undefined ? {} : checkOptions(own, `${pkg} ("postgres-dsql")`)
}

/** A file that does not parse or throws is named in the error: jest alone would show a bare SyntaxError. */
function loadFile(file: string): unknown {
  try {
    if (file.endsWith('.json')) return JSON.parse(readFileSync(file, 'utf8'))
    const loaded = require(file) as { default?: unknown }
    return loaded && typeof loaded === 'object' && 'default' in loaded ? loaded.default : loaded
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_REQUIRE_ESM')
      throw new DsqlConfigError(`${file} is an ES module: name it postgres-dsql.config.cjs (module.exports = {...}) or use postgres-dsql.config.json.`)
    throw new DsqlConfigError(`${file}: could not be loaded (${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}). Fix it or remove it.`)
  }
}

function checkOptions(value: unknown, where: string): DsqlTestOptions {
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw new DsqlConfigError(`${where}: expected an object of options, got ${JSON.stringify(value)}.`)
  for (const key of Object.keys(value)) {
    if (!KEYS.has(key)) throw new DsqlConfigError(`${where}: unknown option \`${key}\`; known: ${[...KEYS].join(', ')}.`)
  }
  const options = value as DsqlTestOptions
  if (options.setupSql !== undefined && (typeof options.setupSql !== 'string' || !options.setupSql))
    throw new DsqlConfigError(`${where}: \`setupSql\` must be the path of a SQL file, got ${JSON.stringify(options.setupSql)}.`)
  if (options.migrations !== undefined && (typeof options.migrations !== 'string' || !options.migrations))
    throw new DsqlConfigError(`${where}: \`migrations\` must be the path of a directory of *.sql files, got ${JSON.stringify(options.migrations)}.`)
  return options
}

/**
 * Starts the stand-in for a test run whose project lives in `dir`, prepares its database and
 * sets the environment; the returned `stop` stops it and restores the environment.
 */
export async function startTestDsql(dir: string): Promise<{ target: DsqlTestTarget; stop: () => Promise<void> }> {
  const { setupSql, migrations, ...options } = loadTestOptions(dir)
  const local = await startLocalDsql(options satisfies LocalDsqlOptions)
  // The IAM identity too: a test that creates a role maps it with AWS IAM GRANT, as on DSQL.
  const env = { ...local.env, [IAM_ARN_ENV]: local.iamArn }
  const saved = Object.fromEntries([...Object.keys(env), ...CLEARED].map((name) => [name, process.env[name]]))
  const stop = async () => {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name]
      else process.env[name] = value
    }
    await local.stop()
  }
  try {
    const path = (p: string | undefined) => p && (isAbsolute(p) ? p : resolve(dir, p))
    await prepareDatabase(local, { setupSql: path(setupSql), migrations: path(migrations) })
  } catch (err) {
    await local.stop()
    throw err
  }
  for (const name of CLEARED) delete process.env[name]
  Object.assign(process.env, env)
  const { host, hostaddr, port, region, caFile, iamArn, credentials } = local
  const target = { host, hostaddr, port, region, caFile, iamArn, credentials: { accessKeyId: credentials.accessKeyId, secretAccessKey: credentials.secretAccessKey }, env }
  return { target, stop }
}

type Local = Awaited<ReturnType<typeof startLocalDsql>>

/** Brings the new database to what the tests expect: the SQL file, then the migrations. */
async function prepareDatabase(local: Local, { setupSql, migrations }: { setupSql?: string; migrations?: string }): Promise<void> {
  if (!setupSql && !migrations) return
  // migrate needs two connections: one runs the statements, the other keeps their claims alive.
  const sql = dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, max: 2, onnotice: () => undefined })
  try {
    if (setupSql) await applySqlFile(sql, setupSql)
    if (migrations) {
      try {
        await migrate(sql, { dir: migrations })
      } catch (err) {
        throw err instanceof MigrationError ? new MigrationError(err.code, `migrations: ${err.message}`, { ...err, cause: err.cause }) : err
      }
    }
  } finally {
    await sql.end()
  }
}

async function applySqlFile(sql: ReturnType<typeof dsql>, setupSql: string): Promise<void> {
  if (!existsSync(setupSql)) throw new DsqlConfigError(`setupSql: no file ${setupSql}.`)
  const text = readFileSync(setupSql, 'utf8')
  // One session for the whole file: a SET in it lasts for the statements after it.
  const conn = await sql.reserve()
  try {
    for (const [i, { start, end }] of splitStatements(text).entries()) {
      try {
        await conn.unsafe(text.slice(start, end))
      } catch (err) {
        const line = text.slice(0, start).split('\n').length
        throw new DsqlConfigError(`setupSql: statement ${i + 1} of ${setupSql} (line ${line}) failed: ${err instanceof Error ? err.message : String(err)}`)
      }
    }
  } finally {
    conn.release()
  }
}
