/**
 * A throwaway PostgreSQL server: a fresh data directory per start, trust authentication,
 * reachable only through a Unix socket in a private directory (the gateway is the only way in
 * from the network), tuned to start fast rather than to be durable. Roles are set up like a new
 * DSQL cluster: `admin` owns the database and `public`, other login roles get `myschema`.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { chmodSync, chownSync, closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, realpathSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { blockedAt, findBinaries, type ProcessOwner } from './binaries'
import { startWatchdog } from './cleanup'
import type { Logger } from './logger'
import { parseErrorFields, queryMessage, quoteIdentifier, readMessage, startupMessage, terminateMessage } from './protocol'
import { ADMIN_USER } from './sigv4'

/** The initdb superuser: used for the bootstrap only, refused by the gateway. */
export const SUPERUSER = 'dsql_local_bootstrap'
export const DATABASE = 'postgres'
export const ROLE_SCHEMA = 'myschema'
/** Only names the socket file (.s.PGSQL.5432): the server listens on no TCP port. */
const SOCKET_PORT = 5432
const READY_TIMEOUT_MS = 30_000
const STOP_TIMEOUT_MS = 10_000

export interface PostgresOptions {
  /** A new empty directory from makeBaseDir() that this server may fill; removed by the caller. */
  baseDir: string
  roles: string[]
  logger: Logger
  /** PostgreSQL's max_connections; default 1000 (the gateway's own limit, default 10,000, is DSQL's). */
  maxConnections?: number
  /** More server settings (postgres -c), e.g. the dialect's limits. */
  settings?: Record<string, string | number>
  /** Run as the superuser after the roles are set up (the dialect's catalog objects). */
  setupSql?: string
  /** Longest wait for a lock, in ms, before the statement fails (DSQL never waits); default 5. */
  lockTimeoutMs?: number
}

export interface PostgresServer {
  readonly version: string
  readonly pid: number
  readonly socketDir: string
  /** A new connection to the server's Unix socket. */
  connect(): Socket
  /** Fast shutdown; resolves once the server process (and so every backend) has exited. */
  stop(): Promise<void>
  /** For process 'exit': no waiting possible, so an immediate shutdown signal. */
  stopNow(): void
}

export async function startPostgres(options: PostgresOptions): Promise<PostgresServer> {
  const { baseDir, logger } = options
  const owner = processOwner()
  const binaries = findBinaries(owner, logger, baseDir)
  // The server's own files, in a folder of their own: as root, owned by the user it runs as.
  const serverDir = join(baseDir, 'server')
  const dataDir = join(serverDir, 'data')
  const socketDir = join(serverDir, 'run')
  mkdirSync(socketDir, { recursive: true, mode: 0o700 })
  if (owner) for (const dir of [serverDir, socketDir]) chownSync(dir, owner.uid, owner.gid)

  await run(
    join(binaries.binDir, 'initdb'),
    ['-D', dataDir, '-U', SUPERUSER, '--auth=trust', '--encoding=UTF8', '--locale=C', '--no-sync', '--no-instructions'],
    owner,
    serverDir,
  )
  const logFile = join(serverDir, 'postgres.log')
  const settings = {
    max_connections: options.maxConnections ?? 1000,
    // DSQL takes no locks: where PostgreSQL would wait for another writer, fail within
    // milliseconds instead (the relay answers DSQL's 40001 OC000/OC001 for it).
    lock_timeout: `${options.lockTimeoutMs ?? 5}ms`,
    ...options.settings,
  }
  const child = spawnServer(binaries.binDir, dataDir, socketDir, logFile, owner, settings)
  const watchdog = startWatchdog(child.pid!, baseDir)
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  const server: PostgresServer = {
    version: binaries.version,
    pid: child.pid!,
    socketDir,
    connect: () => connect(join(socketDir, `.s.PGSQL.${SOCKET_PORT}`)),
    stop: async () => {
      await shutdown(child, exited)
      await watchdog.dismiss()
    },
    stopNow: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGQUIT')
    },
  }
  try {
    await waitUntilReady(child, dataDir, logFile)
    await runSql(server.connect(), SUPERUSER, bootstrapSql(options.roles))
    if (options.setupSql) await runSql(server.connect(), SUPERUSER, options.setupSql)
  } catch (err) {
    await server.stop()
    throw err
  }
  logger.debug?.(`postgres-dsql local: PostgreSQL ${binaries.version} (pid ${child.pid}) ready on ${socketDir}, log ${logFile}`)
  return server
}

/** When running as root, the unprivileged user to run PostgreSQL as (`nobody`). */
function processOwner(): ProcessOwner | undefined {
  if (process.geteuid?.() !== 0) return undefined
  return { uid: 65534, gid: 65534 }
}

/**
 * A new private directory for one server, in the temporary folder, or, as root, in a folder the
 * server's user can enter: a private TMPDIR (`mktemp -d`, under /root) would lock it out, and
 * /tmp is the usual way around. The directory itself is then 0711: enter, not list.
 */
