/**
 * Where the samples connect: the cluster named by CLUSTER_ENDPOINT (user CLUSTER_USER, default
 * admin, credentials from the AWS provider chain), or else a local DSQL stand-in started here.
 */
import type { DsqlOptions } from '../lib'
import { startLocalDsql } from '../lib/local'

export async function withTarget(run: (options: DsqlOptions) => Promise<void>): Promise<void> {
  const user = process.env.CLUSTER_USER || 'admin'
  const endpoint = process.env.CLUSTER_ENDPOINT
  if (endpoint) return run({ host: endpoint, user })

  const local = await startLocalDsql({ roles: user === 'admin' ? ['appuser'] : [user] })
  console.log(`No CLUSTER_ENDPOINT set: using a local DSQL stand-in (${local.host} on ${local.hostaddr}:${local.port}).`)
  try {
    await run({ host: local.host, hostaddr: local.hostaddr, port: local.port, sslrootcert: local.caFile, credentials: local.credentials, user })
  } finally {
    await local.stop()
  }
}
