import postgres from 'postgres'
import { connector } from './connect'
import { PROBE_PREFIX } from './connect/handover'
import { Hosts, type EndpointState } from './connect/hosts'
import { FLUSH_PARAMETER, FLUSH_VALUE } from './connect/startup'
import { credentialsOption, definedOnly, mergeUrl, resolveConfig, type DsqlConfig, type DsqlOptions } from './config'
import { guardBegin, guardQueries, reserveGuard } from './reserve'
import { withRetry, type RetryBegin } from './retry'
import { credentialProvider, tokenMinter, type Mint } from './token'
import { installArrayTypes, type PgTypeOptions } from './types'
import type { PgSocketOptions } from './connect'

export type { DsqlOptions, DsqlLogger, DsqlSession, RetryOptions, Credentials } from './config'
export { DsqlError, DsqlConfigError, DsqlCredentialsError, DsqlTokenError, DsqlTlsError, DsqlConnectionError } from './errors'
export type { EndpointState } from './connect/hosts'
export { isOccError, retryOcc, DsqlRetryError, DsqlCommitUnknownError, type RetryBegin } from './retry'

type Types = Record<string, postgres.PostgresType>

/** The `sql` type postgres.js itself returns for these custom types. */
type TypesOf<T extends Types> =
  Record<string, postgres.PostgresType> extends T
    ? {}
    : { [K in keyof T]: T[K] extends { serialize: (value: infer R) => unknown; parse: (raw: never) => infer R } ? R : never }

/** What postgres.js returns for these custom types; `begin` also takes per-call OCC retry settings. */
export type DsqlSql<T extends Types = {}> = postgres.Sql<TypesOf<T>> & {
  begin: RetryBegin<TypesOf<T>>
  options: postgres.Sql<TypesOf<T>>['options'] & { readonly dsql: DsqlEndpoints }
}

/** `sql.options.dsql`: where new connections go (a multi-Region cluster's endpoints, in preference order). */
export interface DsqlEndpoints {
  /** Each endpoint, and whether it is cooling off after failures (new connections then go to the next). */
  readonly endpoints: EndpointState[]
  /** The endpoint the most recent new connection went to. */
  readonly lastHost: string | undefined
}

export const version: string = (require('../package.json') as { version: string }).version

/**
 * A postgres.js `sql` connected to Aurora DSQL: every new connection mints its own IAM token,
 * verifies TLS, and selects the schema before its first query.
 */
export function dsql<T extends Types = {}>(options?: DsqlOptions<T>): DsqlSql<T>
export function dsql<T extends Types = {}>(url: string, options?: DsqlOptions<T>): DsqlSql<T>
export function dsql<T extends Types = {}>(first?: string | DsqlOptions<T>, second?: DsqlOptions<T>): DsqlSql<T> {
  const given = typeof first === 'string' ? mergeUrl(first, second ?? {}) : (first ?? {})
  const options = definedOnly(given) as DsqlOptions<T>
  const config = resolveConfig(options as DsqlOptions)
  const credentials = credentialProvider(credentialsOption(options as DsqlOptions), options.profile ?? process.env.AWS_PROFILE, process.env, options.logger)
  let ending = false
  // One minter per endpoint: each Region's token is signed for its own host and Region.
  const mints = new Map(config.endpoints.map((e) => [e, tokenMinter(e, credentials)]))
  const mint = mints.get(config)!
  const hosts = new Hosts(config.endpoints, options.logger)
  const reserves = reserveGuard()
  const { reserving, opened, closed } = reserves
  const open = connector(config, (e) => mints.get(e)!, { logger: options.logger, onconnect: options.onconnect, closing: () => ending, reserving, opened, closed }, hosts)
  const socket = (pg: PgSocketOptions & PgTypeOptions) => {
    installArrayTypes(pg)
    return open(pg)
  }
  const sql = postgres(postgresOptions(options, config, socket, mint) as unknown as postgres.Options<T>) as unknown as DsqlSql<T>
  // postgres.js's connections took its backstop timeout (ours + 1 s) when created; show the user's.
  ;(sql.options as { connect_timeout: number }).connect_timeout = config.connectTimeoutMs / 1000
  const end = sql.end
  sql.end = (...args: Parameters<typeof end>) => ((ending = true), end(...args))
  const state: DsqlEndpoints = {
    get endpoints() {
      return hosts.snapshot()
    },
    get lastHost() {
      return hosts.last?.host
    },
  }
  Object.defineProperty(sql.options, 'dsql', { value: state, enumerable: false })
  reserves.install(sql)
  guardBegin(sql)
  // postgres.js leaves a connection waiting for a query cancelled before it was sent: its queries are guarded.
  return withRetry(guardQueries(sql as unknown as Parameters<typeof guardQueries>[0]) as unknown as DsqlSql<T>, options.retry, options.logger)
}

