/**
 * Optimistic concurrency through the stand-in: conflicts arrive as DSQL's 40001 (OC000, OC001)
 * within milliseconds instead of lock waits, and `retry` on `sql.begin` turns them into exact
 * results. Each test uses its own table, so the suites sharing the stand-in never collide.
 */
import dsql, { DsqlRetryError, isOccError, type DsqlOptions } from '../lib'
import { connectOptions } from './helpers/target'

type Sql = ReturnType<typeof dsql>

// Setup drops tables that may not exist; their notices are expected, not worth printing.
const open = (extra: DsqlOptions = {}): Sql => dsql(connectOptions({ max: 8, onnotice: () => undefined, ...extra }))
/** One session: a pool of one connection, where postgres.js lets BEGIN and COMMIT be sent as queries. */
const session = (): Sql => dsql(connectOptions({ max: 1, onnotice: () => undefined }))
const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

async function withTable<T>(sql: Sql, name: string, run: () => Promise<T>): Promise<T> {
  await sql.unsafe(`drop table if exists ${name}`)
  await sql.unsafe(`create table ${name} (id int primary key, value int not null)`)
  await sql.unsafe(`insert into ${name} values (1, 0)`)
  try {
    return await run()
  } finally {
    await sql.unsafe(`drop table if exists ${name}`)
  }
}

test('N workers incrementing one counter with retry: exact total, and conflicts happened', async () => {
  const warnings: unknown[] = []
  const sql = open({ retry: { maxRetries: 100, baseDelayMs: 2, maxDelayMs: 50, deadlineMs: 60_000 }, logger: { warn: (_m, fields) => warnings.push(fields) } })
  try {
    await withTable(sql, 'occ_counter', async () => {
      const workers = 6
      const increments = 5
      // Every worker's first transaction reads before any writes: conflicts are certain, not likely.
      const read = new Set<number>()
      let allRead: () => void
      const everyoneRead = new Promise<void>((resolve) => (allRead = resolve))
      await Promise.all(
        Array.from({ length: workers }, async (_, worker) => {
          for (let i = 0; i < increments; i++) {
            await sql.begin(async (tx) => {
              const [{ value }] = await tx`select value from occ_counter where id = 1`
              if (read.add(worker).size === workers) allRead()
              // Widens the window between read and write, so that workers overlap.
              await Promise.all([everyoneRead, pause(3)])
              await tx`update occ_counter set value = ${value + 1} where id = 1`
            })
          }
        }),
      )
      const [{ value }] = await sql`select value from occ_counter where id = 1`
      expect(value).toBe(workers * increments)
      expect(warnings.length).toBeGreaterThan(0)
    })
  } finally {
    await sql.end()
  }
})

test('an error that is not a conflict is not retried', async () => {
  const sql = open({ retry: { maxRetries: 5, baseDelayMs: 1 } })
  try {
    let attempts = 0
    await expect(
      sql.begin(async (tx) => {
        attempts++
        await tx`select 1 / 0`
      }),
    ).rejects.toMatchObject({ code: '22012' })
    expect(attempts).toBe(1)

    attempts = 0
    const mine = new Error('application bug')
    await expect(
      sql.begin(async () => {
        attempts++
        throw mine
      }),
    ).rejects.toBe(mine)
    expect(attempts).toBe(1)
  } finally {
    await sql.end()
  }
})

test('exhausted attempts give DsqlRetryError with the last conflict as cause', async () => {
  const sql = open({ retry: { maxRetries: 2, baseDelayMs: 1, maxDelayMs: 5 } })
  const holder = session()
  try {
    await withTable(sql, 'occ_exhaust', async () => {
      // Another transaction holds the row for the whole test: every attempt conflicts.
      try {
        await holder`begin`
        await holder`update occ_exhaust set value = 100 where id = 1`
        let attempts = 0
        const err = await sql
          .begin(async (tx) => {
            attempts++
            await tx`update occ_exhaust set value = value + 1 where id = 1`
          })
          .catch((e: unknown) => e)
        expect(err).toBeInstanceOf(DsqlRetryError)
        expect((err as DsqlRetryError).attempts).toBe(3)
        expect(attempts).toBe(3)
        const cause = (err as Error).cause as { code?: string; message?: string }
        expect(cause).toMatchObject({ code: '40001' })
        expect(cause.message).toContain('(OC000)')
        expect(isOccError(cause)).toBe(true)
      } finally {
        await holder`rollback`
      }
    })
  } finally {
    await Promise.all([sql.end(), holder.end()])
  }
})

test('two sessions updating one row: the second gets 40001 (OC000) at once, not a lock wait', async () => {
  const sql = open()
  const [a, b] = [session(), session()]
  try {
    await withTable(sql, 'occ_pair', async () => {
      try {
        await a`begin`
        await b`begin`
        await a`update occ_pair set value = 1 where id = 1`
        const started = Date.now()
        const err = await b`update occ_pair set value = 2 where id = 1`.catch((e: unknown) => e)
        // A lock wait would last until the test's end; generous for a busy machine.
        expect(Date.now() - started).toBeLessThan(10_000)
        expect(err).toMatchObject({ code: '40001', message: 'change conflicts with another transaction (OC000)' })
        await b`rollback`
        await a`commit`
        const [{ value }] = await sql`select value from occ_pair where id = 1`
        expect(value).toBe(1)
      } finally {
        await Promise.all([a`rollback`, b`rollback`])
      }
    })
  } finally {
    await Promise.all([sql.end(), a.end(), b.end()])
  }
})

test('a schema change racing with a writer is OC001; SERIALIZABLE is refused as DSQL refuses it', async () => {
  const sql = open()
  const [a, b] = [session(), session()]
  try {
    await withTable(sql, 'occ_schema', async () => {
      try {
        await a`begin`
        await a`insert into occ_schema values (2, 2)`
        const err = await b`alter table occ_schema add column extra text`.catch((e: unknown) => e)
        expect(err).toMatchObject({ code: '40001' })
        expect((err as Error).message).toContain('(OC001)')
      } finally {
        await a`rollback`
      }
    })
    await expect(sql.unsafe('begin isolation level serializable')).rejects.toMatchObject({ code: '0A000', message: 'Unsupported isolation level: SERIALIZABLE' })
    await expect(sql.begin('isolation level serializable', (tx) => tx`select 1`)).rejects.toMatchObject({ code: '0A000' })
    const [{ transaction_isolation }] = await sql`show transaction_isolation`
    expect(transaction_isolation).toBe('repeatable read')
  } finally {
    await Promise.all([sql.end(), a.end(), b.end()])
  }
})
