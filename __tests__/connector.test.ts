/** The connector against the local stand-in: real TLS, real SigV4 tokens, real PostgreSQL. */
import * as tls from 'node:tls'
import * as net from 'node:net'
import { inspect } from 'node:util'
import postgres from 'postgres'
import selfsigned from 'selfsigned'
import dsql, { DsqlConnectionError, DsqlCredentialsError, DsqlTlsError, DsqlTokenError, isOccError, type DsqlOptions } from '../lib'
import { connectOptions, target } from './helpers/target'

const secrets = () => [target().credentials.secretAccessKey]

function noSecretIn(value: unknown) {
  const text = inspect(value, { depth: 8, showHidden: true }) + String((value as Error)?.stack ?? '')
  for (const s of secrets()) expect(text).not.toContain(s)
  expect(text).not.toMatch(/X-Amz-Signature=[0-9a-f]/)
  expect(text).not.toMatch(/X-Amz-Security-Token=/)
}

async function using<R>(options: DsqlOptions, run: (sql: ReturnType<typeof dsql>) => Promise<R>): Promise<R> {
  const sql = dsql(connectOptions(options))
  try {
    return await run(sql)
  } finally {
    await sql.end({ timeout: 2 })
  }
}

describe('connecting', () => {
  test('admin: DbConnectAdmin token, schema public, postgres database, application_name', async () => {
    const [row] = await using({}, (sql) => sql`select current_user, current_schema(), current_database(), current_setting('application_name') as app`)
    expect(row).toEqual({ current_user: 'admin', current_schema: 'public', current_database: 'postgres', app: expect.stringMatching(/^postgres-dsql\//) })
  })

  test('a non-admin role: DbConnect token and myschema, selected before the first query', async () => {
    await using({ user: 'appuser' }, async (sql) => {
      const [row] = await sql`select current_user, current_schema()`
      expect(row).toEqual({ current_user: 'appuser', current_schema: 'myschema' })
      await sql`create table if not exists connector_probe (id int primary key)`
      const [{ schemaname }] = await sql`select schemaname from pg_tables where tablename = 'connector_probe'`
      expect(schemaname).toBe('myschema')
      await sql`drop table connector_probe`
    })
  })

  test('every new connection selects the schema, whatever its first statement is', async () => {
    await using({ user: 'appuser', max: 4 }, async (sql) => {
      const first = await Promise.all([
        sql`select current_schema() as s, pg_backend_pid() as pid`,
        sql.begin((tx) => tx`select current_schema() as s, pg_backend_pid() as pid`),
        sql.reserve().then(async (r) => { const rows = await r`select current_schema() as s, pg_backend_pid() as pid`; r.release(); return rows }),
        sql.unsafe('select current_schema() as s, pg_backend_pid() as pid'),
      ])
      const rows = first.map(([row]) => row)
      expect(new Set(rows.map((r) => r.pid)).size).toBeGreaterThan(1)
      expect(rows.map((r) => r.s)).toEqual(['myschema', 'myschema', 'myschema', 'myschema'])
    })
  })

  test('sql.reserve() and sql.begin() as the very first call on an empty pool', async () => {
    const [reserved] = await using({ max: 1, user: 'appuser' }, async (sql) => {
      const c = await sql.reserve()
      try {
        return await c`select current_schema() as s`
      } finally {
        c.release()
      }
    })
    expect(reserved.s).toBe('myschema')
    const [begun] = await using({ max: 1, user: 'appuser' }, (sql) => sql.begin((tx) => tx`select current_schema() as s`))
    expect(begun.s).toBe('myschema')
  })

  test('schema: a chosen schema, or false for the server default', async () => {
    expect((await using({ schema: 'pg_catalog' }, (sql) => sql`select current_schema()`))[0].current_schema).toBe('pg_catalog')
    const [row] = await using({ user: 'appuser', schema: false }, (sql) => sql`select current_setting('search_path') as path`)
    expect(row.path).toBe('"$user", public')
  })

  test('sslnegotiation postgres (SSLRequest first) works too', async () => {
    const [row] = await using({ sslnegotiation: 'postgres' }, (sql) => sql`select 1 as one`)
    expect(row.one).toBe(1)
  })

  test('onconnect runs once per new connection, after the schema, before the first query', async () => {
    const seen: string[] = []
    await using(
      {
        user: 'appuser', max: 3,
        onconnect: async (session) => {
          const [row] = await session.query('select current_schema() as s')
          seen.push(row.s ?? 'null')
          await session.query("set time zone 'Asia/Tokyo'")
        },
      },
      async (sql) => {
        const rows = await Promise.all([1, 2, 3, 4, 5, 6].map(() => sql`select current_setting('TimeZone') as t`))
        expect(rows.map(([r]) => r.t)).toEqual(Array(6).fill('Asia/Tokyo'))
      },
    )
    expect(seen).toEqual(['myschema', 'myschema', 'myschema'])
  })

  test('an onconnect that fails rejects the query with its error, and the pool goes on', async () => {
    let calls = 0
    await using({ max: 1, onconnect: async (s) => { if (++calls === 1) await s.query('select nonsense_column') } }, async (sql) => {
      await expect(sql`select 1`).rejects.toThrow(/nonsense_column/)
      const [row] = await sql`select 2 as two`
      expect(row.two).toBe(2)
    })
  })

  test('an onconnect that throws its own error: the query rejects naming it, with the error as cause', async () => {
    const mine = new Error('feature flags unavailable')
    await using({ onconnect: () => Promise.reject(mine) }, async (sql) => {
      const err = await sql`select 1`.catch((e: unknown) => e)
      expect(err).toBeInstanceOf(DsqlConnectionError)
      expect(err).toMatchObject({ message: 'onconnect failed: feature flags unavailable', cause: mine })
    })
  })

  test('arrays parse and serialise without a pg_type fetch', async () => {
    await using({}, async (sql) => {
      const [row] = await sql`select ${[1, 2, 3]}::int[] as ints, array['a', 'b,c', 'x"y']::text[] as texts,
        array[1.5, 2.25]::float8[] as floats, array['2024-01-02T03:04:05Z']::timestamptz[] as times,
        array[true, false]::bool[] as bools, array['{"a":1}']::jsonb[] as docs, ${['x', 'y']}::text[] as echoed`
      expect(row.ints).toEqual([1, 2, 3])
      expect(row.texts).toEqual(['a', 'b,c', 'x"y'])
      expect(row.floats).toEqual([1.5, 2.25])
      expect(row.times[0]).toEqual(new Date('2024-01-02T03:04:05Z'))
      expect(row.bools).toEqual([true, false])
      expect(row.docs).toEqual([{ a: 1 }])
      expect(row.echoed).toEqual(['x', 'y'])
      const [{ n }] = await sql`select count(*)::int as n from pg_stat_activity where query like '%typarray%' and pid <> pg_backend_pid()`
      expect(n).toBe(0)
    })
  })

  test('a cancelled query ends with 57014', async () => {
    await using({}, async (sql) => {
      const query = sql`select pg_sleep(10)`
      setTimeout(() => query.cancel(), 200)
      const started = Date.now()
      await expect(query).rejects.toMatchObject({ code: '57014' })
      expect(Date.now() - started).toBeLessThan(5000)
    })
  })

  test('credentials are resolved once per dsql(), not per connection', async () => {
    let calls = 0
    const credentials = async () => (calls++, target().credentials)
    await using({ credentials, max: 5 }, (sql) => Promise.all([1, 2, 3, 4, 5].map(() => sql`select pg_sleep(0.05)`)))
    expect(calls).toBe(1)
  })
})

describe('failures are typed, fast, and lose nothing', () => {
  test('a provider that throws: DsqlCredentialsError, no unhandled rejection, no lost pool slot, next query tries again', async () => {
    const unhandled: unknown[] = []
    const onUnhandled = (e: unknown) => unhandled.push(e)
    process.on('unhandledRejection', onUnhandled)
    let calls = 0
    const credentials = async () => {
      if (++calls <= 3) throw new Error('The SSO session associated with this profile has expired')
      return target().credentials
    }
    try {
      await using({ credentials, max: 1 }, async (sql) => {
        for (let i = 0; i < 3; i++) {
          const started = Date.now()
          const err = await sql`select 1`.catch((e: unknown) => e)
          expect(err).toBeInstanceOf(DsqlCredentialsError)
          expect((err as Error).message).toMatch(/SSO session .* expired.*Configure credentials/s)
          expect(Date.now() - started).toBeLessThan(2000)
        }
        const [row] = await sql`select 42 as answer`
        expect(row.answer).toBe(42)
      })
      await new Promise((r) => setTimeout(r, 50))
      expect(unhandled).toEqual([])
    } finally {
      process.off('unhandledRejection', onUnhandled)
    }
  })

  test('no credentials anywhere in the default chain: DsqlCredentialsError, fast', async () => {
    const saved = { ...process.env }
    for (const k of Object.keys(process.env)) if (k.startsWith('AWS_') && k !== 'AWS_EC2_METADATA_DISABLED') delete process.env[k]
    Object.assign(process.env, { AWS_SHARED_CREDENTIALS_FILE: '/nonexistent/credentials', AWS_CONFIG_FILE: '/nonexistent/config', AWS_EC2_METADATA_DISABLED: 'true' })
    try {
      const options = connectOptions()
      delete options.credentials
      const sql = dsql(options)
      const started = Date.now()
      const err = await sql`select 1`.catch((e: unknown) => e)
      await sql.end()
      expect(err).toBeInstanceOf(DsqlCredentialsError)
      expect((err as Error).message).toMatch(/Could not get AWS credentials.*Configure credentials/s)
      expect(Date.now() - started).toBeLessThan(2000)
    } finally {
      process.env = saved
    }
  })

  test('expired credentials are named as such', async () => {
    const credentials = { ...target().credentials, expiration: new Date(Date.now() - 60_000) }
    await using({ credentials }, async (sql) => {
      await expect(sql`select 1`).rejects.toThrow(/credentials expired at .*aws sso login/)
    })
  })

  test('a token the service refuses: DsqlTokenError with its hint, and no secret anywhere', async () => {
    const credentials = { accessKeyId: 'AKIAUNKNOWNKEY000000', secretAccessKey: 'notTheRightSecretKeyAtAll0000000000000000', sessionToken: 'SessionTokenThatMustNotLeak0000000000000000' }
    const logged: unknown[] = []
    const logger = { debug: (...a: unknown[]) => logged.push(a), warn: (...a: unknown[]) => logged.push(a), error: (...a: unknown[]) => logged.push(a) }
    const sql = dsql(connectOptions({ credentials, logger }))
    const err = await sql`select 1`.catch((e: unknown) => e)
    await sql.end()
    expect(err).toBeInstanceOf(DsqlTokenError)
    expect(err).toMatchObject({ code: 'DSQL_TOKEN_REJECTED', sqlstate: '08006' })
    expect((err as Error).message).toMatch(/rejected the IAM token for user "admin": unable to accept connection, access denied/)
    for (const v of [err, logged, sql.options]) {
      const text = inspect(v, { depth: 8, showHidden: true }) + String((v as Error)?.stack ?? '')
      for (const s of [credentials.secretAccessKey, credentials.sessionToken]) expect(text).not.toContain(s)
      expect(text).not.toMatch(/X-Amz-Signature=|X-Amz-Security-Token=/)
    }
  })

  test('a certificate that does not verify: DsqlTlsError, and not one byte of the token sent', async () => {
    const pems = await selfsigned.generate([{ name: 'commonName', value: target().host }], { keySize: 2048, extensions: [{ name: 'subjectAltName', altNames: [{ type: 2, value: target().host }] }] } as never)
    let received = 0
    const server = tls.createServer({ key: pems.private, cert: pems.cert, ALPNProtocols: ['postgresql'] }, (s) => {
      s.on('data', (d) => (received += d.length))
      s.on('error', () => undefined)
    })
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
    const port = (server.address() as net.AddressInfo).port
    try {
      const sql = dsql(connectOptions({ port, connect_timeout: 3 }))
      const started = Date.now()
      const err = await sql`select 1`.catch((e: unknown) => e)
      await sql.end()
      expect(err).toBeInstanceOf(DsqlTlsError)
      expect((err as Error).message).toMatch(/did not verify .*sslrootcert.*No token was sent/)
      expect(Date.now() - started).toBeLessThan(2000)
      expect(received).toBe(0)
    } finally {
      server.close()
    }
  })

  test('the stand-in CA verifies only for the right host name', async () => {
    const sql = dsql(connectOptions({ ssl: { servername: 'other.example.com' } }))
    await expect(sql`select 1`).rejects.toBeInstanceOf(DsqlTlsError)
    await sql.end()
  })

  test('a server that is down: DsqlConnectionError within connect_timeout', async () => {
    const probe = net.createServer()
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r))
    const port = (probe.address() as net.AddressInfo).port
    await new Promise((r) => probe.close(r))
    const sql = dsql(connectOptions({ port, connect_timeout: 1 }))
    const started = Date.now()
    const err = await sql`select 1`.catch((e: unknown) => e)
    await sql.end()
    expect(err).toBeInstanceOf(DsqlConnectionError)
    expect(err).toMatchObject({ code: 'ECONNREFUSED', message: expect.stringMatching(/Connection refused by 127\.0\.0\.1:\d+ .*ECONNREFUSED/) })
    expect(Date.now() - started).toBeLessThan(2500)
  })

  test('secrets never reach sql.options', async () => {
    const sql = dsql(connectOptions())
    await sql`select 1`
    noSecretIn(sql.options)
    await sql.end()
  })
})

describe('credentials sources', () => {
  test('a named profile is really used, ahead of environment keys', async () => {
    const { mkdtempSync, writeFileSync } = await import('node:fs')
    const { join } = await import('node:path')
    const { tmpdir } = await import('node:os')
    const dir = mkdtempSync(join(tmpdir(), 'aws-profile-'))
    const t = target()
    writeFileSync(join(dir, 'credentials'), `[work]\naws_access_key_id = ${t.credentials.accessKeyId}\naws_secret_access_key = ${t.credentials.secretAccessKey}\n`)
    writeFileSync(join(dir, 'config'), '[profile work]\nregion = us-east-1\n')
    const saved = { ...process.env }
    Object.assign(process.env, {
      AWS_SHARED_CREDENTIALS_FILE: join(dir, 'credentials'), AWS_CONFIG_FILE: join(dir, 'config'),
      AWS_ACCESS_KEY_ID: 'AKIAENVIRONMENTKEY00', AWS_SECRET_ACCESS_KEY: 'environmentSecretThatTheStandInDoesNotKnow00',
    })
    try {
      // The SDK warns about two credential sources set at once: to the logger, when there is one.
      const warned: string[] = []
      const options = connectOptions({ profile: 'work', logger: { warn: (m) => void warned.push(m) } })
      delete options.credentials
      const sql = dsql(options)
      const [row] = await sql`select current_user`
      expect(row.current_user).toBe('admin')
      await sql.end()
      expect(warned.some((w) => /AWS SDK: [\s\S]*Multiple credential sources/.test(w))).toBe(true)
      for (const w of warned) expect(w).not.toContain('environmentSecretThatTheStandInDoesNotKnow00')
      const withoutProfile = connectOptions()
      delete withoutProfile.credentials
      const other = dsql(withoutProfile)
      await expect(other`select 1`).rejects.toBeInstanceOf(DsqlTokenError)
      await other.end()
    } finally {
      process.env = saved
    }
  })
})

test('custom types flow through to the sql type, as with postgres.js', async () => {
  const sql = dsql({ ...connectOptions(), types: { bigint: postgres.BigInt } })
  const typed: postgres.Sql<{ bigint: bigint }> = sql
  const [row] = await typed`select ${typed.types.bigint(9007199254740993n)} as big`
  expect(row.big).toBe(9007199254740993n)
  await sql.end()
})

describe('sql.begin with OCC retry settings per call', () => {
  const conflict = () => Object.assign(new Error('change conflicts with another transaction, please retry: (OC000)'), { code: '40001' })

  test('a last argument retries this call, each attempt in a fresh transaction', async () => {
    await using({}, async (sql) => {
      const txids: string[] = []
      const result: number = await sql.begin(async (tx) => {
        const [{ txid }] = await tx`select txid_current()::text as txid`
        txids.push(txid)
        if (txids.length < 3) throw conflict()
        return 7
      }, { maxRetries: 3, baseDelayMs: 1 })
      expect(result).toBe(7)
      expect(new Set(txids).size).toBe(3)
    })
  })

  test('false turns the dsql() setting off for one call; options strings still work', async () => {
    await using({ retry: { baseDelayMs: 1 } }, async (sql) => {
      let calls = 0
      const err = await sql.begin('read write', async () => { calls++; throw conflict() }, false).catch((e: unknown) => e)
      expect(calls).toBe(1)
      expect(isOccError(err)).toBe(true)
      calls = 0
      const [{ n }] = await sql.begin('read write', async (tx) => { if (++calls < 2) throw conflict(); return tx`select 2 as n` })
      expect(n).toBe(2)
      expect(calls).toBe(2)
    })
  })
})

describe('servers without direct TLS (PostgreSQL 16 and older, some proxies)', () => {
  /** A relay to the stand-in that drops a connection opening with a TLS ClientHello, as PostgreSQL 16 does. */
  async function withoutDirectTls<R>(run: (port: number) => Promise<R>): Promise<R> {
    const relay = net.createServer((client) => {
      client.once('data', (first) => {
        if (first[0] === 0x16) return client.destroy()
        const upstream = net.connect(target().port, '127.0.0.1', () => {
          upstream.write(first)
          client.pipe(upstream).pipe(client)
        })
        upstream.on('error', () => client.destroy())
        client.on('error', () => upstream.destroy())
      })
    })
    await new Promise<void>((r) => relay.listen(0, '127.0.0.1', r))
    try {
      return await run((relay.address() as net.AddressInfo).port)
    } finally {
      relay.close()
    }
  }

  test('by default the connector falls back to SSLRequest once, and stays there', async () => {
    await withoutDirectTls(async (port) => {
      const warnings: string[] = []
      const sql = dsql(connectOptions({ port, max: 2, logger: { warn: (m) => warnings.push(m) } }))
      const rows = await Promise.all([sql`select 1 as n`, sql`select 2 as n`])
      expect(rows.map(([r]) => r.n)).toEqual([1, 2])
      await sql.end()
      expect(warnings.filter((w) => /does not speak direct TLS/.test(w))).toHaveLength(1)
    })
  })

  test("sslnegotiation: 'direct' chosen explicitly does not fall back: a quick retryable failure that names the remedy", async () => {
    await withoutDirectTls(async (port) => {
      const sql = dsql(connectOptions({ port, sslnegotiation: 'direct' }))
      const started = Date.now()
      const err = await sql`select 1`.catch((e: unknown) => e)
      await sql.end()
      expect(err).toBeInstanceOf(DsqlConnectionError)
      expect(err).toMatchObject({ code: 'CONNECTION_CLOSED', retryable: true })
      expect((err as Error).message).toMatch(/closed the connection during direct TLS.*does not speak direct TLS.*sslnegotiation: 'postgres'/)
      expect(Date.now() - started).toBeLessThan(8000)
    })
  })
})

describe('review fixes', () => {
  test('fetch_types: true still gives every query its own rows', async () => {
    const rows = await using({ max: 1, fetch_types: true }, (sql) => Promise.all([sql`select 1 as a`, sql`select 2 as b`, sql`select 3 as c`]))
    expect(rows.map((r) => [...r])).toEqual([[{ a: 1 }], [{ b: 2 }], [{ c: 3 }]])
  })

  test('a credentials provider that never answers is bounded by connect_timeout', async () => {
    const sql = dsql(connectOptions({ credentials: () => new Promise(() => undefined), connect_timeout: 1 }))
    const started = Date.now()
    const err = await sql`select 1`.catch((e: unknown) => e)
    await sql.end({ timeout: 0 })
    expect(err).toBeInstanceOf(DsqlConnectionError)
    expect((err as Error).message).toMatch(/Timed out after 1s/)
    expect(Date.now() - started).toBeLessThan(2500)
  })

  test('onconnect may run its queries concurrently', async () => {
    const seen: unknown[] = []
    await using({ onconnect: async (s) => { seen.push(await Promise.all([s.query('select 1 as x'), s.query('select 2 as y')])) } }, (sql) => sql`select 1`)
    expect(seen).toEqual([[[{ x: '1' }], [{ y: '2' }]]])
  })

  test("a provider's error is redacted in the cause too", async () => {
    const secret = 'wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEYSECRET'
    const sql = dsql(connectOptions({ credentials: async () => { throw new Error(`bad key ${secret}`) } }))
    const err = await sql`select 1`.catch((e: unknown) => e)
    await sql.end()
    expect(err).toBeInstanceOf(DsqlCredentialsError)
    expect(inspect(err, { depth: 5 })).not.toContain(secret)
  })
})