export default dsql

/** Options that are the connector's own, not postgres.js's. */
const OWN = new Set([
  'host', 'hostname', 'port', 'region', 'schema', 'onconnect', 'tokenDurationSecs', 'customCredentialsProvider', 'credentials',
  'profile', 'ssl', 'sslrootcert', 'sslnegotiation', 'hostaddr', 'retry', 'logger', 'transport', 'user', 'username', 'database', 'db', 'connection',
])

/**
 * Every postgres.js option is set explicitly: an omitted one would be read from PG* variables
 * (PGMAX=3 gives the string "3", PGSSL could turn TLS off) and an undefined one beats the default.
 */
function postgresOptions<T extends Types>(options: DsqlOptions<T>, config: DsqlConfig, socket: (pg: PgSocketOptions & PgTypeOptions) => unknown, mint: Mint) {
  const passed = Object.fromEntries(Object.entries(options).filter(([k]) => !OWN.has(k)))
  return {
    max: 10,
    idle_timeout: null,
    max_pipeline: 100,
    backoff: (retries: number) => (0.5 + Math.random() / 2) * Math.min(3 ** retries / 100, 20),
    keep_alive: 60,
    prepare: true,
    publications: 'alltables',
    target_session_attrs: null,
    sslnegotiation: null,
    fetch_types: false,
    // DSQL closes connections at 60 minutes: replace each one before, at its own jittered age.
    max_lifetime: () => (50 + Math.random() * 5) * 60,
    ...passed,
    // The reserve probe (lib/reserve.ts) is ours, answered without the server: debug sees only the user's queries.
    debug: withoutProbe(options.debug),
    // The connector's own deadline is connect_timeout and fails with a typed CONNECT_TIMEOUT; postgres.js's
    // timer (started a moment later) is only a backstop and must not win the race.
    connect_timeout: config.connectTimeoutMs / 1000 + 1,
    host: config.host,
    port: config.port,
    user: config.user,
    database: config.database,
    // The connector authenticates before postgres.js sees the socket, with this same minter; as
    // `sql.options.pass` it gives other tools a fresh token (and is never a string in sql.options).
    pass: mint,
    ssl: false,
    connection: { ...options.connection, application_name: applicationName(options.connection?.application_name), [FLUSH_PARAMETER]: FLUSH_VALUE },
    socket,
  }
}

function withoutProbe(debug: DsqlOptions['debug']): DsqlOptions['debug'] {
  if (typeof debug !== 'function') return debug ?? false
  return (connection, query, parameters, types) => void (query.startsWith(PROBE_PREFIX) || debug(connection, query, parameters, types))
}

function applicationName(given: unknown): string {
  const ours = `postgres-dsql/${version}`
  const user = given ?? process.env.PGAPPNAME
  return user ? `${String(user)} ${ours}` : ours
}

// CommonJS: `const dsql = require('postgres-dsql')` gives the function, as require('postgres')
// does; `.dsql`, `.default` and the other exports hang off it.
module.exports = Object.assign(dsql, module.exports)
