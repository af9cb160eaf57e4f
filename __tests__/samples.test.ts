/** Both samples against the stand-in, as admin and as a non-admin role (like test_example.py). */
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { example } from '../samples/example'
import { pool } from '../samples/pool'
import { connectOptions } from './helpers/target'

let logs: string[] = []
beforeEach(() => {
  logs = []
  jest.spyOn(console, 'log').mockImplementation((...args: unknown[]) => void logs.push(args.join(' ')))
})
afterEach(() => jest.restoreAllMocks())

test.each(['admin', 'appuser'])('samples/example.ts as %s', async (user) => {
  await example(connectOptions({ user }))
  expect(logs[0]).toBe(`Connected as ${user}, schema ${user === 'admin' ? 'public' : 'myschema'}`)
  expect(logs[1]).toMatch(/^Inserted and read back owner [0-9a-f-]{36}: John Doe, Anytown, 555-555-1999$/)
})

test.each(['admin', 'appuser'])('samples/pool.ts as %s', async (user) => {
  await pool(connectOptions({ user }))
  expect(logs).toEqual([
    '8 concurrent queries over the pool: 2, 4, 6, 8, 10, 12, 14, 16',
    expect.stringMatching(/^Reserved connection: backend \d+ for both statements$/),
    'Three concurrent transactions incremented the counter to 3',
  ])
})

test.each(['example', 'pool'])('samples/%s.ts run as a script ends its sql and exits by itself', async (name) => {
  // The environment jest's global setup (postgres-dsql's own) exported reaches the stand-in by itself.
  const env: NodeJS.ProcessEnv = { ...process.env, CLUSTER_USER: 'appuser' }
  const script = [join(__dirname, 'helpers', 'register-ts.js'), join(__dirname, '..', 'samples', `${name}.ts`)]
  // A script that forgot sql.end() would still be running when the timeout kills it (no exit code).
  const result = await new Promise<{ code: number | string | null; stdout: string }>((done) =>
    execFile(process.execPath, ['-r', ...script], { env, timeout: 60_000 }, (err, stdout) =>
      done({ code: err ? ((err as { code?: number | string }).code ?? null) : 0, stdout })),
  )
  expect(result).toEqual({ code: 0, stdout: expect.stringContaining(`${name}: ok`) })
}, 90_000)

test('samples/multi-region.ts: two stand-in Regions, one lost mid-way, ends and exits by itself', async () => {
  const env: NodeJS.ProcessEnv = { ...process.env }
  for (const name of ['CLUSTER_ENDPOINT', 'AWS_PROFILE', 'AWS_SESSION_TOKEN', 'PGHOST', 'PGHOSTADDR', 'PGPORT']) delete env[name]
  const script = [join(__dirname, 'helpers', 'register-ts.js'), join(__dirname, '..', 'samples', 'multi-region.ts')]
  const result = await new Promise<{ code: number | string | null; stdout: string }>((done) =>
    execFile(process.execPath, ['-r', ...script], { env, timeout: 90_000 }, (err, stdout) =>
      done({ code: err ? ((err as { code?: number | string }).code ?? null) : 0, stdout })),
  )
  expect(result.code).toBe(0)
  const lines = result.stdout.trim().split('\n')
  expect(lines[1]).toMatch(/^Connected to \w+\.dsql\.us-east-1\.on\.aws$/)
  expect(lines[2]).toMatch(/^After losing a Region: connected to \w+\.dsql\.us-east-2\.on\.aws$/)
  expect(lines[3]).toMatch(/^[12] orders, the same in every Region$/)
  expect(lines[4]).toBe('multi-region: ok')
}, 120_000)
