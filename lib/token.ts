import type { AwsCredentialIdentity, AwsCredentialIdentityProvider } from '@smithy/types'
import type { Credentials, DsqlConfig, DsqlLogger } from './config'
import { DsqlCredentialsError } from './errors'
import { presignDsqlToken } from './presign'

export type Mint = () => Promise<string>

/**
 * One provider per `dsql()` call, memoized the way SDK clients do it: resolved once, refreshed
 * shortly before an expiring identity (SSO, assumed role, container) runs out.
 */
export function credentialProvider(
  given: Credentials | undefined,
  profile: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
  logger?: DsqlLogger,
): AwsCredentialIdentityProvider {
  if (given === undefined) {
    // The chain's first source when no profile is named (as in Lambda): no SDK to load.
    if (!profile && env.AWS_ACCESS_KEY_ID && env.AWS_SECRET_ACCESS_KEY) return envProvider(env)
    return lazyDefaultChain(profile, logger)
  }
  if (typeof given !== 'function') {
    const identity = given
    return async () => identity
  }
  const { memoizeIdentityProvider, isIdentityExpired, doesIdentityRequireRefresh } = require('@smithy/core') as typeof import('@smithy/core')
  return memoizeIdentityProvider(given, isIdentityExpired, doesIdentityRequireRefresh) as AwsCredentialIdentityProvider
}

/** Providers that read the environment the way the SDK's `fromEnv` does: tokens are signed without the SDK. */
const fromEnvironment = new WeakSet<AwsCredentialIdentityProvider>()

/** The variables of the SDK's `fromEnv`, read at every call as it does. */
function envProvider(env: NodeJS.ProcessEnv): AwsCredentialIdentityProvider {
  const provider = async (): Promise<AwsCredentialIdentity> => {
    const { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey } = env
    if (!accessKeyId || !secretAccessKey) throw new Error('AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are no longer set')
    const expiry = env.AWS_CREDENTIAL_EXPIRATION
    return {
      accessKeyId,
      secretAccessKey,
      ...(env.AWS_SESSION_TOKEN ? { sessionToken: env.AWS_SESSION_TOKEN } : {}),
      ...(expiry ? { expiration: new Date(expiry) } : {}),
    }
  }
  fromEnvironment.add(provider)
  return provider
}

/** The SDK's Node chain, loaded on first use: a Lambda with environment keys never pays for it. */
function lazyDefaultChain(profile: string | undefined, logger: DsqlLogger | undefined): AwsCredentialIdentityProvider {
  let chain: AwsCredentialIdentityProvider | undefined
  return (params) => {
    if (!chain) {
      const { defaultProvider } = require('@aws-sdk/credential-provider-node') as typeof import('@aws-sdk/credential-provider-node')
      chain = defaultProvider({ ...(profile ? { profile } : {}), ...(logger ? { logger: sdkLogger(logger) } : {}) })
    }
    return chain(params)
  }
}

/** The SDK's own warnings (e.g. several credential sources set at once) go to the user's logger, redacted. */
function sdkLogger(logger: DsqlLogger) {
  const say = (level: 'warn' | 'error') => (...parts: unknown[]) => logger[level]?.(`dsql: AWS SDK: ${describe(parts.map(String).join(' '))}`)
  return { debug: () => undefined, info: () => undefined, warn: say('warn'), error: say('error') }
}

/** Returns a function that mints a fresh token for the configured host and action. */
export function tokenMinter(config: DsqlConfig, credentials: AwsCredentialIdentityProvider): Mint {
  const sign = fromEnvironment.has(credentials)
    ? (identity: AwsCredentialIdentity) =>
        presignDsqlToken({ host: config.host, region: config.region, action: config.action, expiresIn: config.tokenDurationSecs, credentials: identity })
    : sdkSigner(config, credentials)
  return async () => {
    const identity = await checkedCredentials(credentials)
    try {
      return await sign(identity)
    } catch (err) {
      throw new DsqlCredentialsError(`Could not sign the DSQL token: ${describe(err)}.`, redacted(err))
    }
  }
}

/** `@aws-sdk/dsql-signer`, loaded with the first token: every credential source but the environment. */
function sdkSigner(config: DsqlConfig, credentials: AwsCredentialIdentityProvider): (identity: AwsCredentialIdentity) => Promise<string> {
  let signer: import('@aws-sdk/dsql-signer').DsqlSigner | undefined
  return () => {
    if (!signer) {
      const { DsqlSigner } = require('@aws-sdk/dsql-signer') as typeof import('@aws-sdk/dsql-signer')
      signer = new DsqlSigner({ hostname: config.host, region: config.region, credentials, expiresIn: config.tokenDurationSecs })
    }
    return config.action === 'DbConnectAdmin' ? signer.getDbConnectAdminAuthToken() : signer.getDbConnectAuthToken()
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