export function makeBaseDir(parents = [tmpdir(), '/tmp', '/var/tmp', '/dev/shm']): string {
  const owner = processOwner()
  if (!owner) return mkdtempSync(join(parents[0], 'postgres-dsql-local-'))
  const blocked: string[] = []
  for (const parent of new Set(parents)) {
    const at = blockedAt(parent, owner)
    if (at) {
      blocked.push(`${parent} (${at} is closed to it)`)
      continue
    }
    try {
      // Its real path: the one whose folders were checked (TMPDIR may be a link).
      const dir = realpathSync(mkdtempSync(join(parent, 'postgres-dsql-local-')))
      chmodSync(dir, 0o711)
      return dir
    } catch (err) {
      blocked.push(`${parent} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)
    }
  }
  throw new Error(
    `postgres-dsql local: PostgreSQL refuses to run as root, so it runs as uid ${owner.uid}, and that user can enter ` +
      `no temporary folder: ${blocked.join(', ')}. Set TMPDIR to a folder every user can enter ` +
      '(e.g. `mkdir -m 1777 /var/tmp/dsql && TMPDIR=/var/tmp/dsql`), or run as a user other than root.',
  )
}

/** Environment for the server: ours, minus PG* variables that would redirect initdb or postgres. */
function serverEnv(): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('PG')))
  return { ...env, LC_ALL: 'C', TZ: 'UTC' }
}

function run(file: string, args: string[], owner: ProcessOwner | undefined, cwd: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd, env: serverEnv(), stdio: ['ignore', 'pipe', 'pipe'], ...owner })
    let output = ''
    const collect = (chunk: Buffer) => (output = (output + chunk.toString()).slice(-4000))
    child.stdout.on('data', collect)
    child.stderr.on('data', collect)
    child.once('error', reject)
    child.once('exit', (code, signal) =>
      code === 0 ? resolve() : reject(new Error(`${file} failed (${signal ?? `exit code ${code}`}):\n${output.trim()}`)),
    )
  })
}

function spawnServer(
  binDir: string,
  dataDir: string,
  socketDir: string,
  logFile: string,
  owner: ProcessOwner | undefined,
  extra: Record<string, string | number>,
): ChildProcess {
  const settings: Record<string, string | number> = {
    listen_addresses: '',
    unix_socket_directories: socketDir,
    unix_socket_permissions: '0700',
    // Throwaway data: durability costs start-up time and test time for nothing.
    fsync: 'off',
    synchronous_commit: 'off',
    full_page_writes: 'off',
    shared_buffers: '32MB',
    TimeZone: 'UTC',
    log_timezone: 'UTC',
    // DSQL's only isolation level: concurrent writers then fail with 40001, as under OCC.
    default_transaction_isolation: 'repeatable read',
    // With lock_timeout in milliseconds, autovacuum's table locks would fail users' DDL now and
    // then; DSQL has no vacuum to race with either.
    autovacuum: 'off',
    ...extra,
  }
  const args = ['-D', dataDir, '-p', String(SOCKET_PORT), ...Object.entries(settings).flatMap(([k, v]) => ['-c', `${k}=${v}`])]
  // The log goes to a file: no pipe that would keep the event loop alive or fill up unread.
  const log = openSync(logFile, 'a')
  try {
    // Detached: its own process group, so a Ctrl-C in the terminal reaches only us and we stop it.
    const child = spawn(join(binDir, 'postgres'), args, { env: serverEnv(), stdio: ['ignore', log, log], detached: true, ...owner })
    child.on('error', () => undefined)
    child.unref()
    return child
  } finally {
    closeSync(log)
  }
}

/** postmaster.pid's 8th line turns to "ready" once connections are accepted. */
async function waitUntilReady(child: ChildProcess, dataDir: string, logFile: string): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) {
      throw new Error(`PostgreSQL did not start:\n${tail(logFile)}`)
    }
    const status = readPidFile(dataDir)[7]?.trim()
    if (status === 'ready') return
    if (Date.now() > deadline) throw new Error(`PostgreSQL not ready after ${READY_TIMEOUT_MS} ms:\n${tail(logFile)}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

function readPidFile(dataDir: string): string[] {
  try {
    return readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')
  } catch {
    return []
  }
}

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-20).join('\n')
  } catch {
    return '(no log)'
  }
}

async function shutdown(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  child.ref() // keep the loop alive until the 'exit' we wait for
  child.kill('SIGINT') // fast shutdown: roll back open transactions, disconnect, exit
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS)
  await exited
  clearTimeout(timer)
}

/** DSQL's starting point: admin owns the database and `public`; each role can use `myschema`. */
function bootstrapSql(roles: string[]): string {
  const admin = quoteIdentifier(ADMIN_USER)
  const statements = [
    `CREATE ROLE ${admin} WITH LOGIN CREATEROLE`,
    `ALTER DATABASE ${DATABASE} OWNER TO ${admin}`,
    `ALTER SCHEMA public OWNER TO ${admin}`,
    // Made by admin, as on DSQL: admin owns myschema and administers the roles it created.
    `SET ROLE ${admin}`,
  ]
  if (roles.length) statements.push(`CREATE SCHEMA ${ROLE_SCHEMA}`)
  for (const role of roles) {
    statements.push(`CREATE ROLE ${quoteIdentifier(role)} WITH LOGIN`, `GRANT USAGE, CREATE ON SCHEMA ${ROLE_SCHEMA} TO ${quoteIdentifier(role)}`)
  }
  statements.push('RESET ROLE')
  return statements.join(';\n')
}

/** Runs one simple query (several statements) as `user` over a fresh connection; throws its error. */
async function runSql(socket: Socket, user: string, sql: string): Promise<void> {
  try {
    socket.write(startupMessage({ user, database: DATABASE, client_encoding: 'UTF8' }))
    await untilReady(socket)
    socket.write(queryMessage(sql))
    await untilReady(socket)
    socket.end(terminateMessage())
  } catch (err) {
    socket.destroy()
    throw err
  }
}

/** Reads up to ReadyForQuery; the first ErrorResponse on the way becomes the thrown error. */
async function untilReady(socket: Socket): Promise<void> {
  let error: Error | undefined
  for (;;) {
    const { type, body } = await readMessage(socket)
    if (type === 'E') {
      const fields = parseErrorFields(body)
      error ??= new Error(`PostgreSQL bootstrap failed: ${fields.M} (${fields.C})`)
      if (fields.S === 'FATAL') throw error
    }
    if (type === 'Z') {
      if (error) throw error
      return
    }
  }
}
