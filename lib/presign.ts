import { createHash, createHmac } from 'node:crypto'
import type { AwsCredentialIdentity } from '@smithy/types'

/** What a DSQL token signs; the same inputs as `DsqlSigner`. */
export interface PresignInput {
  host: string
  region: string
  action: 'DbConnect' | 'DbConnectAdmin'
  expiresIn: number
  credentials: AwsCredentialIdentity
  now?: Date
}

// SHA-256 of an empty body: a presigned GET signs no payload.
const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'

/**
 * A DSQL auth token: SigV4 query presign of `GET https://<host>/?Action=<action>`, service `dsql`,
 * signed header `host`, scheme stripped. Only `node:crypto`: loading the SDK's signer costs tens
 * of ms of a cold start. The tests hold it equal to `DsqlSigner`'s token, byte for byte.
 */
export function presignDsqlToken({ host, region, action, expiresIn, credentials, now = new Date() }: PresignInput): string {
  const longDate = now.toISOString().replace(/\.\d{3}Z$/, 'Z').replace(/[-:]/g, '')
  const shortDate = longDate.slice(0, 8)
  const scope = `${shortDate}/${region}/dsql/aws4_request`
  const query: Record<string, string> = {
    Action: action,
    'X-Amz-Algorithm': 'AWS4-HMAC-SHA256',
    'X-Amz-Credential': `${credentials.accessKeyId}/${scope}`,
    'X-Amz-Date': longDate,
    'X-Amz-Expires': String(expiresIn),
    'X-Amz-SignedHeaders': 'host',
  }
  if (credentials.sessionToken) query['X-Amz-Security-Token'] = credentials.sessionToken
  const canonicalQuery = queryString(query)
  const canonicalRequest = `GET\n/\n${canonicalQuery}\nhost:${host.trim().replace(/\s+/g, ' ')}\n\nhost\n${EMPTY_SHA256}`
  const stringToSign = `AWS4-HMAC-SHA256\n${longDate}\n${scope}\n${createHash('sha256').update(canonicalRequest).digest('hex')}`
  let key: Buffer = hmac(`AWS4${credentials.secretAccessKey}`, shortDate)
  for (const part of [region, 'dsql', 'aws4_request']) key = hmac(key, part)
  const signature = createHmac('sha256', key).update(stringToSign).digest('hex')
  return `${host}/?${queryString({ ...query, 'X-Amz-Signature': signature })}`
}

function hmac(key: string | Buffer, data: string): Buffer {
  return createHmac('sha256', key).update(data).digest()
}

/** SigV4's canonical query: keys sorted, RFC 3986 escaping (encodeURIComponent plus !'()*). */
function queryString(query: Record<string, string>): string {
  return Object.keys(query)
    .sort()
    .map((k) => `${escape(k)}=${escape(query[k])}`)
    .join('&')
}

function escape(value: string): string {
  return encodeURIComponent(value).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`)
}
