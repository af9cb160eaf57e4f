/**
 * `npm run bench`: postgres-dsql against what a user would pick instead, side by side in one run,
 * through the local DSQL stand-in on loopback with simulated round-trip latency. Writes
 * bench/results.md and bench/connect.svg (under bench/wan.py: results-wan.md, connect-wan.svg).
 * Nothing here is a test: ratios within a run count.
 *
 *   npm run bench -- --n 50 --latency 20 --seconds 10 --rounds 20 --storm 200 --storm-rounds 3
 *   sudo python3 bench/wan.py --rtt 20 -- npm run bench -- --n 30    (packets delayed, ACKs too)
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { createSecureContext } from 'node:tls'
import { parseArgs } from 'node:util'
import { DsqlSigner } from '@aws-sdk/dsql-signer'
import { dsql } from '../lib'
import { resolveConfig } from '../lib/config'
import { credentialProvider, tokenMinter } from '../lib/token'
import { byHand, official, ours, variants, wireFloor, type Contender, type Pool } from './contenders'
import { connectSvg, markdown, type ConnectRow, type CostRow, type Results, type SteadyRow, type StormRow } from './report'
import { startStandIn, type StandIn, type Target } from './standin'
import { runStorm, stormContenders } from './storm'
import { sleep, withTimeout } from './util'

const { values: args } = parseArgs({
  options: {
    n: { type: 'string', default: '50' },
    latency: { type: 'string', default: '20' },
    seconds: { type: 'string', default: '10' },
    rounds: { type: 'string', default: '20' },
    storm: { type: 'string', default: '200' },
    'storm-rounds': { type: 'string', default: '3' },
  },
})
const N = positive('n')
/**
 * Under bench/wan.py the link delays every packet, ACKs included (faithful for Nagle and delayed
 * ACKs), and the stand-in adds none; its round trip replaces --latency, and nothing runs at 0 ms.
 */
const WAN_RTT = process.env.WAN_RTT_MS ? Number(process.env.WAN_RTT_MS) : undefined
const RTT = WAN_RTT ?? positive('latency')
/** What the stand-in adds on top of the network for a round trip of `ms`. */
const added = (ms: number) => (WAN_RTT === undefined ? ms : 0)
const SECONDS = positive('seconds')
const ROUNDS = positive('rounds')
const STORM = positive('storm')
const STORM_ROUNDS = positive('storm-rounds')

const OP_TIMEOUT_MS = 15_000
const POOL = 10
const ROWS = 100

function positive(name: keyof typeof args): number {
  const value = Number(args[name])
  if (!Number.isInteger(value) || value < 1) throw new Error(`--${name} must be a positive integer, got ${args[name]}`)
  return value
}

/** The `i`-th rotation of `list`: alternating the order cancels drift and warm-up effects. */
const rotate = <T>(list: T[], i: number) => list.map((_, j) => list[(i + j) % list.length])

const log = (message: string) => process.stderr.write(`bench: ${message}\n`)

/** Milliseconds from creating a client to the first row of `select 1`; the client is then closed. */
async function connectOnce(contender: Contender, target: Target): Promise<number> {
  const started = performance.now()
  const pool = contender.open(target, { max: 1 })
  try {
    await withTimeout(pool.selectOne(), OP_TIMEOUT_MS, `${contender.key} connect`)
    return performance.now() - started
  } finally {
    await withTimeout(pool.end(), OP_TIMEOUT_MS, `${contender.key} end`).catch(() => undefined)
  }
}

