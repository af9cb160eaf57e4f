/** Turns the measurements into Markdown (bench/results.md) and a bar chart (bench/connect.svg). */
import { readFileSync } from 'node:fs'
import * as os from 'node:os'
import type { Startup } from './standin'
import type { StormResult } from './storm'
import { median, percentile } from './util'

export interface ConnectRow {
  key: string
  label: string
  /** Round trips a connection needs by design, and what they are. */
  design: string
  /** Milliseconds per connection, by added latency. */
  samples: Map<number, number[]>
  /** Milliseconds per connection at the run's latency, against a server that leaves Nagle on. */
  nagle: number[]
}

export interface StormRow {
  label: string
  runs: (StormResult & { tokens: number })[]
}

export interface SteadyRow {
  key: string
  label: string
  queries: number
  ms: number
  cpuUs: number
  /** Queries per second in each round. */
  rounds: number[]
  /** Calls of the credentials provider, warm-up included. */
  resolutions: number
}

export interface CostRow {
  what: string
  us: number
  count: number
}

export interface Results {
  command: string
  n: number
  rttMs: number
  connect: ConnectRow[]
  storm: { size: number; latencyMs: number; rows: StormRow[] }
  steady: { pool: number; seconds: number; rounds: number; rows: SteadyRow[] }
  costs: CostRow[]
  startup: Startup
  /** Under bench/wan.py: every packet delayed (TCP's handshake and ACKs too), nothing at 0 ms. */
  wan?: boolean
}

/** The brief's floor: TLS 1.3 (1 RTT) + startup and auth (1) + query (1); TCP is on loopback. */
export const FLOOR_RTT = 3

/** The floor of a run: over bench/wan.py, TCP's handshake is a round trip too. */
const floorOf = (r: Results) => FLOOR_RTT + (r.wan ? 1 : 0)

const fmt = (x: number, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : 'n/a')
const table = (head: string[], rows: string[][]) =>
  [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i === 0 ? ' --- ' : ' ---: ')).join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n')

function machine(): string {
  let cpu = os.cpus()[0]?.model ?? 'unknown'
  try {
    cpu = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? cpu
  } catch {
    // not Linux: os.cpus() it is
  }
  const nproc = os.availableParallelism?.() ?? os.cpus().length
  const memory = `${Math.round(os.totalmem() / 2 ** 30)} GiB`
  return `${nproc} CPUs (nproc), ${cpu}, ${memory} RAM, ${os.type()} ${os.release()}, Node ${process.version}`
}

function connectSection(r: Results): string {
  const { rttMs } = r
  const FLOOR_RTT = floorOf(r)
  const rows = r.connect.map((c) => {
    const zero = c.samples.get(0) ?? []
    const slow = c.samples.get(rttMs) ?? []
    const rtt = median(slow) / rttMs
    const nagle = median(c.nagle) / rttMs
    return [
      c.label,
      fmt(median(zero)),
      fmt(percentile(zero, 95)),
      fmt(median(slow)),
      fmt(percentile(slow, 95)),
      fmt(rtt),
      `${rtt >= FLOOR_RTT ? '+' : ''}${fmt(rtt - FLOOR_RTT)}`,
      fmt(median(c.nagle)),
      fmt(nagle),
      c.design,
    ]
  })
  const head = ['contender', '0 ms: median', 'p95', `${rttMs} ms: median`, 'p95', 'RTTs (median)', `vs ${FLOOR_RTT}-RTT floor`, `${rttMs} ms, Nagle server: median`, 'RTTs', 'round trips by design']
  return [
    `## Connect: new client to first row of \`select 1\` (ms, N=${r.n} each, interleaved)`,
    '',
    table(head, rows),
    '',
    ...explainConnect(r).map((line) => `- ${line}`),
  ].join('\n')
}

