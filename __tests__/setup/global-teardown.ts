import { rmSync } from 'node:fs'
import { ERRORS_FILE_ENV, recordedErrors } from './unhandled'

export default async function globalTeardown(): Promise<void> {
  await globalThis.__DSQL_LOCAL__?.stop()
  const errors = recordedErrors(process.env[ERRORS_FILE_ENV] ?? '')
  const runDir = globalThis.__DSQL_TEST_TMPDIR__
  if (runDir) rmSync(runDir, { recursive: true, force: true, maxRetries: 3 })
  if (errors) throw new Error(`Unhandled errors during the run:\n${errors}`)
}
