import { DsqlSigner } from '@aws-sdk/dsql-signer'
import { defaultProvider } from '@aws-sdk/credential-provider-node'
import { memoizeIdentityProvider, isIdentityExpired, doesIdentityRequireRefresh } from '@smithy/core'
import type { AwsCredentialIdentity, AwsCredentialIdentityProvider } from '@smithy/types'
import type { Credentials, DsqlConfig } from './config'
import { DsqlCredentialsError } from './errors'

export type Mint = () => Promise<string>

/**
 * One provider per `dsql()` call, memoized the way SDK clients do it: resolved once, refreshed
 * shortly before an expiring identity (SSO, assumed role, container) runs out.
 */
export function credentialProvider(given: Credentials | undefined, profile: string | undefined): AwsCredentialIdentityProvider {
  if (given === undefined) return defaultProvider(profile ? { profile } : {})
  if (typeof given !== 'function') {
    const identity = given
    return async () => identity
  }
  return memoizeIdentityProvider(given, isIdentityExpired, doesIdentityRequireRefresh) as AwsCredentialIdentityProvider
}

/** Returns a function that mints a fresh token for the configured host and action. */
export function tokenMinter(config: DsqlConfig, credentials: AwsCredentialIdentityProvider): Mint {
  const signer = new DsqlSigner({
    hostname: config.host,
    region: config.region,
    credentials,
    expiresIn: config.tokenDurationSecs,
  })
  const sign = config.action === 'DbConnectAdmin' ? () => signer.getDbConnectAdminAuthToken() : () => signer.getDbConnectAuthToken()
  return async () => {
    await checkedCredentials(credentials)
    try {
      return await sign()
    } catch (err) {
      throw new DsqlCredentialsError(`Could not sign the DSQL token: ${describe(err)}.`, redacted(err))
    }
  }
}

async function checkedCredentials(provider: AwsCredentialIdentityProvider): Promise<AwsCredentialIdentity> {
  let identity: AwsCredentialIdentity
  try {
    identity = await provider()
  } catch (err) {
    throw new DsqlCredentialsError(
      `Could not get AWS credentials to sign the DSQL token: ${describe(err)}. ` +
        'Configure credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, `aws sso login`, an instance role) or pass `credentials`.',
      redacted(err),
    )
  }
  if (!identity || typeof identity.accessKeyId !== 'string' || typeof identity.secretAccessKey !== 'string')
    throw new DsqlCredentialsError('The credentials provider returned no accessKeyId/secretAccessKey.')
  if (identity.expiration && identity.expiration.getTime() <= Date.now())
    throw new DsqlCredentialsError(
      `The AWS credentials expired at ${identity.expiration.toISOString()}: refresh them (for SSO: \`aws sso login\`).`,
    )
  return identity
}

/** A provider's own message, without anything that looks like a key or token. */
function describe(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err)
  return message.replace(/[A-Za-z0-9/+=]{32,}/g, '[redacted]').slice(0, 500)
}

/** The provider's error as a cause, with its message redacted and nothing else of it kept. */
function redacted(err: unknown): Error {
  const copy = new Error(describe(err))
  copy.name = err instanceof Error ? err.name : 'Error'
  return copy
}