/** Ratios against a server with TCP_NODELAY and one that leaves Nagle on, within this run. */
function nagleLine(r: Results): string {
  const m = (key: string, nagle: boolean) => {
    const row = r.connect.find((c) => c.key === key)
    return median((nagle ? row?.nagle : row?.samples.get(r.rttMs)) ?? [])
  }
  const ratios = (nagle: boolean) =>
    `postgres-dsql / by hand ${fmt(m('ours', nagle) / m('byhand', nagle), 2)}, / postgres.js direct TLS without type fetch ${fmt(m('ours', nagle) / m('byhand-tuned', nagle), 2)}`
  return (
    `Against a server that leaves Nagle's algorithm on (stand-in \`nagle: true\`; whether DSQL's front end sets TCP_NODELAY is not known): ${ratios(true)}; ` +
    `with TCP_NODELAY: ${ratios(false)}. A Nagle server holds a small write while its previous one is unacknowledged, and a client that has nothing to send ` +
    `acknowledges late (Linux: a delayed ACK of 40 ms or more). The stand-in's TLS 1.3 session tickets are such a write, just before the password request: ` +
    `a client that waits for that request waits for its own delayed ACK too. postgres-dsql sends the token with the StartupMessage (to a DSQL endpoint name, or one that asked for it before) ` +
    `and answers the tickets with a Flush, whose segment carries the ACK at once; postgres.js happens to send its StartupMessage only when the tickets arrive, ` +
    `a round trip later than it could, which carries the ACK too. The schema rides in the StartupMessage, so no SET reply is split from the first query's.`
  )
}

/** Where the round trips go, from differences between rows of the same run. */
function explainConnect(r: Results): string[] {
  const { rttMs } = r
  const FLOOR_RTT = floorOf(r)
  const rtt = (key: string) => median(r.connect.find((c) => c.key === key)?.samples.get(rttMs) ?? []) / rttMs
  const [ours, byHand, official, tuned, noSchema, floor, eager] = ['ours', 'byhand', 'official', 'byhand-tuned', 'ours-noschema', 'floor', 'floor-eager'].map(rtt)
  const faster = (other: number) => `${fmt((1 - ours / other) * 100, 0)}%`
  return [
    (r.wan
      ? `Floor: over the simulated WAN TCP's handshake costs a round trip, then TLS 1.3 (1 RTT), startup and authentication, and the query (1 RTT); every count below is one more than on loopback. `
      : `Floor: TCP is on loopback (the simulated latency applies only after accept), so what remains is TLS 1.3 (1 RTT), startup and authentication, and the query (1 RTT). `) +
      `The ${FLOOR_RTT}-RTT floor counts startup and authentication as one round trip: that holds only for a client that sends its token with the StartupMessage, ` +
      `before the server asks for it, as postgres-dsql does (row "token sent unasked": ${fmt(eager, 2)} RTT; the stand-in accepts it, a real DSQL endpoint is untested). ` +
      `A client that waits for the server's password request, as every driver does, needs one round trip more: the minimal wire client doing exactly that measured ${fmt(floor, 2)} RTT. ` +
      `The fraction above whole round trips is TLS, SigV4 and PostgreSQL back-end start-up CPU.`,
    `postgres-dsql: ${fmt(ours, 2)} RTT, ${fmt(ours - eager, 2)} above the unasked-token wire floor (${fmt(ours - floor, 2)} against the wire client that waits to be asked); ` +
      `${faster(byHand)} faster than postgres.js by hand and ${faster(official)} faster than the official pg connector at ${rttMs} ms. ` +
      `Direct TLS saves the SSLRequest round trip, the built-in array types save the pg_type fetch, and the schema rides in the StartupMessage: ` +
      `selecting it costs ${fmt(ours - noSchema, 2)} RTT (row "schema: false"). ` +
      `At 0 ms the connector's first bytes leave about a millisecond late: postgres.js opens every connection from a \`setTimeout(connect, 0)\` (≥ 1 ms in Node), which pg does not.`,
    `postgres.js by hand: the SSLRequest and the pg_type fetch cost ${fmt(byHand - tuned, 2)} RTT together ` +
      `(same driver with direct TLS and fetch_types: false: ${fmt(tuned, 2)} RTT, but then no schema is selected and arrays of built-in types are not parsed).`,
    `pg + official connector: ${fmt(official, 2)} RTT: pg sends an SSLRequest (1 RTT) and fetches no types; it selects no schema.`,
    nagleLine(r),
  ]
}

