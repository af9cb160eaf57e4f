import { readFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { isIP } from 'node:net'
import { join } from 'node:path'
import type { ConnectionOptions } from 'node:tls'
import type postgres from 'postgres'
import type { AwsCredentialIdentity, AwsCredentialIdentityProvider } from '@smithy/types'
import { DsqlConfigError } from './errors'

/** Receives connection events and retries; never a secret. */
export interface DsqlLogger {
  debug?(message: string, fields?: Record<string, unknown>): void
  warn?(message: string, fields?: Record<string, unknown>): void
  error?(message: string, fields?: Record<string, unknown>): void
}

/** OCC retry for `sql.begin`; the names follow the official AWS connector. */
export interface RetryOptions {
  /** Retries after the first attempt (default 10). */
  maxRetries?: number
  /** First backoff delay in ms (default 20). */
  baseDelayMs?: number
  /** Cap on one delay in ms (default 2000). */
  maxDelayMs?: number
  /** Share of each delay that is random, 0..1 (default 1: full jitter). */
  jitterFactor?: number
  /** Give up when the next attempt would start after this many ms (default 30000). */
  deadlineMs?: number
}

/** What `onconnect` gets: the new connection, before postgres.js runs anything on it. */
export interface DsqlSession {
  /** Runs SQL with the simple protocol on this connection; rows come back as text. */
  query(text: string): Promise<Record<string, string | null>[]>
  /** The server's ParameterStatus values (server_version, TimeZone, ...). */
  readonly parameters: Readonly<Record<string, string>>
}

export type Credentials = AwsCredentialIdentity | AwsCredentialIdentityProvider

type Types = Record<string, postgres.PostgresType>
type OwnedKeys = 'password' | 'pass' | 'ssl' | 'host' | 'hostname' | 'port' | 'path' | 'socket'

export interface DsqlOptions<T extends Types = {}> extends Omit<postgres.Options<T>, OwnedKeys> {
  /**
   * Cluster endpoint `<id>.dsql.<region>.on.aws`, or a bare 26-character cluster id (default
   * `PGHOST`). A multi-Region cluster: its endpoints as a list (or comma-separated), the
   * application's own Region first; each is signed for its own Region, with failover and fail-back.
   */
  host?: string | string[]
  /** Alias of `host`. */
  hostname?: string
  /** Default `PGPORT`, else 5432 (443 with `transport: 'websocket'`). With several hosts, one port for all or a list in host order. */
  port?: number | number[]
  /** Signing region (default: parsed from `host`, else AWS_REGION, AWS_DEFAULT_REGION, the profile's region). */
  region?: string
  /** Schema selected on every new connection: `public` for admin, `myschema` otherwise; `false` leaves the server's. */
  schema?: string | false
  /** Runs on every new connection after the schema is selected, before its first query. */
  onconnect?: (session: DsqlSession) => void | Promise<void>
  /** Validity of each minted token in seconds, 1..604800 (default 900). */
  tokenDurationSecs?: number
  /** AWS credentials or a provider of them (default: the Node provider chain). */
  customCredentialsProvider?: Credentials
  /** Alias of `customCredentialsProvider`. */
  credentials?: Credentials
  /** Named AWS profile for credentials and region (default `AWS_PROFILE`). */
  profile?: string
  /** postgres.js forms; default verify-full. `false`/`disable` is refused: DSQL requires TLS. */
  ssl?: boolean | 'require' | 'allow' | 'prefer' | 'verify-ca' | 'verify-full' | ConnectionOptions
  /** PEM file of the only CA to trust, e.g. `certs/AmazonRootCA1.pem` (default `PGSSLROOTCERT`). */
  sslrootcert?: string
  /** `direct` (TLS first, ALPN `postgresql`) or `postgres` (SSLRequest first). Default `direct`. */
  sslnegotiation?: 'direct' | 'postgres'
  /** Connect to this address; SNI, certificate check and token stay those of `host` (default `PGHOSTADDR`). */
  hostaddr?: string | string[]
  /** OCC retry for `sql.begin` (default off). */
  retry?: boolean | RetryOptions
  /** Connection events and retries. */
  logger?: DsqlLogger
  /** `tcp` (default): PostgreSQL over TLS. `websocket`: the protocol in WebSocket messages over `wss://host/` (port 443). */
  transport?: 'tcp' | 'websocket'
}

export type Action = 'DbConnect' | 'DbConnectAdmin'

/**
 * Everything the connector needs, resolved and validated once per `dsql()` call. The fields
 * name the preferred endpoint; `endpoints` holds one such config per host, in preference order.
 */
export interface DsqlConfig {
  endpoints: DsqlConfig[]
  host: string
  hostaddr: string
  port: number
  region: string
  clusterId: string | undefined
  user: string
  database: string
  action: Action
  schema: string | false
  tokenDurationSecs: number
  sslnegotiation: 'direct' | 'postgres'
  /** Not chosen by the user: fall back to SSLRequest when a server does not speak direct TLS. */
  directFallback: boolean
  tls: ConnectionOptions
  connectTimeoutMs: number
  transport: 'tcp' | 'websocket'
}

const ENDPOINT = /^([a-z0-9]{26})\.dsql(?:-[a-z0-9]+)?\.([a-z]{2}(?:-[a-z]+)+-\d+)\.on\.aws$/
/** Looks like a DSQL endpoint, whatever its cluster id part: a typo there deserves its own error. */
const DSQL_SHAPED = /^([^.]*)\.dsql(?:-[a-z0-9]+)?\.[a-z0-9-]+\.on\.aws$/
const CLUSTER_ID = /^[a-z0-9]{26}$/
const REGION = /^[a-z]{2}(?:-[a-z]+)+-\d+$/
const MAX_TOKEN_SECS = 604800

/** Options as given, with `url` folded in: the URL's values lose to explicit options, as in postgres.js. */
export function mergeUrl<T extends Types>(url: string | undefined, options: DsqlOptions<T>): DsqlOptions<T> {
  if (url === undefined) return options
  const { url: single, hosts, ports } = splitHosts(url)
  let parsed: URL
  try {
    parsed = new URL(single)
  } catch {
    throw new DsqlConfigError(`Invalid connection URL: expected postgres://user@<cluster-id>.dsql.<region>.on.aws/postgres`)
  }
  if (parsed.password) throw passwordError()
  const query = Object.fromEntries(parsed.searchParams)
  const { sslmode, ssl, sslrootcert, sslnegotiation, hostaddr, region, ...rest } = query
  // As in postgres.js: its own option names are options, every other key a startup parameter.
  const settings = Object.fromEntries(Object.entries(rest).filter(([k]) => k in URL_OPTIONS).map(([k, v]) => [k, URL_OPTIONS[k](v)]))
  const params = Object.fromEntries(Object.entries(rest).filter(([k]) => !(k in URL_OPTIONS)))
  const fromUrl: Record<string, unknown> = {
    ...settings,
    host: hosts ?? (parsed.hostname ? decodeURIComponent(parsed.hostname) : undefined),
    port: ports ?? (parsed.port ? Number(parsed.port) : undefined),
    user: parsed.username ? decodeURIComponent(parsed.username) : undefined,
    database: parsed.pathname.length > 1 ? decodeURIComponent(parsed.pathname.slice(1)) : undefined,
    ssl: sslmode ?? ssl,
    sslrootcert,
    sslnegotiation,
    hostaddr,
    region,
    connection: Object.keys(params).length ? params : undefined,
  }
  const merged = { ...definedOnly(fromUrl), ...definedOnly(options) } as DsqlOptions<T>
  if (fromUrl.connection && options.connection) merged.connection = { ...params, ...options.connection }
  return merged
}

/**
 * postgres.js's multi-host URL, `postgres://user@a:5432,b:5433/db`: the URL parser takes one
 * host, so the list is cut out first and the URL parsed with the first host alone.
 */
function splitHosts(url: string): { url: string; hosts?: string[]; ports?: number[] } {
  const start = url.indexOf('://')
  if (start < 0) return { url }
  const authority = url.slice(start + 3).split(/[/?#]/)[0]
  const at = authority.lastIndexOf('@')
  const list = authority.slice(at + 1)
  if (!list.includes(',')) return { url }
  const parts = list.split(',').map((p) => /^(.*?)(?::(\d+))?$/.exec(p) as RegExpExecArray)
  const hosts = parts.map((m) => decodeURIComponent(m[1]))
  const ports = parts.some((m) => m[2]) ? parts.map((m) => Number(m[2] ?? 5432)) : undefined
  const prefix = url.slice(0, start + 3) + authority.slice(0, at + 1)
  return { url: prefix + parts[0][0] + url.slice(start + 3 + authority.length), hosts, ports }
}

const number = (v: string) => Number(v)
const flag = (v: string) => v !== 'false' && v !== '0' && v !== 'disable'
/** postgres.js options a URL may carry, with how to read their text. */
const URL_OPTIONS: Record<string, (v: string) => unknown> = {
  max: number, idle_timeout: number, connect_timeout: number, max_lifetime: number, max_pipeline: number, backoff: number,
  keep_alive: number, prepare: flag, fetch_types: flag, debug: flag, publications: String, target_session_attrs: String,
}

/** Drops keys whose value is `undefined`: postgres.js would let them beat its defaults. */
export function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>
}

export function resolveConfig(o: DsqlOptions<Types>, env: NodeJS.ProcessEnv = process.env): DsqlConfig {
  const raw = o as Record<string, unknown>
  if (raw.password !== undefined || raw.pass !== undefined) throw passwordError()
  if (raw.socket !== undefined || raw.path !== undefined)
    throw new DsqlConfigError('`socket` and `path` are owned by postgres-dsql: it opens the TLS connection to DSQL itself.')
  checkOptions(raw)

  const profile = o.profile ?? env.AWS_PROFILE
  const hosts = hostList(o.host ?? o.hostname ?? env.PGHOST)
  const multi = hosts.length > 1
  const hostaddrs = perHost('hostaddr', o.hostaddr ?? env.PGHOSTADDR, hosts.length)
  const ports = perHost('port', o.port ?? (env.PGPORT || (o.transport === 'websocket' ? 443 : undefined)), hosts.length)
  // With several hosts, an explicit region is for those whose name does not say theirs.
  const named = hosts.map((given) => resolveHost(given, o.region, env, profile, multi))
  const { host, clusterId, region } = named[0]
  const user = o.user ?? o.username ?? 'admin'
  if (typeof user !== 'string' || !user) throw new DsqlConfigError('`user` must be a non-empty role name, e.g. "admin".')
  const database = o.database ?? o.db ?? 'postgres'
  const negotiation = o.sslnegotiation ?? env.PGSSLNEGOTIATION
  const tls = resolveTls(o.ssl, o.sslrootcert ?? env.PGSSLROOTCERT, host)
  // Once per dsql() call, which resolves its options exactly once.
  if (tls.rejectUnauthorized === false)
    o.logger?.warn?.('dsql: TLS certificate verification is off (ssl.rejectUnauthorized: false): the server is not authenticated and the IAM token can be intercepted', { host })

  const first: DsqlConfig = {
    endpoints: [],
    host,
    hostaddr: nonEmpty(hostaddrs[0], 'hostaddr') ?? host,
    port: resolvePort(ports[0]),
    region,
    clusterId,
    user,
    database,
    action: user === 'admin' ? 'DbConnectAdmin' : 'DbConnect',
    schema: resolveSchema(o.schema, user),
    tokenDurationSecs: resolveDuration(o.tokenDurationSecs),
    sslnegotiation: resolveNegotiation(negotiation),
    directFallback: negotiation === undefined,
    tls,
    connectTimeoutMs: resolveConnectTimeout(o.connect_timeout),
    transport: resolveTransport(o.transport),
  }
  // Each endpoint: its own name (SNI, certificate, token), Region, address and port.
  first.endpoints = named.map((n, i) =>
    i === 0
      ? first
      : { ...first, ...n, hostaddr: nonEmpty(hostaddrs[i], 'hostaddr') ?? n.host, port: resolvePort(ports[i]), tls: { ...tls, servername: n.host } },
  )
  for (const e of first.endpoints) e.endpoints = first.endpoints
  const seen = new Set<string>()
  for (const e of first.endpoints) {
    if (seen.has(e.host)) throw new DsqlConfigError(`\`host\` lists "${e.host}" twice: give each Region's endpoint once.`)
    seen.add(e.host)
  }
  return first
}

/** `host` as a list: an array, or a comma-separated string as in postgres.js URLs and PGHOST. */
function hostList(given: string | string[] | undefined): (string | undefined)[] {
  if (given === undefined) return [undefined]
  const list = Array.isArray(given) ? given : given.split(',')
  if (list.length === 0) throw new DsqlConfigError('`host` is an empty list: give at least one cluster endpoint.')
  for (const h of list) if (typeof h !== 'string') throw typeError('host', h, 'a cluster endpoint name')
  return list
}

/** A per-host option: one value for every host, or a list (array or comma-separated) in host order. */
function perHost<T extends string | number>(name: string, given: T | T[] | undefined, hosts: number): (T | string | undefined)[] {
  if (given === undefined) return Array(hosts).fill(undefined)
  const list: (T | string)[] = Array.isArray(given) ? given : typeof given === 'string' && given.includes(',') ? given.split(',') : [given]
  if (list.length === 1) return Array(hosts).fill(list[0])
  if (list.length !== hosts)
    throw new DsqlConfigError(`\`${name}\` lists ${list.length} values for ${hosts} host${hosts === 1 ? '' : 's'}: give one for all, or one per host in host order.`)
  return list
}

type Check = (value: unknown) => boolean
const isString: Check = (v) => typeof v === 'string'
const isNumber: Check = (v) => typeof v === 'number' && !Number.isNaN(v)
const isBoolean: Check = (v) => typeof v === 'boolean'
const isFunction: Check = (v) => typeof v === 'function'
const isObject: Check = (v) => typeof v === 'object' && v !== null && !Array.isArray(v)
const isNull: Check = (v) => v === null
const either = (...checks: Check[]): Check => (v) => checks.some((check) => check(v))

/** The type each option must have, with how to say it; an undefined value means the default. */
const OPTION_TYPES: Record<string, [Check, string]> = {
  host: [either(isString, Array.isArray), 'a cluster endpoint name, or a list of them (multi-Region)'],
  hostname: [isString, 'a cluster endpoint name'],
  port: [either(isNumber, isString, Array.isArray), 'a TCP port number'],
  region: [isString, 'an AWS region name such as "us-east-1"'],
  user: [isString, 'a role name'],
  username: [isString, 'a role name'],
  database: [isString, 'a database name ("postgres")'],
  db: [isString, 'a database name ("postgres")'],
  schema: [either(isString, (v) => v === false), 'a schema name or false'],
  onconnect: [isFunction, 'a function (session) => ...'],
  tokenDurationSecs: [isNumber, 'a number of seconds'],
  customCredentialsProvider: [either(isObject, isFunction), 'AWS credentials or a provider function'],
  credentials: [either(isObject, isFunction), 'AWS credentials or a provider function'],
  profile: [isString, 'a profile name'],
  ssl: [either(isBoolean, isString, isObject), 'true, a mode such as "verify-full", or a tls options object'],
  sslrootcert: [isString, 'the path of a PEM file'],
  sslnegotiation: [isString, '"direct" or "postgres"'],
  hostaddr: [either(isString, Array.isArray), 'a host name or IP address'],
  retry: [either(isBoolean, isObject), 'true, false or { maxRetries, baseDelayMs, maxDelayMs, jitterFactor, deadlineMs }'],
  logger: [isObject, 'an object with debug, warn and error functions'],
  // postgres.js's own options: it takes them as given, so a string where a number belongs breaks it.
  max: [isNumber, 'a number of connections'],
  idle_timeout: [either(isNumber, isNull), 'a number of seconds or null'],
  connect_timeout: [isNumber, 'a number of seconds'],
  max_lifetime: [either(isNumber, isNull, isFunction), 'a number of seconds, null or a function'],
  max_pipeline: [isNumber, 'a number of queries'],
  backoff: [either(isNumber, isFunction), 'a number of seconds or a function'],
  keep_alive: [either(isNumber, isNull), 'a number of seconds or null'],
  prepare: [isBoolean, 'true or false'],
  fetch_types: [isBoolean, 'true or false'],
  debug: [either(isBoolean, isFunction), 'true, false or a function'],
  publications: [isString, 'a publication name'],
  target_session_attrs: [either(isString, isNull), 'a session attribute such as "read-write"'],
  transform: [either(isObject, isFunction), 'a transform such as postgres.camel'],
  types: [isObject, 'an object of custom types'],
  connection: [isObject, 'an object of startup parameters'],
  onnotice: [isFunction, 'a function'],
  onparameter: [isFunction, 'a function'],
  onclose: [isFunction, 'a function'],
}

const LOGGER_LEVELS = ['debug', 'warn', 'error']

/** Every option of a wrong type is a DsqlConfigError here, never a TypeError deep inside. */
function checkOptions(raw: Record<string, unknown>): void {
  for (const name of ['host', 'hostaddr', 'port'])
    if (Array.isArray(raw[name])) for (const item of raw[name] as unknown[]) if (!OPTION_TYPES[name][0](item)) throw typeError(name, item, OPTION_TYPES[name][1])
  for (const [name, [check, expected]] of Object.entries(OPTION_TYPES)) {
    const value = raw[name]
    if (value !== undefined && !check(value)) throw typeError(name, value, expected)
  }
  const logger = raw.logger as Record<string, unknown> | undefined
  for (const level of LOGGER_LEVELS)
    if (logger && logger[level] !== undefined && typeof logger[level] !== 'function') throw typeError(`logger.${level}`, logger[level], 'a function')
  const connection = raw.connection as Record<string, unknown> | undefined
  for (const [key, value] of Object.entries(connection ?? {}))
    if (value !== undefined && value !== null && !['string', 'number', 'boolean'].includes(typeof value))
      throw typeError(`connection.${key}`, value, 'a string, number or boolean startup parameter')
  if (typeof raw.retry === 'object') checkRetry(raw.retry as Record<string, unknown>)
  for (const name of ['customCredentialsProvider', 'credentials']) {
    const given = raw[name] as Record<string, unknown> | undefined
    if (isObject(given) && (typeof given?.accessKeyId !== 'string' || typeof given?.secretAccessKey !== 'string'))
      throw new DsqlConfigError(`\`${name}\` must have string accessKeyId and secretAccessKey (and sessionToken for temporary credentials), or be a provider function.`)
  }
  if (raw.max !== undefined && !(Number.isInteger(raw.max) && (raw.max as number) >= 1))
    throw typeError('max', raw.max, 'a whole number of connections, 1 or more')
}

const RETRY_LIMITS: Record<string, [number, number]> = {
  maxRetries: [0, Infinity],
  baseDelayMs: [0, Infinity],
  maxDelayMs: [0, Infinity],
  jitterFactor: [0, 1],
  deadlineMs: [0, Infinity],
}

/** Also for a call's own retry settings (`sql.begin(fn, { ... })`). */
export function checkRetry(retry: Record<string, unknown>): void {
  for (const [key, value] of Object.entries(retry)) {
    const limits = RETRY_LIMITS[key]
    if (!limits) throw new DsqlConfigError(`\`retry.${key}\` is not a retry setting: use ${Object.keys(RETRY_LIMITS).join(', ')}.`)
    if (value === undefined) continue
    if (typeof value !== 'number' || Number.isNaN(value) || value < limits[0] || value > limits[1])
      throw typeError(`retry.${key}`, value, limits[1] === 1 ? 'a number from 0 to 1' : 'a number, 0 or more')
  }
}

function typeError(name: string, value: unknown, expected: string): DsqlConfigError {
  return new DsqlConfigError(`\`${name}\` must be ${expected}, not ${describeValue(value)}.`)
}

/** What was given, without its content: an option may hold a secret. */
function describeValue(value: unknown): string {
  if (Array.isArray(value)) return 'an array'
  if (value === null) return 'null'
  if (typeof value === 'string') return value.length <= 40 && !/[A-Za-z0-9/+=]{32,}/.test(value) ? `the string "${value}"` : 'a string'
  if (typeof value === 'number') return `the number ${value}`
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`
}

function passwordError(): DsqlConfigError {
  return new DsqlConfigError(
    'Do not pass a password: postgres-dsql mints a fresh IAM token for every connection. ' +
      'Remove `password`/`pass` and give AWS credentials instead (`credentials`, `profile`, or the default chain).',
  )
}

function resolveHost(given: string | undefined, optRegion: string | undefined, env: NodeJS.ProcessEnv, profile: string | undefined, multi = false) {
  if (!given?.trim()) throw new DsqlConfigError('No DSQL endpoint: pass `host` (e.g. "<cluster-id>.dsql.us-east-1.on.aws") or set PGHOST.')
  const host = given.trim().toLowerCase().replace(/\.$/, '')
  if (isIP(host) || host === 'localhost' || host.endsWith('.localhost'))
    throw new DsqlConfigError(
      `\`host\` must be the cluster's endpoint name, not "${given}": the token and the certificate check are for that name. ` +
        `To connect through ${given} (a tunnel, a proxy, the local stand-in), keep \`host\` the endpoint and set \`hostaddr: '${given}'\`.`,
    )
  if (host.includes('/') || host.includes(':'))
    throw new DsqlConfigError(`\`host\` must be a bare host name, not "${given}": give the port as \`port\` and a URL as the first argument.`)
  if (optRegion !== undefined && !REGION.test(optRegion))
    throw new DsqlConfigError(`\`region\` must be an AWS region name such as "us-east-1", not ${describeValue(optRegion)}.`)

  const match = ENDPOINT.exec(host)
  const shaped = DSQL_SHAPED.exec(host)
  if (!match && shaped && optRegion === undefined) {
    const wrong = CLUSTER_ID.test(shaped[1]) ? 'its region part is not an AWS region' : `"${shaped[1]}" is not a cluster id (26 lowercase letters and digits)`
    throw new DsqlConfigError(
      `\`host\` "${given}" is not a DSQL endpoint: ${wrong}. Check it against <cluster-id>.dsql.<region>.on.aws ` +
        '(for a name that is not a cluster endpoint, such as a proxy, pass `region` too).',
    )
  }
  if (match) {
    if (optRegion && optRegion !== match[2] && !multi)
      throw new DsqlConfigError(`\`region\` "${optRegion}" contradicts the endpoint's region "${match[2]}": drop \`region\` or fix the host.`)
    return { host, clusterId: match[1], region: match[2] }
  }
  const region = optRegion ?? envRegion(env, profile)
  if (!host.includes('.')) {
    if (!CLUSTER_ID.test(host))
      throw new DsqlConfigError(
        `\`host\` "${given}" is neither a DSQL endpoint (<cluster-id>.dsql.<region>.on.aws) nor a cluster id (26 lowercase letters and digits).`,
      )
    if (!region) throw noRegion(given)
    return { host: `${host}.dsql.${region}.on.aws`, clusterId: host, region }
  }
  if (!region) throw noRegion(given)
  return { host, clusterId: undefined, region }
}

function noRegion(given: string): DsqlConfigError {
  return new DsqlConfigError(
    `Cannot tell the AWS region for "${given}": pass \`region\`, set AWS_REGION, or use the full endpoint <cluster-id>.dsql.<region>.on.aws.`,
  )
}

function envRegion(env: NodeJS.ProcessEnv, profile: string | undefined): string | undefined {
  return env.AWS_REGION || env.AWS_DEFAULT_REGION || profileRegion(env, profile)
}

/** The SDK reads this file asynchronously; `dsql()` is synchronous, so read the one key here. */
export function profileRegion(env: NodeJS.ProcessEnv, profile: string | undefined): string | undefined {
  const file = env.AWS_CONFIG_FILE ?? join(homedir(), '.aws', 'config')
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch {
    return undefined
  }
  const name = profile ?? 'default'
  let inSection = false
  for (const line of text.split(/\r?\n/)) {
    const header = /^\s*\[\s*(?:profile\s+)?([^\]]+?)\s*\]/.exec(line)
    if (header) inSection = header[1] === name
    else if (inSection) {
      const kv = /^\s*region\s*=\s*(\S+)/.exec(line)
      if (kv) return kv[1]
    }
  }
  return undefined
}

