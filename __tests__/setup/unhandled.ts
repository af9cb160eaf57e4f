/**
 * Any unhandled rejection or uncaught exception fails the run. jest-circus already fails the
 * running test on one; these listeners cover the rest of a process's life (a test file loading,
 * the time after its last test, an idle worker, the stand-in in jest's own process). Each error
 * is appended to a file that the global teardown turns into a failed run; the test environment
 * also fails the file during which it happened.
 */
import { appendFileSync, readFileSync } from 'node:fs'
import { inspect } from 'node:util'

export const ERRORS_FILE_ENV = 'DSQL_TEST_ERRORS_FILE'
const installed = Symbol.for('postgres-dsql.test.unhandled')

/** Errors recorded by this process so far. */
export const recorded: string[] = []

/** Installs the listeners once per process (circus removes them while a file's tests run and puts them back). */
export function recordUnhandledErrors(): void {
  const host = process as unknown as Record<symbol, boolean>
  if (host[installed]) return
  host[installed] = true
  const record = (kind: string) => (error: unknown) => {
    const entry = `${kind} in pid ${process.pid}: ${inspect(error)}`
    recorded.push(entry)
    process.stderr.write(`${entry}\n`)
    try {
      appendFileSync(process.env[ERRORS_FILE_ENV] ?? '', `${entry}\n\n`)
    } catch {
      process.exitCode = 1 // after the global teardown: too late to report, not to fail
    }
  }
  process.on('unhandledRejection', record('Unhandled rejection'))
  process.on('uncaughtException', record('Uncaught exception'))
}

/** What every process of the run recorded. */
export function recordedErrors(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim()
  } catch {
    return ''
  }
}