function stormSection(r: Results): string {
  const { size, latencyMs, rows } = r.storm
  const body = rows.map((row) => {
    const m = (f: (x: StormRow['runs'][number]) => number) => median(row.runs.map(f))
    const ok = row.runs.map((x) => x.ok)
    const errors = [...new Set(row.runs.map((x) => x.firstError).filter(Boolean))]
    return [
      row.label,
      `${Math.min(...ok)}/${size}${errors.length ? ` (${errors[0]})` : ''}`,
      fmt(m((x) => x.totalMs), 0),
      fmt(m((x) => x.peakRssMb), 0),
      fmt(m((x) => x.peakRssMb - x.baseRssMb), 0),
      fmt(m((x) => x.cpuMs), 0),
      fmt(m((x) => x.tokens), 0),
      fmt(m((x) => x.credentialResolutions), 0),
    ]
  })
  return [
    `## Connection storm: pool of ${size}, ${size} concurrent \`select 1\`, ${latencyMs} ms RTT (median of ${rows[0]?.runs.length ?? 0} runs, each in a fresh process)`,
    '',
    table(['contender', 'succeeded (worst run)', 'total ms', 'peak RSS MiB', 'RSS growth MiB', 'client CPU ms', 'tokens minted', 'credential resolutions'], body),
    '',
    '- Total: from issuing the queries to the last row. RSS: the storm process only (modules loaded and pool created before the baseline). ' +
      'Client CPU: user+system time of the storm process during the storm.',
    '- Tokens minted: sessions the stand-in authenticated during the storm. Credential resolutions: calls of the `async () => credentials` provider given to the contender.',
    `- Client CPU per connection: ${rows.map((row) => `${row.label} ${fmt(median(row.runs.map((x) => x.cpuMs)) / size, 2)} ms`).join(', ')}. ` +
      `${size} handshakes at once keep every CPU busy (client, gateway, ${size} PostgreSQL back-ends on ${os.availableParallelism?.() ?? os.cpus().length} CPUs), ` +
      'so the total follows CPU work more than round trips.',
  ].join('\n')
}

function steadySection(r: Results): string {
  const { pool, seconds, rounds, rows } = r.steady
  const qps = (row: SteadyRow) => row.queries / (row.ms / 1000)
  const base = rows.find((x) => x.key === 'byhand')
  const body = rows.map((row) => {
    const ratios = base ? row.rounds.map((q, i) => q / base.rounds[i]) : []
    return [
      row.label,
      fmt(qps(row), 0),
      base ? fmt(qps(row) / qps(base), 3) : 'n/a',
      ratios.length ? `${fmt(median(ratios), 3)} (${fmt(Math.min(...ratios), 2)} .. ${fmt(Math.max(...ratios), 2)})` : 'n/a',
      fmt(row.cpuUs / row.queries, 1),
      String(row.resolutions),
    ]
  })
  return [
    `## Steady state: warm pool of ${pool}, ${pool} workers, prepared \`select id, name from bench_items where id = $1\`, 0 ms RTT`,
    `(${seconds} s per contender in ${rounds} alternating rounds)`,
    '',
    table(['contender', 'queries/s', 'vs by hand (all rounds)', 'vs by hand per round: median (min .. max)', 'client CPU µs/query', 'credential resolutions'], body),
    '',
    '- Each round runs every contender back to back, in a rotating order; the per-round ratio compares neighbours in time.',
    '- Client CPU: user+system time of the bench process (the stand-in runs in another process) divided by queries.',
    '- Credential resolutions (warm-up included): the official `AuroraDSQLPool` overrides `connect()`, which `pool.query` calls, ' +
      'so it resolves credentials and signs a token for every query, even on a warm connection that never uses it.',
  ].join('\n')
}

function costSection(r: Results): string {
  return ['## Token and credential cost', '', table(['operation', 'µs each', 'iterations'], r.costs.map((c) => [c.what, fmt(c.us, 1), String(c.count)]))].join('\n')
}

function startupSection(r: Results): string {
  const { cold, warm } = r.startup
  return [
    '## Stand-in start-up (ms from the `startLocalDsql()` call)',
    '',
    table(
      ['start', 'resolved', 'first row of `select 1`'],
      [
        ['cold (first in process)', fmt(cold.readyMs, 0), fmt(cold.firstRowMs, 0)],
        ['warm (second in process)', fmt(warm.readyMs, 0), fmt(warm.firstRowMs, 0)],
      ],
    ),
  ].join('\n')
}

