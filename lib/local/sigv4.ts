/**
 * Verifies a DSQL IAM token the way the service does: the token is a SigV4-presigned
 * `GET https://<host>/?Action=...` with the scheme stripped, and its signature is recomputed
 * with `@smithy/signature-v4` from the secret key of the access key id it names.
 *
 * Failures return a hint in the style of DSQL's (`Signature expired: ...`,
 * `Wrong user to action mapping. ...`). Hints name hosts, actions, regions and dates, never the
 * token, its signature, a secret key or a session token.
 */
import { createHash, timingSafeEqual } from 'node:crypto'
import { SignatureV4 } from '@smithy/signature-v4'
import { Sha256 } from '@smithy/core/checksum'
import type { AwsCredentialIdentity } from '@smithy/types'

export const SERVICE = 'dsql'
export const ADMIN_USER = 'admin'
const ALGORITHM = 'AWS4-HMAC-SHA256'
const MAX_EXPIRES_SECS = 604_800
/** How far in the future a token may be dated: AWS allows 15 minutes of clock skew. */
const MAX_SKEW_MS = 15 * 60 * 1000
const REQUIRED = [
  'Action',
  'X-Amz-Algorithm',
  'X-Amz-Credential',
  'X-Amz-Date',
  'X-Amz-Expires',
  'X-Amz-SignedHeaders',
  'X-Amz-Signature',
] as const

export type Verdict = { ok: true; accessKeyId: string; action: string } | { ok: false; hint: string }

export interface Expectation {
  /** Server name the client sent (SNI): the token must be signed for this host. */
  host: string
  user: string
  region: string
  now?: Date
}

/** The key pairs whose tokens are accepted, by access key id. */
export class Keyring {
  private readonly keys = new Map<string, AwsCredentialIdentity>()

  add(credentials: AwsCredentialIdentity): void {
    if (!credentials?.accessKeyId || !credentials.secretAccessKey) throw new TypeError('credentials need accessKeyId and secretAccessKey')
    const { accessKeyId, secretAccessKey, sessionToken } = credentials
    this.keys.set(accessKeyId, sessionToken ? { accessKeyId, secretAccessKey, sessionToken } : { accessKeyId, secretAccessKey })
  }

  get(accessKeyId: string): AwsCredentialIdentity | undefined {
    return this.keys.get(accessKeyId)
  }
}

export async function verifyToken(token: string, expect: Expectation, keys: Keyring): Promise<Verdict> {
  const parsed = parseToken(token)
  if (typeof parsed === 'string') return deny(parsed)
  const { host, query } = parsed
  if (host !== expect.host)
    return deny(`Token host does not match the endpoint: the token is for ${short(host)}, the connection is to ${expect.host}.`)

  const action = query.Action
  if (action !== 'DbConnect' && action !== 'DbConnectAdmin') return deny(`Unsupported action: ${short(action)}. Use DbConnect or DbConnectAdmin.`)
  if ((expect.user === ADMIN_USER) !== (action === 'DbConnectAdmin'))
    return deny(`Wrong user to action mapping. user: ${short(expect.user)}, action: ${action}`)
  if (query['X-Amz-Algorithm'] !== ALGORITHM) return deny(`Unsupported signing algorithm: expected ${ALGORITHM}.`)
  if (query['X-Amz-SignedHeaders'] !== 'host') return deny(`X-Amz-SignedHeaders must be 'host'.`)

  const scope = checkScope(query['X-Amz-Credential'], query['X-Amz-Date'], expect.region)
  if (typeof scope === 'string') return deny(scope)
  const expires = Number(query['X-Amz-Expires'])
  if (!/^\d+$/.test(query['X-Amz-Expires']) || expires < 1 || expires > MAX_EXPIRES_SECS)
    return deny(`X-Amz-Expires must be between 1 and ${MAX_EXPIRES_SECS} seconds.`)
  const timing = checkTime(scope.date, expires, expect.now ?? new Date())
  if (timing) return deny(timing)

  const credentials = keys.get(scope.accessKeyId)
  if (!credentials) return deny(`The AWS Access Key Id you provided does not exist in our records: ${short(scope.accessKeyId)}.`)
  const tokenCheck = checkSessionToken(credentials, query['X-Amz-Security-Token'])
  if (tokenCheck) return deny(tokenCheck)

  const expected = await sign(host, query, credentials, expect.region, scope.date, expires)
  if (!sameSecret(expected, query['X-Amz-Signature']))
    return deny('The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.')
  return { ok: true, accessKeyId: scope.accessKeyId, action }
}

