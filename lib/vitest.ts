/**
 * `globalSetup: 'postgres-dsql/vitest'`: one local DSQL stand-in for the whole run. Test files
 * reach it through the environment (`dsql()`) or `inject('postgresDsql')`.
 */
import { startTestDsql, type DsqlTestTarget } from './testing'

export type { DsqlTestOptions, DsqlTestTarget } from './testing'

/** What vitest passes to a global setup (its TestProject), as far as used here. */
export interface GlobalSetupContext {
  config: { root: string }
  provide(key: 'postgresDsql', value: DsqlTestTarget): void
}

export async function setup(project: GlobalSetupContext): Promise<() => Promise<void>> {
  const { target, stop } = await startTestDsql(project.config.root)
  project.provide('postgresDsql', target)
  return stop
}

export default setup
