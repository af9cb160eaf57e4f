/**
 * Starts one local DSQL stand-in for the whole run; test files reach it through the environment.
 * Every temporary folder of the run (tests', child processes') goes into one private TMPDIR that
 * the global teardown removes, and any unhandled error of any process fails the run.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startLocalDsql, type LocalDsql } from '../../lib/local'
import { ERRORS_FILE_ENV, recordUnhandledErrors } from './unhandled'

declare global {
  var __DSQL_LOCAL__: LocalDsql | undefined
  var __DSQL_TEST_TMPDIR__: string | undefined
}

export default async function globalSetup(): Promise<void> {
  // Tests never reach an instance metadata service: only loopback exists here.
  process.env.AWS_EC2_METADATA_DISABLED = 'true'
  // Private (0700), as `mktemp -d` makes it: the stand-ins must cope with that when run as root.
  const runDir = mkdtempSync(join(tmpdir(), 'postgres-dsql-test-'))
  globalThis.__DSQL_TEST_TMPDIR__ = runDir
  process.env.TMPDIR = runDir
  process.env[ERRORS_FILE_ENV] = join(runDir, 'unhandled-errors.log')
  recordUnhandledErrors()
  // jest skips the global teardown when the setup fails: clean up here then.
  const local = await startLocalDsql({ roles: ['appuser'] }).catch((err: unknown) => {
    rmSync(runDir, { recursive: true, force: true })
    throw err
  })
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
