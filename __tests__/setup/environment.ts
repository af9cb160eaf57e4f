/** Node's test environment, plus failing the file when an error goes unhandled outside its tests (see unhandled.ts). */
import type { EnvironmentContext, JestEnvironmentConfig } from '@jest/environment'
import { TestEnvironment } from 'jest-environment-node'
import { recorded, recordUnhandledErrors } from './unhandled'

export default class StrictEnvironment extends TestEnvironment {
  private readonly testPath: string
  private before = 0

  constructor(config: JestEnvironmentConfig, context: EnvironmentContext) {
    super(config, context)
    this.testPath = context.testPath
  }

  override async setup(): Promise<void> {
    recordUnhandledErrors()
    this.before = recorded.length
    await super.setup()
  }

  override async teardown(): Promise<void> {
    // One more turn of the event loop: a rejection left by the last test is reported on it.
    await new Promise((resolve) => setImmediate(resolve))
    await super.teardown()
    const errors = recorded.slice(this.before)
    if (errors.length) throw new Error(`${this.testPath}: unhandled errors outside its tests:\n${errors.join('\n')}`)
  }
}
