// Stands in for postgres.js's src/index.js in its own test suite (scripts/postgres-js-suite.ts).
// Both modes point the suite at one local DSQL stand-in (a plain relay to PostgreSQL 16):
//   plain: postgres.js itself, TLS with SNI to the stand-in, the IAM token as its `pass`;
//   dsql:  postgres-dsql's dsql(), given the test's own options.
// The same mapping is applied in both, so that a test that differs differs because of dsql():
// localhost:5432 (or no host) is the stand-in, any other port stays a port on 127.0.0.1; the
// suite's test roles become admin and its database postgres (the stand-in has one of each).
import { createRequire } from 'node:module'
import { URLSearchParams } from 'node:url'

const require = createRequire(import.meta.url)
const postgres = require('postgres')
const target = JSON.parse(process.env.SUITE_TARGET)
const SUITE_ROLES = new Set([undefined, 'postgres_js_test', 'postgres_js_test_md5', 'postgres_js_test_scram'])

const { DsqlSigner } = require('@aws-sdk/dsql-signer')
const signer = new DsqlSigner({ hostname: target.host, region: target.region, credentials: target.credentials })
const token = () => signer.getDbConnectAdminAuthToken()
const dsql = target.mode === 'dsql' ? require(target.dsqlModule) : undefined

function wrapper(a, b) {
  const fromUrl = typeof a === 'string' ? parseUrl(a) : {}
  const given = { ...fromUrl, ...(typeof a === 'string' ? b : a) }
  const hosts = String(given.host ?? 'localhost').split(',')
  const ports = [given.port ?? 5432].flat().map(Number)
  const port = ports[0]
  const standIn = port === 5432 && hosts.every((h) => h === 'localhost' || h === '127.0.0.1')
  const o = { ...given }
  delete o.host
  delete o.hostname
  delete o.port
  delete o.url
  if (SUITE_ROLES.has(o.user ?? o.username)) {
    o.user = 'admin'
    delete o.username
  }
  o.database = 'postgres'
  delete o.db
  const address = { port: standIn ? target.port : port }
  if (target.mode === 'plain') {
    return postgres({
      ...o,
      host: hosts.length > 1 ? hosts.map(() => '127.0.0.1') : '127.0.0.1',
      port: hosts.length > 1 ? hosts.map((_, i) => (i === 0 ? address.port : (ports[i] ?? 5432))) : address.port,
      ssl: { ca: target.ca, servername: target.host },
      pass: token,
    })
  }
  delete o.pass
  delete o.password
  return dsql({
    ...o,
    host: hosts.length > 1 ? hosts.map(() => target.host) : target.host,
    hostaddr: '127.0.0.1',
    ...address,
    sslrootcert: target.caFile,
    credentials: target.credentials,
  })
}

/** The parts of a URL the suite uses; the rest goes through as options, as postgres.js does. */
function parseUrl(url) {
  const match = /^postgres(?:ql)?:\/\/(?:([^:@/]*)(?::([^@/]*))?@)?([^/?]*)(?:\/([^?]*))?(?:\?(.*))?$/.exec(url)
  if (!match) return {}
  const [, user, pass, hostPart, db, query] = match
  const hosts = hostPart.split(',').filter(Boolean)
  const o = Object.fromEntries(new URLSearchParams(query ?? ''))
  if (user) o.user = decodeURIComponent(user)
  if (pass) o.pass = decodeURIComponent(pass)
  if (db) o.db = decodeURIComponent(db)
  if (hosts.length) {
    o.host = hosts.map((h) => h.split(':')[0]).join(',')
    o.port = hosts.map((h) => Number(h.split(':')[1] ?? 5432))
    if (o.port.length === 1) o.port = o.port[0]
  }
  return o
}

/**
 * The suite assumes the state its previous tests left when they passed (its own runner stops at
 * the first failure): after a test that did not pass, the runner starts over from an empty
 * public schema, in both modes alike, through a plain connection.
 */
export async function reset() {
  const sql = postgres({ host: '127.0.0.1', port: target.port, database: 'postgres', user: 'admin', ssl: { ca: target.ca, servername: target.host }, pass: token, max: 1, onnotice: () => undefined })
  try {
    await sql.unsafe('drop schema if exists public cascade; create schema public')
  } finally {
    await sql.end({ timeout: 1 })
  }
}

export default Object.assign(wrapper, postgres)