export function markdown(r: Results): string {
  return [
    '# postgres-dsql benchmark',
    '',
    `- Machine: ${machine()}`,
    `- Date: ${new Date().toISOString()}`,
    `- Command: \`${r.command}\``,
    '- Target: the local DSQL stand-in (`lib/local`, PostgreSQL 16 behind a TLS gateway that checks SigV4 tokens) in a child process, ' +
      (r.wan
        ? 'across a simulated WAN (bench/wan.py: two network namespaces joined by a link that delays every IP packet, ACKs included, by half the round trip). '
        : 'on loopback, with simulated round-trip latency on every byte after TCP accept (ACKs are not delayed: Nagle holds look a round trip shorter than over a network; bench/wan.py measures them faithfully). ') +
      'Every contender connects as `admin`. ' +
      'Ratios within one run are what count: the machine is shared and noisy.',
    '',
    connectSection(r),
    '',
    stormSection(r),
    '',
    steadySection(r),
    '',
    costSection(r),
    '',
    startupSection(r),
    '',
  ].join('\n')
}

const escape = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')

/** Horizontal bars: median connect time at the simulated RTT, p95 as a whisker, the floor as a line. */
export function connectSvg(r: Results): string {
  const { rttMs } = r
  const FLOOR_RTT = floorOf(r)
  const bars = r.connect.map((c) => {
    const samples = c.samples.get(rttMs) ?? []
    return { key: c.key, label: c.label, median: median(samples), p95: percentile(samples, 95) }
  }).filter((b) => Number.isFinite(b.median))
  const labelW = 360
  const plotW = 420
  const rightW = 170
  const barH = 22
  const gap = 10
  const top = 46
  const height = top + bars.length * (barH + gap) + 44
  const max = Math.max(FLOOR_RTT * rttMs, ...bars.map((b) => b.p95).filter(Number.isFinite)) * 1.1
  const x = (ms: number) => labelW + (ms / max) * plotW
  const colours: Record<string, string> = { ours: '#2e7d32', 'ours-noschema': '#81c784', floor: '#9e9e9e', 'floor-eager': '#bdbdbd', 'byhand-tuned': '#9fa8da' }
  const colour = (key: string) => colours[key] ?? '#3f51b5'
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${labelW + plotW + rightW}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    `<text x="10" y="20" font-size="14" font-weight="bold">New connection to first row of select 1, ${rttMs} ms RTT (median, p95 whisker; N=${r.n})</text>`,
  ]
  bars.forEach((b, i) => {
    const y = top + i * (barH + gap)
    out.push(
      `<text x="${labelW - 8}" y="${y + barH / 2 + 4}" text-anchor="end">${escape(b.label)}</text>`,
      `<rect x="${labelW}" y="${y}" width="${Math.max(0, x(b.median) - labelW).toFixed(1)}" height="${barH}" fill="${colour(b.key)}"/>`,
      `<line x1="${x(b.median).toFixed(1)}" x2="${x(b.p95).toFixed(1)}" y1="${y + barH / 2}" y2="${y + barH / 2}" stroke="#333"/>`,
      `<line x1="${x(b.p95).toFixed(1)}" x2="${x(b.p95).toFixed(1)}" y1="${y + 5}" y2="${y + barH - 5}" stroke="#333"/>`,
      `<text x="${(x(b.p95) + 6).toFixed(1)}" y="${y + barH / 2 + 4}">${fmt(b.median, 0)} ms (${fmt(b.median / rttMs)} RTT)</text>`,
    )
  })
  const floorX = x(FLOOR_RTT * rttMs).toFixed(1)
  const bottom = top + bars.length * (barH + gap)
  for (let ms = 50; ms < max && ms <= 50 * 40; ms += 50) {
    const tickX = x(ms).toFixed(1)
    out.push(`<line x1="${tickX}" x2="${tickX}" y1="${bottom - 4}" y2="${bottom}" stroke="#333"/>`, `<text x="${tickX}" y="${bottom + 30}" text-anchor="middle" fill="#555">${ms} ms</text>`)
  }
  out.push(
    `<line x1="${floorX}" x2="${floorX}" y1="${top - 6}" y2="${bottom}" stroke="#c62828" stroke-dasharray="4 3"/>`,
    `<text x="${floorX}" y="${bottom + 16}" text-anchor="middle" fill="#c62828">${FLOOR_RTT} RTT floor (${FLOOR_RTT * rttMs} ms)</text>`,
    `<line x1="${labelW}" x2="${labelW}" y1="${top - 6}" y2="${bottom}" stroke="#333"/>`,
    '</svg>',
    '',
  )
  return out.join('\n')
}