function resolvePort(value: number | string | undefined): number {
  if (value === undefined || value === '') return 5432
  const port = Number(value)
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new DsqlConfigError(`\`port\` ${value} is not a TCP port (1..65535).`)
  return port
}

function resolveSchema(schema: string | false | undefined, user: string): string | false {
  if (schema === false) return false
  if (schema === undefined) return user === 'admin' ? 'public' : 'myschema'
  if (typeof schema !== 'string' || !schema) throw new DsqlConfigError('`schema` must be a schema name or `false`.')
  return schema
}

function resolveDuration(value: number | undefined): number {
  if (value === undefined) return 900
  if (!Number.isInteger(value) || value < 1 || value > MAX_TOKEN_SECS)
    throw new DsqlConfigError(`\`tokenDurationSecs\` ${value} is out of range: DSQL accepts whole seconds from 1 to ${MAX_TOKEN_SECS}.`)
  return value
}

function resolveNegotiation(value: string | undefined): 'direct' | 'postgres' {
  if (value === undefined || value === 'direct' || value === 'postgres') return value ?? 'direct'
  throw new DsqlConfigError(`\`sslnegotiation\` "${value}" is not "direct" or "postgres".`)
}

function resolveConnectTimeout(value: number | undefined): number {
  const secs = value === undefined ? 30 : Number(value)
  if (!(secs > 0)) throw new DsqlConfigError('`connect_timeout` must be a positive number of seconds.')
  return secs * 1000
}

