/**
 * The product's own jest global setup (lib/jest/setup.ts, what `preset: 'postgres-dsql'` runs)
 * starts the stand-in with the options in package.json's "postgres-dsql" key, and exports to the
 * workers the environment a user's tests get; the helpers (helpers/target.ts) read only that.
 * On top, for this repository: every temporary folder of the run (tests', child processes', the
 * stand-in's) goes into one private TMPDIR that the global teardown removes, and any unhandled
 * error of any process fails the run.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import setup from '../../lib/jest/setup'
import { ERRORS_FILE_ENV, recordUnhandledErrors } from './unhandled'

declare global {
  var __DSQL_TEST_TMPDIR__: string | undefined
}

export default async function globalSetup(globalConfig: unknown, projectConfig: { rootDir: string }): Promise<void> {
  // Tests never reach an instance metadata service: only loopback exists here.
  process.env.AWS_EC2_METADATA_DISABLED = 'true'
  // Private (0700), as `mktemp -d` makes it: the stand-ins must cope with that when run as root.
  const runDir = mkdtempSync(join(tmpdir(), 'postgres-dsql-test-'))
  globalThis.__DSQL_TEST_TMPDIR__ = runDir
  process.env.TMPDIR = runDir
  process.env[ERRORS_FILE_ENV] = join(runDir, 'unhandled-errors.log')
  recordUnhandledErrors()
  // jest skips the global teardown when the setup fails: clean up here then.
  await setup(globalConfig, projectConfig).catch((err: unknown) => {
    rmSync(runDir, { recursive: true, force: true })
    throw err
  })
}
