/**
 * `npm run bench:coldstart`: what an AWS Lambda cold start pays, from process start to the first
 * row. Each run is a fresh `node` process that loads a client, connects to the stand-in with
 * environment credentials (as Lambda provides them), runs `select 1` and exits. Contenders run
 * interleaved; medians of CPU (user + system, what a throttled cold start is made of) and wall.
 * Uses the built package (dist/), as a deployed function would: run `npm run build` first.
 *
 *   npm run bench:coldstart -- --runs 21 --latency 2
 */
import { execFile } from 'node:child_process'
import { existsSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { parseArgs } from 'node:util'
import { startStandIn, type Target } from './standin'
import { median } from './util'

const { values: args } = parseArgs({ options: { runs: { type: 'string', default: '21' }, latency: { type: 'string', default: '2' } } })
const RUNS = Number(args.runs)
const LATENCY = Number(args.latency)
const ROOT = join(__dirname, '..')
const DIST = join(ROOT, 'dist', 'index.js')

/** Each contender is the body of a fresh process; `done(rows)` reports CPU and exits. */
const CONTENDERS: Record<string, { label: string; body: string }> = {
  ours: {
    label: 'postgres-dsql (environment credentials)',
    body: `
      const dsql = require(${JSON.stringify(DIST)})
      const sql = dsql({ host: env.T_HOST, hostaddr: env.T_ADDR, port: +env.T_PORT, sslrootcert: env.T_CA, max: 1 })
      sql\`select 1 as one\`.then((rows) => done(rows, sql))`,
  },
  byhand: {
    label: 'postgres.js + DsqlSigner, default chain',
    body: `
      const postgres = require('postgres')
      const { DsqlSigner } = require('@aws-sdk/dsql-signer')
      const signer = new DsqlSigner({ hostname: env.T_HOST, region: env.T_REGION })
      const sql = postgres({ host: env.T_ADDR, port: +env.T_PORT, user: 'admin', database: 'postgres', max: 1,
        ssl: { ca: require('fs').readFileSync(env.T_CA, 'utf8'), servername: env.T_HOST },
        pass: () => signer.getDbConnectAdminAuthToken() })
      sql\`select 1 as one\`.then((rows) => done(rows, sql))`,
  },
  floor: {
    label: 'postgres.js, static password (floor)',
    body: `
      const postgres = require('postgres')
      const sql = postgres({ host: env.T_ADDR, port: +env.T_PORT, user: 'admin', database: 'postgres', max: 1,
        ssl: { ca: require('fs').readFileSync(env.T_CA, 'utf8'), servername: env.T_HOST }, pass: env.T_TOKEN })
      sql\`select 1 as one\`.then((rows) => done(rows, sql))`,
  },
}

const PRELUDE = `
  const env = process.env
  const done = async (rows, sql) => {
    if (rows[0].one !== 1) throw new Error('bad row')
    const { user, system } = process.cpuUsage()
    process.stdout.write(JSON.stringify({ cpuMs: (user + system) / 1000 }))
    await sql.end({ timeout: 1 })
  }
  process.on('unhandledRejection', (e) => { console.error(e); process.exit(1) })`

interface Sample {
  cpuMs: number
  wallMs: number
}

function runOnce(body: string, env: NodeJS.ProcessEnv): Promise<Sample> {
  const started = performance.now()
  return new Promise((resolve, reject) => {
    execFile(process.execPath, ['-e', PRELUDE + body], { cwd: ROOT, env, timeout: 60_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`${err.message}\n${stderr}`))
      resolve({ cpuMs: (JSON.parse(stdout) as { cpuMs: number }).cpuMs, wallMs: performance.now() - started })
    })
  })
}

async function freshToken(target: Target): Promise<string> {
  const { presignDsqlToken } = await import('../lib/presign')
  return presignDsqlToken({ host: target.host, region: target.region, action: 'DbConnectAdmin', expiresIn: 3600, credentials: target.credentials })
}

