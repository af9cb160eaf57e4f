/** Starts one local DSQL stand-in for the whole run; test files reach it through the environment. */
import { startLocalDsql, type LocalDsql } from '../../lib/local'

declare global {
  var __DSQL_LOCAL__: LocalDsql | undefined
}

export default async function globalSetup(): Promise<void> {
  // Tests never reach an instance metadata service: only loopback exists here.
  process.env.AWS_EC2_METADATA_DISABLED = 'true'
  const local = await startLocalDsql({ roles: ['appuser'] })
  globalThis.__DSQL_LOCAL__ = local
  process.env.DSQL_TEST_TARGET = JSON.stringify({
    host: local.host,
    hostaddr: local.hostaddr,
    port: local.port,
    region: local.region,
    caFile: local.caFile,
    ca: local.ca,
    credentials: local.credentials,
    iamArn: local.iamArn,
  })
}
