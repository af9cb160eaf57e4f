/** `globalTeardown: 'postgres-dsql/jest/teardown'`: stops the stand-in; no process or temp folder remains. */
import { takeStop } from './state'

export async function teardown(): Promise<void> {
  await takeStop()?.()
}

export default teardown
