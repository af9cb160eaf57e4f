import dsql, { isOccError, retryOcc, DsqlConfigError, DsqlRetryError } from '../lib'

const occ = (marker = 'OC000') => Object.assign(new Error(`change conflicts with another transaction, please retry: (${marker})`), { code: '40001' })

describe('isOccError', () => {
  test('SQLSTATE 40001 and the OC000/OC001 markers', () => {
    expect(isOccError(occ())).toBe(true)
    expect(isOccError(Object.assign(new Error('serialization failure'), { code: '40001' }))).toBe(true)
    expect(isOccError(new Error('schema has been updated by another transaction, please retry: (OC001)'))).toBe(true)
  })

  test('looks through cause chains, as ORMs wrap driver errors', () => {
    const wrapped = new Error('query failed', { cause: new Error('driver error', { cause: occ('OC001') }) })
    expect(isOccError(wrapped)).toBe(true)
  })

  test('everything else is not a conflict', () => {
    for (const e of [new Error('boom'), Object.assign(new Error('x'), { code: '23505' }), null, undefined, 'OC000?', 42, new Error('OC0001')])
      expect(isOccError(e)).toBe(false)
  })

  test('a cyclic cause chain ends', () => {
    const a: Error & { cause?: unknown } = new Error('a')
    a.cause = a
    expect(isOccError(a)).toBe(false)
  })
})

describe('retryOcc', () => {
  test('retries conflicts until success', async () => {
    let calls = 0
    const logged: unknown[] = []
    const result = await retryOcc(async () => (++calls < 4 ? Promise.reject(occ()) : 'done'), { baseDelayMs: 1 }, { warn: (m, f) => logged.push(f) })
    expect(result).toBe('done')
    expect(calls).toBe(4)
    expect(logged).toHaveLength(3)
  })

  test('any other error surfaces at once, unchanged', async () => {
    let calls = 0
    const error = Object.assign(new Error('duplicate key'), { code: '23505' })
    await expect(retryOcc(async () => { calls++; throw error }, { baseDelayMs: 1 })).rejects.toBe(error)
    expect(calls).toBe(1)
  })

  test('exhausted attempts give DsqlRetryError with the count and the last conflict as cause', async () => {
    let calls = 0
    const last = occ()
    const err = await retryOcc(async () => { calls++; throw last }, { maxRetries: 2, baseDelayMs: 1 }).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(DsqlRetryError)
    expect(err).toMatchObject({ attempts: 3, code: 'DSQL_OCC_RETRIES_EXHAUSTED', cause: last })
    expect((err as Error).message).toMatch(/after 3 attempts/)
    expect(calls).toBe(3)
    expect(isOccError(err)).toBe(false)
  })

  test('the deadline stops retries before maxRetries', async () => {
    let calls = 0
    const started = Date.now()
    const err = await retryOcc(async () => { calls++; throw occ() }, { maxRetries: 1000, baseDelayMs: 20, maxDelayMs: 20, jitterFactor: 0, deadlineMs: 100 }).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(DsqlRetryError)
    expect(calls).toBeLessThan(10)
    // Without the deadline: 1000 retries of 20 ms. Generous for a busy machine.
    expect(Date.now() - started).toBeLessThan(10_000)
  })

  test('backoff grows exponentially and is capped', async () => {
    const delays: number[] = []
    await retryOcc(async () => { if (delays.length < 6) throw occ(); return 1 }, { baseDelayMs: 2, maxDelayMs: 16, jitterFactor: 0 }, {
      warn: (_m, f) => delays.push((f as { delayMs: number }).delayMs),
    })
    expect(delays).toEqual([2, 4, 8, 16, 16, 16])
  })
})

describe('retry settings', () => {
  test('an undefined setting means its default, never unbounded', async () => {
    let calls = 0
    const always = async () => {
      calls++
      throw occ()
    }
    const err = await retryOcc(always, { maxRetries: undefined, baseDelayMs: 0, deadlineMs: undefined }).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(DsqlRetryError)
    expect(calls).toBe(11) // the first attempt and the default 10 retries
  })

  test("a call's own malformed settings reject with a DsqlConfigError before connecting", async () => {
    const sql = dsql({ host: 'abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws', credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'x' } })
    await expect(sql.begin(async () => 1, { maxRetries: '3' as never })).rejects.toThrow(DsqlConfigError)
    await expect(sql.begin(async () => 1, { maxRetries: '3' as never })).rejects.toThrow(/`retry.maxRetries` must be a number, 0 or more, not the string "3"/)
    await sql.end()
  })
})
