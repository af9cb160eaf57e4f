// Replaces postgres.js's tests/test.js for scripts/postgres-js-suite.ts. Same t()/nt()/ot() API and
// the same check ([expected, got] must be ===), but every test runs even after one failed, and
// the outcome of each is written as JSON to SUITE_RESULTS instead of stopping at the first failure.
import { writeFileSync } from 'node:fs'
import { setTimeout, clearTimeout } from 'node:timers'
import util from 'node:util'
import { reset } from '../src/index.js'

const results = []
let registered = 0
let settled = 0
let current = null
let chain = reset()

export const nt = () => undefined
export const ot = (...rest) => t(...rest)
export const t = (...rest) => register(...rest)
t.timeout = 5

// A crash or an unhandled rejection is charged to the test that was running, and the run goes on.
for (const event of ['uncaughtException', 'unhandledRejection'])
  process.on(event, (err) => {
    const where = current ?? { name: '(between tests)', line: 0, crashes: [] }
    where.crashes = [...(where.crashes ?? []), `${event}: ${describe(err)}`]
    if (!current) results.push({ name: where.name, line: 0, status: 'crash', error: where.crashes.join('\n') })
  })

async function register(name, options, fn) {
  if (typeof options !== 'object') {
    fn = options
    options = {}
  }
  const line = Number(new Error().stack.split('\n')[3].match(':([0-9]+):')[1])
  registered++
  await 1
  chain = chain.then(() => run({ name, line, fn, timeout: (options.timeout || t.timeout) * 1000 }))
}

async function run(test) {
  const entry = { name: test.name, line: test.line, status: 'pass', crashes: [] }
  current = entry
  let timer
  try {
    const timeout = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error('Timed out')), test.timeout)))
    const x = await Promise.race([Promise.resolve().then(test.fn), timeout])
    if (!Array.isArray(x)) throw new Error('Test should return result array')
    const [expected, got] = await Promise.race([Promise.all(x), timeout])
    if (expected !== got) throw new Error(util.inspect(expected) + ' != ' + util.inspect(got))
  } catch (err) {
    entry.status = err instanceof Error && err.message === 'Timed out' ? 'timeout' : 'fail'
    entry.error = describe(err)
  } finally {
    clearTimeout(timer)
  }
  // Crashes reported during the test, or in the tick after it, make it fail.
  await new Promise((resolve) => setTimeout(resolve, 10))
  current = null
  if (entry.crashes.length) {
    entry.status = 'crash'
    entry.error = [entry.error, ...entry.crashes].filter(Boolean).join('\n')
  }
  delete entry.crashes
  results.push(entry)
  if (entry.status !== 'pass') await reset().catch((err) => process.stderr.write(`reset failed: ${describe(err)}\n`))
  process.stdout.write(entry.status === 'pass' ? '.' : 'x')
  if (++settled === registered) finish()
}

function finish() {
  writeFileSync(process.env.SUITE_RESULTS, JSON.stringify(results, null, 1))
  process.stdout.write('\n')
  // Some tests leave pools open on purpose; the results are written, so stop here.
  setTimeout(() => process.exit(0), 200)
}

function describe(err) {
  return (err instanceof Error ? `${err.name}: ${err.message}${err.code ? ` [${err.code}]` : ''}` : util.inspect(err)).slice(0, 500)
}
