/**
 * The stand-in's control connection to PostgreSQL (as the bootstrap superuser): it runs DSQL's
 * asynchronous jobs to their end and changes the catalog quotas at run time.
 *
 * A job (catalog.ts) starts `submitted`; the runner marks it `processing` at once and finishes
 * it no sooner than `minMs` after it was submitted, and never while held: a test holds the jobs
 * to look at an unfinished index as long as it likes, then releases them. Finishing an index
 * build is a REINDEX, which makes the index valid and ready, or fails on duplicate keys: the job
 * then ends `failed` with PostgreSQL's words in `details`.
 */
import type { Socket } from 'node:net'
import postgres from 'postgres'
import { quotasSql, type CatalogQuotas } from './catalog'
import type { Logger } from './logger'

interface Pending {
  job_id: string
  status: string
  index_name: string | null
  table_name: string | null
  failure: string | null
  age_ms: number
}

/** How often unfinished jobs are looked at while there are any. */
const TICK_MS = 20
/** The runner's wait for the index's own lock (held by queries being planned): short, and retried. */
const LOCK_TIMEOUT = '50ms'

export class Control {
  private readonly sql: postgres.Sql
  private held = false
  private timer: NodeJS.Timeout | undefined
  private running: Promise<void> | undefined
  private stopped = false

  constructor(
    connect: () => Socket,
    user: string,
    private minMs: number,
    private readonly logger: Logger,
  ) {
    // postgres.js over the server's Unix socket; `socket` is not in its typings.
    const options = { socket: () => connect(), ssl: false, user, database: 'postgres', max: 1, fetch_types: false, onnotice: () => undefined, idle_timeout: 0 }
    this.sql = postgres(options as postgres.Options<Record<string, never>>)
  }

  async start(): Promise<void> {
    // A job submitted (committed) wakes the runner; the timer covers the minimum time after.
    await this.sql.listen('dsql_local_jobs', () => this.wake())
    this.wake()
  }

  setMinMs(ms: number): void {
    this.minMs = ms
    this.wake()
  }

  hold(): void {
    this.held = true
  }

  release(): void {
    this.held = false
    this.wake()
  }

  async setQuotas(quotas: CatalogQuotas): Promise<void> {
    await this.sql.unsafe(quotasSql(quotas))
  }

  async stop(): Promise<void> {
    this.stopped = true
    clearTimeout(this.timer)
    await this.running?.catch(() => undefined)
    await this.sql.end({ timeout: 1 })
  }

  private wake(): void {
    if (this.stopped || this.running) return
    clearTimeout(this.timer)
    this.running = this.tick()
      .catch((err: Error) => {
        if (!this.stopped) this.logger.warn?.(`postgres-dsql local: job runner: ${err.message}`)
        return true
      })
      .then((again) => {
        this.running = undefined
        if (again && !this.stopped) {
          this.timer = setTimeout(() => this.wake(), TICK_MS)
          this.timer.unref()
        }
      })
  }

  /** One look at the unfinished jobs; true while some remain. */
  private async tick(): Promise<boolean> {
    const jobs = await this.sql<Pending[]>`
      SELECT j.job_id, j.status, w.failure, i.indexrelid::regclass::text AS index_name, i.indrelid::regclass::text AS table_name,
        (extract(epoch FROM clock_timestamp() - j.start_time) * 1000)::float8 AS age_ms
      FROM sys.jobs j JOIN dsql_local.job_work w USING (job_id) LEFT JOIN pg_index i ON i.indexrelid = w.index_oid
      WHERE j.status IN ('submitted', 'processing')`
    for (const job of jobs) {
      if (job.status === 'submitted') await this.setStatus(job.job_id, 'processing', null)
      if (this.held || job.age_ms < this.minMs) continue
      await this.finish(job)
    }
    return jobs.length > 0
  }

  private async finish(job: Pending): Promise<void> {
    if (job.failure !== null) return this.setStatus(job.job_id, 'failed', job.failure)
    if (job.index_name === null || job.table_name === null) return this.setStatus(job.job_id, 'failed', 'the index was dropped before it was built')
    try {
      await this.sql.begin(async (tx) => {
        await tx.unsafe(`SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`)
        // NOWAIT: a writer's open transaction makes the runner try again later, rather than queue
        // in front of every other writer of the table (who would then fail their lock_timeout).
        await tx.unsafe(`LOCK TABLE ${job.table_name} IN SHARE MODE NOWAIT`)
        await tx.unsafe(`REINDEX INDEX ${job.index_name}`)
        await tx`UPDATE sys.jobs SET status = 'completed', update_time = clock_timestamp() WHERE job_id = ${job.job_id}`
      })
    } catch (err) {
      const code = (err as { code?: string }).code
      // The table is in use: the next tick tries again.
      if (code === '55P03' || code === '40P01') return
      const e = err as { message: string; detail?: string }
      await this.setStatus(job.job_id, 'failed', `${e.message}${e.detail ? ` ${e.detail}` : ''}`)
    }
  }

  private async setStatus(id: string, status: string, details: string | null): Promise<void> {
    await this.sql`UPDATE sys.jobs SET status = ${status}, details = ${details}, update_time = clock_timestamp() WHERE job_id = ${id}`
  }
}
