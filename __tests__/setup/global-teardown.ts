import { rmSync } from 'node:fs'
import teardown from '../../lib/jest/teardown'
import { ERRORS_FILE_ENV, recordedErrors } from './unhandled'

export default async function globalTeardown(): Promise<void> {
  // The folder goes even when stopping the stand-in fails; then that failure is the one reported.
  const failure = await teardown().then(() => undefined, (err: unknown) => err)
  const errors = recordedErrors(process.env[ERRORS_FILE_ENV] ?? '')
  const runDir = globalThis.__DSQL_TEST_TMPDIR__
  if (runDir) rmSync(runDir, { recursive: true, force: true, maxRetries: 3 })
  if (failure) throw failure
  if (errors) throw new Error(`Unhandled errors during the run:\n${errors}`)
}