/**
 * What esbuild puts in a Lambda bundle of `import dsql from 'postgres-dsql'` with AWS CDK's
 * NodejsFunction defaults (the AWS SDK v3 is external: the runtime has it).
 */
async function bundleReport(): Promise<string> {
  const esbuild = await import('esbuild')
  const result = await esbuild.build({
    stdin: { contents: `import dsql from ${JSON.stringify(DIST)}; export const handler = () => dsql()`, resolveDir: ROOT },
    bundle: true, platform: 'node', target: 'node20', minify: true, write: false, metafile: true, external: ['@aws-sdk/*'], logLevel: 'silent',
  })
  const inputs = Object.keys(result.metafile.inputs)
  const ours = inputs.filter((f) => f.includes('dist/')).map((f) => f.slice(f.indexOf('dist/')))
  const packages = [...new Set(inputs.filter((f) => f.includes('node_modules/')).map((f) => f.split('node_modules/').pop()!.split('/').slice(0, 2).join('/')))]
  const bytes = result.outputFiles[0].contents.length
  return `esbuild bundle (CDK defaults, @aws-sdk/* external): ${(bytes / 1024).toFixed(0)} KiB; our files: ${ours.join(', ')}; packages: ${packages.join(', ')}.`
}

async function main(): Promise<void> {
  if (!existsSync(DIST)) throw new Error('dist/ is missing: run `npm run build` first')
  const standIn = await startStandIn()
  try {
    await standIn.setLatency(LATENCY)
    const t = standIn.target
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      AWS_ACCESS_KEY_ID: t.credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: t.credentials.secretAccessKey,
      AWS_REGION: t.region,
      AWS_EC2_METADATA_DISABLED: 'true',
      T_HOST: t.host, T_ADDR: t.hostaddr, T_PORT: String(t.port), T_CA: t.caFile, T_REGION: t.region,
      T_TOKEN: await freshToken(t),
    }
    const keys = Object.keys(CONTENDERS)
    const samples: Record<string, Sample[]> = Object.fromEntries(keys.map((k) => [k, []]))
    for (const k of keys) await runOnce(CONTENDERS[k].body, env) // warm the file cache
    for (let i = 0; i < RUNS; i++) {
      // Rotate the order each round: drift and warm-up fall on every contender alike.
      for (const k of keys.map((_, j) => keys[(i + j) % keys.length])) samples[k].push(await runOnce(CONTENDERS[k].body, env))
      process.stderr.write(`coldstart: round ${i + 1}/${RUNS}\n`)
    }
    const med = (k: string, f: keyof Sample) => median(samples[k].map((s) => s[f]))
    const above = (k: string) => med(k, 'cpuMs') - med('floor', 'cpuMs')
    const lines = [
      `Cold start to first row, ${RUNS} fresh processes each, interleaved, ${LATENCY} ms simulated RTT, node ${process.version}:`,
      '',
      '| client | CPU median | wall median |',
      '|---|---:|---:|',
      ...keys.map((k) => `| ${CONTENDERS[k].label} | ${med(k, 'cpuMs').toFixed(1)} ms | ${med(k, 'wallMs').toFixed(1)} ms |`),
      '',
      `CPU above the floor: ours ${above('ours').toFixed(1)} ms, by hand ${above('byhand').toFixed(1)} ms: ratio ${(above('ours') / above('byhand')).toFixed(2)} (target <= 0.5).`,
      `Wall: ours / by hand = ${(med('ours', 'wallMs') / med('byhand', 'wallMs')).toFixed(2)} (target <= 0.8); ` +
        `the floor / by hand = ${(med('floor', 'wallMs') / med('byhand', 'wallMs')).toFixed(2)}, ours / the floor = ${(med('ours', 'wallMs') / med('floor', 'wallMs')).toFixed(2)}.`,
    ]
    lines.push('', await bundleReport())
    console.log(lines.join('\n'))
    writeFileSync(join(__dirname, 'coldstart.md'), lines.join('\n') + '\n')
  } finally {
    await standIn.stop()
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
