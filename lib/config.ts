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
  /** Retries after the first attempt (default 5). */
  maxRetries?: number
  /** First backoff delay in ms (default 10). */
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
  /** Cluster endpoint `<id>.dsql.<region>.on.aws`, or a bare 26-character cluster id (default `PGHOST`). */
  host?: string
  /** Alias of `host`. */
  hostname?: string
  /** Default `PGPORT`, else 5432 (443 with `transport: 'websocket'`). */
  port?: number
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
  hostaddr?: string
  /** OCC retry for `sql.begin` (default off). */
  retry?: boolean | RetryOptions
  /** Connection events and retries. */
  logger?: DsqlLogger
  /** `tcp` (default): PostgreSQL over TLS. `websocket`: the protocol in WebSocket messages over `wss://host/` (port 443). */
  transport?: 'tcp' | 'websocket'
}

export type Action = 'DbConnect' | 'DbConnectAdmin'

/** Everything the connector needs, resolved and validated once per `dsql()` call. */
export interface DsqlConfig {
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
const CLUSTER_ID = /^[a-z0-9]{26}$/
const REGION = /^[a-z]{2}(?:-[a-z]+)+-\d+$/
const MAX_TOKEN_SECS = 604800

/** Options as given, with `url` folded in: the URL's values lose to explicit options, as in postgres.js. */
export function mergeUrl<T extends Types>(url: string | undefined, options: DsqlOptions<T>): DsqlOptions<T> {
  if (url === undefined) return options
  let parsed: URL
  try {
    parsed = new URL(url)
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
    host: parsed.hostname ? decodeURIComponent(parsed.hostname) : undefined,
    port: parsed.port ? Number(parsed.port) : undefined,
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

  const profile = o.profile ?? env.AWS_PROFILE
  const { host, clusterId, region } = resolveHost(o.host ?? o.hostname ?? env.PGHOST, o.region, env, profile)
  const user = o.user ?? o.username ?? 'admin'
  if (typeof user !== 'string' || !user) throw new DsqlConfigError('`user` must be a non-empty role name, e.g. "admin".')
  const database = o.database ?? o.db ?? 'postgres'
  const negotiation = o.sslnegotiation ?? env.PGSSLNEGOTIATION

  return {
    host,
    hostaddr: nonEmpty(o.hostaddr ?? env.PGHOSTADDR, 'hostaddr') ?? host,
    port: resolvePort(o.port ?? (env.PGPORT || (o.transport === 'websocket' ? 443 : undefined))),
    region,
    clusterId,
    user,
    database,
    action: user === 'admin' ? 'DbConnectAdmin' : 'DbConnect',
    schema: resolveSchema(o.schema, user),
    tokenDurationSecs: resolveDuration(o.tokenDurationSecs),
    sslnegotiation: resolveNegotiation(negotiation),
    directFallback: negotiation === undefined,
    tls: resolveTls(o.ssl, o.sslrootcert ?? env.PGSSLROOTCERT, host),
    connectTimeoutMs: resolveConnectTimeout(o.connect_timeout),
    transport: resolveTransport(o.transport),
  }
}

function passwordError(): DsqlConfigError {
  return new DsqlConfigError(
    'Do not pass a password: postgres-dsql mints a fresh IAM token for every connection. ' +
      'Remove `password`/`pass` and give AWS credentials instead (`credentials`, `profile`, or the default chain).',
  )
}

function resolveHost(given: string | undefined, optRegion: string | undefined, env: NodeJS.ProcessEnv, profile: string | undefined) {
  if (!given) throw new DsqlConfigError('No DSQL endpoint: pass `host` (e.g. "<cluster-id>.dsql.us-east-1.on.aws") or set PGHOST.')
  const host = given.trim().toLowerCase().replace(/\.$/, '')
  if (host.includes(',')) throw new DsqlConfigError(`Multiple hosts ("${given}") are not supported: a DSQL endpoint is one host name.`)
  if (host.includes('/') || host.includes(':'))
    throw new DsqlConfigError(`\`host\` must be a bare host name, not "${given}": give the port as \`port\` and a URL as the first argument.`)
  if (optRegion !== undefined && !REGION.test(optRegion))
    throw new DsqlConfigError(`\`region\` "${optRegion}" is not an AWS region name such as "us-east-1".`)

  const match = ENDPOINT.exec(host)
  if (match) {
    if (optRegion && optRegion !== match[2])
      throw new DsqlConfigError(`\`region\` "${optRegion}" contradicts the endpoint's region "${match[2]}": drop \`region\` or fix the host.`)
    return { host, clusterId: match[1], region: match[2] }
  }
  if (isIP(host))
    throw new DsqlConfigError(`\`host\` must be the cluster's endpoint name, not an address ("${given}"): put the address in \`hostaddr\`.`)
  const region = optRegion ?? envRegion(env, profile)
  if (!host.includes('.')) {
    if (!CLUSTER_ID.test(host))
      throw new DsqlConfigError(
        `"${given}" is neither a DSQL endpoint (<cluster-id>.dsql.<region>.on.aws) nor a cluster id (26 lowercase letters and digits).`,
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

/** postgres.js's `ssl` forms, mapped to node:tls options; everything verifies unless told not to. */
function resolveTls(ssl: SslOption, rootcert: string | undefined, host: string): ConnectionOptions {
  const base: ConnectionOptions = { servername: host, minVersion: 'TLSv1.2', ...readRootCert(rootcert) }
  if (ssl === false || ssl === 'disable' || ssl === 'false')
    throw new DsqlConfigError('DSQL requires TLS: remove `ssl: false` / `sslmode=disable` (TLS is verified by default).')
  if (ssl === undefined || ssl === true || ssl === 'true' || ssl === 'verify-full') return { ...base, rejectUnauthorized: true }
  if (ssl === 'verify-ca') return { ...base, rejectUnauthorized: true, checkServerIdentity: () => undefined }
  if (ssl === 'require' || ssl === 'allow' || ssl === 'prefer') return { ...base, rejectUnauthorized: false }
  if (typeof ssl === 'object' && ssl !== null) return { ...base, ...ssl }
  throw new DsqlConfigError(`\`ssl\` "${String(ssl)}" is not one of true, "verify-full", "verify-ca", "require" or a tls options object.`)
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
