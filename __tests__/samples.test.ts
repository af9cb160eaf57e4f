/** Both samples against the stand-in, as admin and as a non-admin role (like test_example.py). */
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