async function measureConnect(standIn: StandIn): Promise<ConnectRow[]> {
  const target = standIn.target
  const signer = new DsqlSigner({ hostname: target.host, region: target.region, credentials: target.credentials })
  const design: Record<string, string> = {
    ours: 'TLS 1 + startup with token 1 + query 1 = 3 (token unasked: a DSQL endpoint name; schema in the startup message)',
    byhand: 'SSLRequest 1 + TLS 1 + startup 1 + token 1 + pg_type fetch + query 1',
    official: 'SSLRequest 1 + TLS 1 + startup 1 + token 1 + query 1 = 5 (no schema selected)',
    'ours-noschema': 'TLS 1 + startup with token 1 + query 1 = 3',
    'byhand-tuned': 'TLS 1 + startup 1 + token 1 + query 1 = 4 (no schema, no array types)',
    'ours-websocket': 'TLS 1 + HTTP upgrade 1 + startup with token 1 + query 1 = 4',
    floor: 'TLS 1 + startup 1 + token 1 + query 1 = 4',
    'floor-eager': 'TLS 1 + startup with token 1 + query 1 = 3',
  }
  const entries = [
    ...[ours, byHand, official, ...variants].map((c) => ({ key: c.key, label: c.label, once: () => connectOnce(c, target) })),
    { key: 'floor', label: 'wire floor (minimal client, no driver)', once: () => timed(() => withTimeout(wireFloor(target, signer), OP_TIMEOUT_MS, 'floor')) },
    {
      key: 'floor-eager',
      label: 'wire floor, token sent unasked with startup',
      // A server may refuse a password it did not ask for: then this row reads n/a.
      once: () => timed(() => withTimeout(wireFloor(target, signer, true), OP_TIMEOUT_MS, 'floor')).catch(() => NaN),
    },
  ]
  const rows: ConnectRow[] = entries.map(({ key, label }) => ({ key, label, design: design[key], samples: new Map(), nagle: [] }))
  // Last, the same latency against a server that leaves Nagle's algorithm on (no TCP_NODELAY).
  const settings: [number, boolean][] = WAN_RTT === undefined ? [[0, false], [RTT, false], [RTT, true]] : [[RTT, false], [RTT, true]]
  for (const [latency, nagle] of settings) {
    await standIn.setLatency(added(latency), nagle)
    log(`connect at ${latency} ms${nagle ? ', Nagle server' : ''}: ${N} per contender`)
    for (const entry of entries) for (let i = 0; i < 3; i++) await entry.once() // warm-up: modules, JIT, TLS contexts
    const samples = entries.map(() => [] as number[])
    for (let i = 0; i < N; i++) for (const j of rotate([...entries.keys()], i)) samples[j].push(await entries[j].once())
    rows.forEach((row, j) => (nagle ? (row.nagle = samples[j]) : row.samples.set(latency, samples[j])))
  }
  await standIn.setLatency(0)
  return rows
}

async function timed(run: () => Promise<void>): Promise<number> {
  const started = performance.now()
  await run()
  return performance.now() - started
}

/** Waits (bounded) until the stand-in holds no client connection: the next measure starts clean. */
async function settle(standIn: StandIn): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if ((await standIn.stats()).open === 0) return
    await sleep(50)
  }
  log('warning: connections still open after 10 s')
}

async function measureStorm(standIn: StandIn): Promise<StormRow[]> {
  await standIn.setLatency(added(RTT))
  const rows: StormRow[] = stormContenders.map((c) => ({ label: c.label, runs: [] }))
  for (let round = 0; round < STORM_ROUNDS; round++) {
    for (const j of rotate([...stormContenders.keys()], round)) {
      const contender = stormContenders[j]
      log(`storm ${round + 1}/${STORM_ROUNDS}: ${contender.key}, ${STORM} connections`)
      await settle(standIn)
      const before = (await standIn.stats()).authenticated
      const result = await runStorm(contender, standIn.target, STORM)
      await settle(standIn)
      rows[j].runs.push({ ...result, tokens: (await standIn.stats()).authenticated - before })
    }
  }
  return rows
}

/** `POOL` workers run the prepared select back to back for `ms`; bounded in time and in count. */
async function drive(pool: Pool, ms: number): Promise<{ queries: number; ms: number; cpuUs: number }> {
  const deadline = performance.now() + ms
  const cpu = process.cpuUsage()
  const started = performance.now()
  let queries = 0
  const worker = async (w: number) => {
    for (let i = 0; i < 10_000_000 && performance.now() < deadline; i++) {
      await pool.byId(1 + ((w * 37 + i) % ROWS))
      queries++
    }
  }
  await withTimeout(Promise.all(Array.from({ length: POOL }, (_, w) => worker(w))), ms + OP_TIMEOUT_MS, 'steady state')
  const used = process.cpuUsage(cpu)
  return { queries, ms: performance.now() - started, cpuUs: used.user + used.system }
}

async function measureSteady(standIn: StandIn): Promise<SteadyRow[]> {
  await standIn.setLatency(0)
  const t = standIn.target
  const sql = dsql({ host: t.host, hostaddr: t.hostaddr, port: t.port, sslrootcert: t.caFile, credentials: t.credentials, max: 1 })
  try {
    await withTimeout(sql`create table if not exists bench_items (id integer primary key, name text not null)`, OP_TIMEOUT_MS, 'create table')
    await withTimeout(
      sql`insert into bench_items (id, name) select g, 'item ' || g from generate_series(1, ${ROWS}::int) g on conflict (id) do nothing`,
      OP_TIMEOUT_MS,
      'insert rows',
    )
  } finally {
    await sql.end({ timeout: 5 })
  }

  const contenders = [ours, byHand, official]
  const rows: SteadyRow[] = contenders.map((c) => ({ key: c.key, label: c.label, queries: 0, ms: 0, cpuUs: 0, rounds: [], resolutions: 0 }))
  // Counts credential resolutions: a connector that signs per query shows it here.
  const counted = (row: SteadyRow) => async () => {
    row.resolutions++
    return t.credentials
  }
  const pools = contenders.map((c, j) => c.open(t, { max: POOL, credentials: counted(rows[j]) }))
  try {
    log('steady state: warming the pools')
    for (const pool of pools) await drive(pool, 1000) // opens all connections, prepares the statement on each
    const roundMs = (SECONDS * 1000) / ROUNDS
    for (let round = 0; round < ROUNDS; round++) {
      log(`steady state: round ${round + 1}/${ROUNDS}`)
      for (const j of rotate([...pools.keys()], round)) {
        const got = await drive(pools[j], roundMs)
        rows[j].queries += got.queries
        rows[j].ms += got.ms
        rows[j].cpuUs += got.cpuUs
        rows[j].rounds[round] = got.queries / (got.ms / 1000)
      }
    }
  } finally {
    await Promise.all(pools.map((p) => withTimeout(p.end(), OP_TIMEOUT_MS, 'pool end').catch(() => undefined)))
  }
  return rows
}

