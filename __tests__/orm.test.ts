/**
 * samples/drizzle.ts and samples/kysely.ts against the suite's stand-in, as admin and as a
 * non-admin role, each run as a user runs it (ts-node in a child process: kysely-postgres-js is
 * an ES module, which jest's CommonJS runtime cannot require). The environment names the stand-in,
 * as `npx postgres-dsql local` would, so the samples take their CLUSTER_ENDPOINT path.
 */
import { execFile } from 'node:child_process'
import { join, resolve } from 'node:path'
import { target } from './helpers/target'

const root = resolve(__dirname, '..')

function runSample(file: string, user: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const t = target()
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    CLUSTER_ENDPOINT: t.host, CLUSTER_USER: user, PGHOSTADDR: t.hostaddr, PGPORT: String(t.port), PGSSLROOTCERT: t.caFile,
    AWS_ACCESS_KEY_ID: t.credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: t.credentials.secretAccessKey, AWS_REGION: t.region,
  }
  delete env.AWS_PROFILE
  delete env.AWS_SESSION_TOKEN
  return new Promise((done) => {
    execFile(process.execPath, ['-r', 'ts-node/register/transpile-only', join(root, 'samples', file)], { env, cwd: root, timeout: 90_000 }, (err, stdout, stderr) =>
      done({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    )
  })
}

const cases = ['admin', 'appuser'].flatMap((user) => [
  // Drizzle wraps the driver's error in a DrizzleQueryError: retryOcc finds the 40001 in its cause.
  ['drizzle', user, 'DrizzleQueryError wrapping PostgresError 40001'],
  ['kysely', user, 'PostgresError 40001'],
])

test.each(cases)('samples/%s.ts as %s: select, insert, schema by role, OCC conflict retried', async (name, user, conflict) => {
  const { code, stdout, stderr } = await runSample(`${name}.ts`, user)
  if (code !== 0) throw new Error(`samples/${name}.ts failed (exit ${code}):\n${stdout}${stderr}`)
  expect(stdout.trim().split('\n')).toEqual([
    `Connected as ${user}, schema ${user === 'admin' ? 'public' : 'myschema'}`,
    'Inserted and selected Rex (0 visits)',
    // The other writer's increment and the retried transaction's: neither is lost.
    `OCC conflict (${conflict}) retried: 2 attempts, 2 visits`,
    `${name}: ok`,
  ])
}, 120_000)
