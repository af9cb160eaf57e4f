/**
 * `globalSetup: 'postgres-dsql/jest/setup'` (or `preset: 'postgres-dsql'`): one local DSQL
 * stand-in for the whole run, options from the project's postgres-dsql.config.* or package.json.
 */
import { startTestDsql } from '../testing'
import { keepStop, takeStop } from './state'

export async function setup(_globalConfig: unknown, projectConfig: { rootDir: string }): Promise<void> {
  // Watch mode runs the setup again: never leave a previous stand-in running.
  await takeStop()?.()
  const { stop } = await startTestDsql(projectConfig.rootDir)
  keepStop(stop)
}

export default setup