/** Microseconds per call of `run`, at most `count` calls and about `maxMs`. */
async function cost(what: string, count: number, maxMs: number, run: () => Promise<unknown>): Promise<CostRow> {
  for (let i = 0; i < Math.min(50, count); i++) await run() // warm-up
  const deadline = performance.now() + maxMs
  const started = performance.now()
  let done = 0
  while (done < count && performance.now() < deadline) {
    await run()
    done++
  }
  return { what, us: ((performance.now() - started) * 1000) / done, count: done }
}

async function measureCosts(target: Target): Promise<CostRow[]> {
  log('token and credential cost')
  const { host, region, credentials } = target
  const signer = new DsqlSigner({ hostname: host, region, credentials })
  const config = resolveConfig({ host, hostaddr: target.hostaddr, port: target.port, sslrootcert: target.caFile, user: 'admin' })
  const mint = tokenMinter(config, credentialProvider(async () => credentials, undefined))
  const rows = [
    await cost('token: DsqlSigner, one signer reused', 5000, 3000, () => signer.getDbConnectAdminAuthToken()),
    await cost('token: new DsqlSigner per token (by hand; the official connector does the same)', 5000, 3000, () =>
      new DsqlSigner({ hostname: host, region, credentials }).getDbConnectAdminAuthToken(),
    ),
    await cost('token: postgres-dsql minter (memoized provider + signer)', 5000, 3000, mint),
    await cost('credentials: postgres-dsql provider, later calls (memoized)', 20_000, 1000, (() => {
      const provider = credentialProvider(async () => credentials, undefined)
      return () => provider()
    })()),
  ]
  // What each dsql() call does once: build the Node provider chain and resolve it (here from env keys).
  const keys = ['AWS_PROFILE', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_EC2_METADATA_DISABLED']
  const saved = keys.map((key) => [key, process.env[key]] as const)
  try {
    keys.forEach((key) => delete process.env[key])
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: credentials.secretAccessKey, AWS_EC2_METADATA_DISABLED: 'true' })
    rows.push(await cost('credentials: dsql() default chain, first resolution (env keys)', 2000, 3000, () => credentialProvider(undefined, undefined)()))
  } finally {
    for (const [key, value] of saved) if (value === undefined) delete process.env[key]
    else process.env[key] = value
  }
  // Last: thousands of native contexts leave garbage that would slow whatever runs next.
  rows.push(await cost('TLS: tls.createSecureContext({ ca }), built for each connection by every contender', 2000, 2000, async () => createSecureContext({ ca: target.ca })))
  return rows
}

async function main(): Promise<void> {
  const command = `${WAN_RTT === undefined ? '' : `python3 bench/wan.py --rtt ${WAN_RTT} -- `}ts-node bench/bench.ts ${process.argv.slice(2).join(' ')}`.trim()
  log('starting the stand-in (cold, then warm)')
  const standIn = await startStandIn()
  let results: Results
  try {
    const connect = await measureConnect(standIn)
    const storm = await measureStorm(standIn)
    const steady = await measureSteady(standIn)
    const costs = await measureCosts(standIn.target)
    results = {
      command,
      n: N,
      rttMs: RTT,
      connect,
      storm: { size: STORM, latencyMs: RTT, rows: storm },
      steady: { pool: POOL, seconds: SECONDS, rounds: ROUNDS, rows: steady },
      costs,
      startup: standIn.startup,
      wan: WAN_RTT !== undefined,
    }
  } finally {
    await standIn.stop()
  }
  const text = markdown(results)
  // Under wan.py, beside the default run's files: both are worth keeping.
  const [md, svg] = WAN_RTT === undefined ? ['results.md', 'connect.svg'] : ['results-wan.md', 'connect-wan.svg']
  writeFileSync(join(__dirname, md), text)
  writeFileSync(join(__dirname, svg), connectSvg(results))
  process.stdout.write(text)
  log(`wrote bench/${md} and bench/${svg}`)
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
