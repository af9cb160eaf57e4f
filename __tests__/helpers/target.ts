import type { AwsCredentialIdentity } from '@smithy/types'
import type { DsqlOptions } from '../../lib'

export interface TestTarget {
  host: string
  hostaddr: string
  port: number
  region: string
  caFile: string
  ca: string
  credentials: AwsCredentialIdentity
  /** The IAM identity the stand-in's key pairs belong to (AWS IAM GRANT maps roles to it). */
  iamArn: string
}

/** The stand-in started by the global setup. */
export function target(): TestTarget {
  const raw = process.env.DSQL_TEST_TARGET
  if (!raw) throw new Error('DSQL_TEST_TARGET is not set: run the tests with `npm test` (jest global setup starts the stand-in)')
  return JSON.parse(raw) as TestTarget
}

/** Connector options that reach the stand-in as a user would: endpoint name, hostaddr, CA file. */
export function connectOptions(extra: DsqlOptions = {}): DsqlOptions {
  const t = target()
  return { host: t.host, hostaddr: t.hostaddr, port: t.port, sslrootcert: t.caFile, credentials: t.credentials, ...extra }
}
