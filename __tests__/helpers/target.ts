import { readFileSync } from 'node:fs'
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

/**
 * The environment this worker got from the product's jest global setup (what a user's tests get),
 * as it was when the test file started: a test that changes process.env does not move the target.
 */
const exported = { ...process.env }
let cached: TestTarget | undefined

/** The stand-in started by the global setup, read from the variables it exported. */
export function target(): TestTarget {
  return (cached ??= fromEnvironment())
}

function fromEnvironment(): TestTarget {
  const get = (name: string): string => {
    const value = exported[name]
    if (!value) throw new Error(`${name} is not set: run the tests with \`npm test\` (jest's global setup, postgres-dsql's own, starts the stand-in)`)
    return value
  }
  const caFile = get('PGSSLROOTCERT')
  return {
    host: get('CLUSTER_ENDPOINT'),
    hostaddr: get('PGHOSTADDR'),
    port: Number(get('PGPORT')),
    region: get('AWS_REGION'),
    caFile,
    ca: readFileSync(caFile, 'utf8'),
    credentials: { accessKeyId: get('AWS_ACCESS_KEY_ID'), secretAccessKey: get('AWS_SECRET_ACCESS_KEY') },
    iamArn: get('POSTGRES_DSQL_IAM_ARN'),
  }
}

/** Connector options that reach the stand-in as a user would: endpoint name, hostaddr, CA file. */
export function connectOptions(extra: DsqlOptions = {}): DsqlOptions {
  const t = target()
  return { host: t.host, hostaddr: t.hostaddr, port: t.port, sslrootcert: t.caFile, credentials: t.credentials, ...extra }
}