function resolveTransport(value: unknown): 'tcp' | 'websocket' {
  if (value === undefined || value === 'tcp' || value === 'websocket') return value ?? 'tcp'
  throw new DsqlConfigError(`\`transport\` "${String(value)}" is not "tcp" or "websocket".`)
}

function nonEmpty(value: string | undefined, name: string): string | undefined {
  if (value === undefined) return undefined
  if (!value.trim()) throw new DsqlConfigError(`\`${name}\` is empty.`)
  return value.trim()
}

type SslOption = DsqlOptions['ssl'] | 'disable' | 'false' | 'true'

/** postgres.js's string modes: all verify the chain and the host name (see README, TLS). */
const SSL_MODES = new Set<unknown>([undefined, true, 'true', 'require', 'prefer', 'allow', 'verify-ca', 'verify-full'])

/**
 * postgres.js's `ssl` forms, mapped to node:tls options. DSQL always requires TLS and its
 * certificate always names the endpoint, so every mode verifies both: 'require'/'prefer'/'allow'
 * have no plaintext to fall back to, and 'verify-ca' loses nothing by checking the name too.
 * Only a tls options object can turn verification off, on purpose.
 */
function resolveTls(ssl: SslOption, rootcert: string | undefined, host: string): ConnectionOptions {
  const base: ConnectionOptions = { servername: host, minVersion: 'TLSv1.2', ...readRootCert(rootcert) }
  if (ssl === false || ssl === 'disable' || ssl === 'false')
    throw new DsqlConfigError('DSQL requires TLS: remove `ssl: false` / `sslmode=disable` (TLS is verified by default).')
  if (SSL_MODES.has(ssl)) return { ...base, rejectUnauthorized: true }
  if (typeof ssl === 'object' && ssl !== null) return { ...base, ...ssl }
  throw new DsqlConfigError(
    `\`ssl\` "${String(ssl)}" is not a TLS mode: use true, "verify-full", "verify-ca", "require", "prefer", "allow" (all verified) or a tls options object.`,
  )
}

function readRootCert(path: string | undefined): ConnectionOptions {
  if (path === undefined || path === '' || path === 'system') return {}
  try {
    return { ca: readFileSync(path, 'utf8') }
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'unreadable'
    throw new DsqlConfigError(`Cannot read sslrootcert "${path}" (${code}): point it at a PEM file such as certs/AmazonRootCA1.pem.`)
  }
}

export function credentialsOption(o: DsqlOptions<Types>): Credentials | undefined {
  return o.customCredentialsProvider ?? o.credentials
}