/** `<host>/?a=b&c=d` into the host and the decoded query, or a hint saying what is wrong. */
function parseToken(token: string): { host: string; query: Record<string, string> } | string {
  const malformed = 'Malformed token: expected <cluster endpoint>/?Action=DbConnect|DbConnectAdmin&X-Amz-...'
  const slash = token.indexOf('/?')
  if (slash <= 0) return malformed
  const query: Record<string, string> = {}
  for (const pair of token.slice(slash + 2).split('&')) {
    const eq = pair.indexOf('=')
    if (eq <= 0) return malformed
    let key: string, value: string
    try {
      // Not URLSearchParams: it would turn '+' into a space, and SigV4 escapes '+' as %2B.
      key = decodeURIComponent(pair.slice(0, eq))
      value = decodeURIComponent(pair.slice(eq + 1))
    } catch {
      return malformed
    }
    if (key in query) return `Malformed token: parameter ${short(key)} appears twice.`
    query[key] = value
  }
  const missing = REQUIRED.filter((key) => !(key in query))
  if (missing.length) return `Malformed token: missing ${missing.join(', ')}.`
  return { host: token.slice(0, slash), query }
}

/** `<akid>/<yyyymmdd>/<region>/dsql/aws4_request`, consistent with X-Amz-Date. */
function checkScope(credential: string, amzDate: string, region: string): { accessKeyId: string; date: Date } | string {
  const parts = credential.split('/')
  if (parts.length !== 5 || !parts[0] || parts[4] !== 'aws4_request')
    return 'Malformed X-Amz-Credential: expected <access key id>/<yyyymmdd>/<region>/dsql/aws4_request.'
  const [accessKeyId, day, scopeRegion, service] = parts
  if (service !== SERVICE) return `Credential should be scoped to correct service: '${SERVICE}', not '${short(service)}'.`
  if (scopeRegion !== region) return `Credential should be scoped to a valid region, not '${short(scopeRegion)}'. This cluster is in '${region}'.`
  const match = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(amzDate)
  if (!match) return 'Malformed X-Amz-Date: expected yyyymmddThhmmssZ.'
  if (!amzDate.startsWith(day)) return `Date in Credential scope does not match the date of X-Amz-Date: '${short(day)}' != '${amzDate.slice(0, 8)}'.`
  const [, y, mo, d, h, mi, s] = match.map(Number)
  return { accessKeyId, date: new Date(Date.UTC(y, mo - 1, d, h, mi, s)) }
}

function checkTime(signed: Date, expiresSecs: number, now: Date): string | undefined {
  const expiry = new Date(signed.getTime() + expiresSecs * 1000)
  if (now.getTime() > expiry.getTime()) return `Signature expired: ${basic(expiry)} is now earlier than ${basic(now)}`
  const latest = new Date(now.getTime() + MAX_SKEW_MS)
  if (signed.getTime() > latest.getTime())
    return `Signature not yet current: ${basic(signed)} is still later than ${basic(latest)} (${basic(now)} + 15 min.)`
  return undefined
}

function checkSessionToken(credentials: AwsCredentialIdentity, given: string | undefined): string | undefined {
  const invalid = 'The security token included in the request is invalid.'
  if (credentials.sessionToken === undefined) {
    return given === undefined ? undefined : `${invalid} These credentials have no session token, but the token carries X-Amz-Security-Token.`
  }
  if (given === undefined) return `${invalid} X-Amz-Security-Token is missing: these are temporary credentials, sign with their session token.`
  return sameSecret(credentials.sessionToken, given) ? undefined : `${invalid} X-Amz-Security-Token does not match these credentials.`
}

/** The signature SigV4 gives for the same request, date and expiry: what the client should have sent. */
async function sign(
  host: string,
  query: Record<string, string>,
  credentials: AwsCredentialIdentity,
  region: string,
  signingDate: Date,
  expiresIn: number,
): Promise<string> {
  // presign adds the X-Amz-* parameters itself; every other one was signed as given.
  const rest = Object.fromEntries(Object.entries(query).filter(([key]) => !key.startsWith('X-Amz-')))
  const signer = new SignatureV4({ service: SERVICE, region, credentials, sha256: Sha256 })
  const presigned = await signer.presign(
    { method: 'GET', protocol: 'https:', hostname: host, path: '/', query: rest, headers: { host } },
    { signingDate, expiresIn },
  )
  return String(presigned.query?.['X-Amz-Signature'] ?? '')
}

/** Constant-time comparison of two secrets of any length (digests first, so lengths leak nothing). */
function sameSecret(a: string, b: string): boolean {
  const digest = (value: string) => createHash('sha256').update(value).digest()
  return timingSafeEqual(digest(a), digest(b))
}

/** A client-chosen value quoted in a hint: bounded, printable. */
function short(value: string): string {
  const printable = value.replace(/[^\x20-\x7e]/g, '?')
  return printable.length > 64 ? printable.slice(0, 64) + '...' : printable
}

function basic(date: Date): string {
  return date.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '')
}

const deny = (hint: string): Verdict => ({ ok: false, hint })
