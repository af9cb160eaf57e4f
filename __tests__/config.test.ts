import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createHash, X509Certificate } from 'node:crypto'
import { inspect } from 'node:util'
import dsql, { DsqlConfigError, DsqlConnectionError } from '../lib'
import { mergeUrl, resolveConfig, type DsqlOptions } from '../lib/config'

// This file checks defaults: without the stand-in's PG* variables that jest's global setup gives every test file.
for (const name of ['PGHOST', 'PGHOSTADDR', 'PGPORT', 'PGSSLROOTCERT']) delete process.env[name]

const ID = 'abcdefghijklmnopqrstuvwxyz'
const HOST = `${ID}.dsql.us-east-1.on.aws`
const resolve = (o: DsqlOptions, env: NodeJS.ProcessEnv = {}) => resolveConfig(o, { AWS_CONFIG_FILE: '/nonexistent', ...env })
const configError = (o: DsqlOptions, pattern: RegExp, env: NodeJS.ProcessEnv = {}) => {
  expect(() => resolve(o, env)).toThrow(DsqlConfigError)
  expect(() => resolve(o, env)).toThrow(pattern)
}

const HOST2 = 'zyxwvutsrqponmlkjihgfedcba.dsql.us-east-2.on.aws'

describe('multi-Region host lists', () => {
  test('each host is its own endpoint: name, Region, address and port, in preference order', () => {
    const c = resolve({ host: [HOST, HOST2], hostaddr: '127.0.0.1', port: [5001, 5002] })
    expect(c.endpoints.map((e) => [e.host, e.region, e.clusterId, e.hostaddr, e.port, e.tls.servername])).toEqual([
      [HOST, 'us-east-1', ID, '127.0.0.1', 5001, HOST],
      [HOST2, 'us-east-2', 'zyxwvutsrqponmlkjihgfedcba', '127.0.0.1', 5002, HOST2],
    ])
    expect(c.endpoints[0]).toBe(c)
    expect([c.host, c.region, c.port]).toEqual([HOST, 'us-east-1', 5001])
  })

  test('comma-separated strings, PG* lists, and the URL form postgres://a:p1,b:p2/db', () => {
    const fromEnv = resolve({}, { PGHOST: `${HOST},${HOST2}`, PGHOSTADDR: '127.0.0.1,127.0.0.2', PGPORT: '6001,6002' })
    expect(fromEnv.endpoints.map((e) => [e.host, e.hostaddr, e.port])).toEqual([[HOST, '127.0.0.1', 6001], [HOST2, '127.0.0.2', 6002]])
    const url = resolve(mergeUrl(`postgres://appuser@${HOST}:7001,${HOST2}:7002/postgres?sslmode=verify-full`, {}))
    expect(url.endpoints.map((e) => [e.host, e.port, e.user])).toEqual([[HOST, 7001, 'appuser'], [HOST2, 7002, 'appuser']])
    const noPorts = resolve(mergeUrl(`postgres://${HOST},${HOST2}/postgres`, {}))
    expect(noPorts.endpoints.map((e) => [e.host, e.port])).toEqual([[HOST, 5432], [HOST2, 5432]])
  })

  test('an explicit region is for the hosts whose name does not say theirs', () => {
    const c = resolve({ host: [HOST, 'proxy.example.internal'], region: 'eu-west-1' })
    expect(c.endpoints.map((e) => e.region)).toEqual(['us-east-1', 'eu-west-1'])
  })

  test('lists of the wrong length or type are refused clearly', () => {
    configError({ host: [HOST, HOST2], port: [1, 2, 3] }, /`port` lists 3 values for 2 hosts/)
    configError({ host: [HOST, HOST2], hostaddr: ['a', 'b', 'c'] }, /`hostaddr` lists 3 values for 2 hosts/)
    configError({ host: [HOST, 42 as unknown as string] }, /`host` must be a cluster endpoint name/)
    configError({ host: [] }, /`host` is an empty list|pass `host`/)
    configError({ host: [HOST, 'localhost'] }, /set `hostaddr: 'localhost'`/)
  })
})

describe('endpoint and region', () => {
  test('a cluster endpoint gives the region and the defaults', () => {
    const c = resolve({ host: HOST })
    expect(c).toMatchObject({
      host: HOST, hostaddr: HOST, port: 5432, region: 'us-east-1', clusterId: ID, user: 'admin', database: 'postgres',
      action: 'DbConnectAdmin', schema: 'public', tokenDurationSecs: 900, sslnegotiation: 'direct',
    })
    expect(c.tls).toMatchObject({ servername: HOST, rejectUnauthorized: true, minVersion: 'TLSv1.2' })
  })

  test('dsql-<suffix> endpoints, upper case and a trailing dot are accepted', () => {
    expect(resolve({ host: `${ID.toUpperCase()}.DSQL-FNH4.eu-central-1.on.aws.` })).toMatchObject({
      host: `${ID}.dsql-fnh4.eu-central-1.on.aws`, region: 'eu-central-1',
    })
  })

  test('a bare cluster id is expanded with the region option or the environment', () => {
    expect(resolve({ host: ID, region: 'ap-northeast-1' }).host).toBe(`${ID}.dsql.ap-northeast-1.on.aws`)
    expect(resolve({ host: ID }, { AWS_REGION: 'eu-west-1' }).host).toBe(`${ID}.dsql.eu-west-1.on.aws`)
    expect(resolve({ host: ID }, { AWS_DEFAULT_REGION: 'us-west-2' }).host).toBe(`${ID}.dsql.us-west-2.on.aws`)
  })

  test("the profile's region from the shared config file", () => {
    const dir = mkdtempSync(join(tmpdir(), 'dsql-config-'))
    const file = join(dir, 'config')
    writeFileSync(file, '[default]\nregion = us-east-2\n[profile work]\noutput = json\nregion=eu-north-1\n')
    expect(resolve({ host: ID }, { AWS_CONFIG_FILE: file }).region).toBe('us-east-2')
    expect(resolve({ host: ID, profile: 'work' }, { AWS_CONFIG_FILE: file }).region).toBe('eu-north-1')
    expect(resolve({ host: ID }, { AWS_CONFIG_FILE: file, AWS_PROFILE: 'work' }).region).toBe('eu-north-1')
  })

  test('host from PGHOST, hostaddr from PGHOSTADDR, port from PGPORT', () => {
    expect(resolve({}, { PGHOST: HOST, PGHOSTADDR: '127.0.0.1', PGPORT: '6543' })).toMatchObject({ host: HOST, hostaddr: '127.0.0.1', port: 6543 })
  })

  test('bad hosts are refused with what to do', () => {
    configError({}, /pass `host`.*PGHOST/)
    configError({ host: 'abc' }, /26 lowercase letters and digits/)
    configError({ host: ID }, /pass `region`, set AWS_REGION/)
    configError({ host: 'db.example.com' }, /Cannot tell the AWS region/)
    configError({ host: `${HOST},${HOST}` }, /lists "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws" twice/)
    configError({ host: `${HOST}:5432` }, /bare host name/)
    configError({ host: HOST, region: 'eu-west-1' }, /contradicts the endpoint's region "us-east-1"/)
    configError({ host: ID, region: 'mars' }, /`region` must be an AWS region name such as "us-east-1", not the string "mars"/)
  })

  test('localhost and addresses are refused with the hostaddr advice, region or not', () => {
    for (const host of ['localhost', 'LOCALHOST', 'db.localhost', '127.0.0.1', '10.0.0.1', '::1'])
      for (const region of [undefined, 'us-east-1'])
        configError({ host, region }, new RegExp(`keep \`host\` the endpoint and set \`hostaddr: '${host.replace(/\./g, '\\.')}'\``))
  })

  test("a DSQL endpoint's cluster id is 26 lowercase letters and digits", () => {
    configError({ host: 'abcdefghijklmnopqrstuvwxy.dsql.us-east-1.on.aws' }, /"abcdefghijklmnopqrstuvwxy" is not a cluster id \(26 lowercase letters and digits\)/)
    configError({ host: `${ID}x.dsql.us-east-1.on.aws` }, /is not a cluster id/)
    configError({ host: 'my_cluster.dsql.us-east-1.on.aws' }, /<cluster-id>\.dsql\.<region>\.on\.aws/)
    configError({ host: `${ID}.dsql.mars.on.aws` }, /its region part is not an AWS region/)
    // With an explicit region any name goes: proxies, tunnels, a stand-in with its own cluster id.
    expect(resolve({ host: 'local-test.dsql.us-east-1.on.aws', region: 'us-east-1' })).toMatchObject({ host: 'local-test.dsql.us-east-1.on.aws', clusterId: undefined })
  })

  test('a non-DSQL name works when the region is given (custom DNS, tunnels)', () => {
    expect(resolve({ host: 'db.internal.example', region: 'us-east-1' })).toMatchObject({ host: 'db.internal.example', region: 'us-east-1' })
  })
})

describe('roles, schema, token and TLS options', () => {
  test('non-admin roles sign DbConnect and use myschema', () => {
    expect(resolve({ host: HOST, user: 'app' })).toMatchObject({ action: 'DbConnect', schema: 'myschema' })
    expect(resolve({ host: HOST, username: 'app', schema: 'sales' })).toMatchObject({ action: 'DbConnect', schema: 'sales' })
    expect(resolve({ host: HOST, schema: false }).schema).toBe(false)
  })

  test('tokenDurationSecs must be whole seconds within 1..604800', () => {
    expect(resolve({ host: HOST, tokenDurationSecs: 604800 }).tokenDurationSecs).toBe(604800)
    for (const bad of [0, -1, 1.5, 604801]) configError({ host: HOST, tokenDurationSecs: bad }, /tokenDurationSecs/)
  })

  test('TLS cannot be turned off', () => {
    configError({ host: HOST, ssl: false }, /DSQL requires TLS/)
    expect(() => resolve(mergeUrl(`postgres://admin@${HOST}/postgres?sslmode=disable`, {}))).toThrow(/DSQL requires TLS/)
  })

  test('every ssl mode verifies the chain and the host name; only an object turns that off', () => {
    for (const ssl of [true, 'true', 'require', 'prefer', 'allow', 'verify-ca', 'verify-full'] as const) {
      const tls = resolve({ host: HOST, ssl: ssl as DsqlOptions['ssl'] }).tls
      expect({ ssl, rejectUnauthorized: tls.rejectUnauthorized, checkServerIdentity: tls.checkServerIdentity }).toEqual({ ssl, rejectUnauthorized: true, checkServerIdentity: undefined })
    }
    expect(resolve(mergeUrl(`postgres://admin@${HOST}/postgres?sslmode=require`, {})).tls.rejectUnauthorized).toBe(true)
    expect(resolve({ host: HOST, ssl: { ca: 'PEM' } }).tls).toMatchObject({ ca: 'PEM', servername: HOST })
    expect(resolve({ host: HOST, ssl: { rejectUnauthorized: false } }).tls.rejectUnauthorized).toBe(false)
    configError({ host: HOST, ssl: 'disable' as never }, /DSQL requires TLS/)
    configError({ host: HOST, ssl: 'verify' as never }, /`ssl` "verify" is not a TLS mode/)
  })

  test('turning verification off warns once per dsql() call, through logger.warn', async () => {
    const warned: string[] = []
    const logger = { warn: (m: string) => warned.push(m) }
    resolve({ host: HOST, ssl: 'require', logger })
    resolve({ host: HOST, ssl: { ca: 'PEM' }, logger })
    expect(warned).toEqual([])
    resolve({ host: HOST, ssl: { rejectUnauthorized: false }, logger })
    expect(warned).toHaveLength(1)
    expect(warned[0]).toMatch(/verification is off/)
  })

  test('sslrootcert pins a CA file; an unreadable one is a config error', () => {
    expect(resolve({ host: HOST, sslrootcert: 'certs/AmazonRootCA1.pem' }).tls.ca).toContain('BEGIN CERTIFICATE')
    expect(resolve({ host: HOST }, { PGSSLROOTCERT: 'certs/AmazonRootCA1.pem' }).tls.ca).toContain('BEGIN CERTIFICATE')
    configError({ host: HOST, sslrootcert: '/nope.pem' }, /Cannot read sslrootcert "\/nope.pem" \(ENOENT\)/)
  })

  test('sslnegotiation is direct or postgres', () => {
    expect(resolve({ host: HOST, sslnegotiation: 'postgres' }).sslnegotiation).toBe('postgres')
    configError({ host: HOST, sslnegotiation: 'tls' as never }, /sslnegotiation/)
  })

  test('passwords are refused: the connector owns them', () => {
    configError({ host: HOST, password: 'x' } as DsqlOptions, /Do not pass a password/)
    expect(() => mergeUrl(`postgres://admin:secret@${HOST}/postgres`, {})).toThrow(/Do not pass a password/)
  })

  test("a URL's postgres.js options are options, not startup parameters", () => {
    const merged = mergeUrl(`postgres://admin@${HOST}/postgres?connect_timeout=5&max=3&prepare=false&application_name=x`, {})
    expect(merged).toMatchObject({ connect_timeout: 5, max: 3, prepare: false, connection: { application_name: 'x' } })
    expect(merged.connection).toEqual({ application_name: 'x' })
  })

  test('a URL gives host, user, database and libpq parameters; options win over it', () => {
    const merged = mergeUrl(`postgres://app@${HOST}:6000/postgres?sslrootcert=certs/AmazonRootCA1.pem&sslnegotiation=postgres&hostaddr=127.0.0.1`, { port: 7000 })
    expect(resolve(merged)).toMatchObject({ user: 'app', port: 7000, hostaddr: '127.0.0.1', sslnegotiation: 'postgres' })
  })
})

describe('every malformed option is a DsqlConfigError', () => {
  const bad: [string, unknown][] = [
    ['host', ['a', 'b']], ['host', 42], ['host', { name: HOST }], ['hostname', [HOST]], ['port', 'abc'], ['port', {}], ['port', 0],
    ['region', 1], ['region', ['us-east-1']], ['user', 7], ['username', {}], ['database', 1], ['db', []], ['schema', 1], ['schema', true],
    ['onconnect', 'SET x'], ['tokenDurationSecs', '900'], ['tokenDurationSecs', 1.5], ['credentials', 'AKIA'], ['credentials', { accessKeyId: 'a' }],
    ['customCredentialsProvider', []], ['profile', 1], ['ssl', 1], ['ssl', []], ['ssl', 'verify'], ['sslrootcert', 1], ['sslnegotiation', 1],
    ['hostaddr', 1], ['hostaddr', ''], ['retry', 'yes'], ['retry', 3], ['retry', { maxRetries: '3' }], ['retry', { maxRetries: -1 }],
    ['retry', { jitterFactor: 2 }], ['retry', { tries: 3 }], ['logger', console.warn], ['logger', { warn: 'yes' }], ['max', '3'], ['max', 0],
    ['max', 1.5], ['idle_timeout', '20'], ['connect_timeout', '5'], ['connect_timeout', 0], ['max_lifetime', '60'], ['max_pipeline', '100'],
    ['backoff', 'fast'], ['keep_alive', '60'], ['prepare', 'false'], ['fetch_types', 1], ['debug', 'yes'], ['publications', 1],
    ['target_session_attrs', 1], ['transform', 'camel'], ['transform', 1], ['types', []], ['connection', 'application_name=x'], ['connection', { options: {} }],
    ['onnotice', true], ['onparameter', {}], ['onclose', 'x'],
  ]
  test.each(bad)('%s: %p', (name, value) => {
    const options = { host: HOST, [name]: value } as DsqlOptions
    expect(() => dsql(options)).toThrow(DsqlConfigError)
    expect(() => dsql(options)).toThrow(name === 'host' || name === 'hostname' ? /host/ : new RegExp(`\`(${name}|retry|logger|connection)[.\`]`))
  })

  test('the message says what was given without quoting a secret', () => {
    const secret = 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY'
    expect(() => dsql({ host: HOST, profile: secret as never, hostaddr: 1 as never })).toThrow(/`hostaddr` must be a host name or IP address, not the number 1\.$/)
    expect(() => dsql({ host: HOST, region: secret })).not.toThrow(new RegExp(secret.slice(0, 10)))
  })

  test('an explicit undefined means the default, for every option', async () => {
    const every = Object.fromEntries(
      ['hostname', 'port', 'region', 'user', 'username', 'database', 'db', 'schema', 'onconnect', 'tokenDurationSecs', 'customCredentialsProvider', 'profile',
        'ssl', 'sslrootcert', 'sslnegotiation', 'hostaddr', 'retry', 'logger', 'max', 'idle_timeout', 'connect_timeout', 'max_lifetime', 'max_pipeline',
        'backoff', 'keep_alive', 'prepare', 'fetch_types', 'debug', 'publications', 'target_session_attrs', 'transform', 'types', 'connection',
        'onnotice', 'onparameter', 'onclose'].map((k) => [k, undefined]),
    )
    const sql = dsql({ host: HOST, credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'x' }, ...every })
    expect(sql.options).toMatchObject({ max: 10, user: 'admin', database: 'postgres', port: [5432], prepare: true, fetch_types: false, connect_timeout: 30 })
    await sql.end()
    expect(resolve({ host: HOST, ...every })).toMatchObject({ port: 5432, schema: 'public', tokenDurationSecs: 900, sslnegotiation: 'direct' })
  })
})

describe('dsql() builds a postgres.js sql without connecting', () => {
  const credentials = { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY', sessionToken: 'SESSIONTOKENSECRET' }

  test('PG* variables and explicit undefined do not shrink the pool or turn TLS off', async () => {
    const saved = { ...process.env }
    Object.assign(process.env, { PGMAX: '3', PGSSL: 'disable', PGFETCH_TYPES: 'true', PGPASSWORD: 'hunter2', PGUSER: 'someone' })
    try {
      const sql = dsql({ host: HOST, credentials, max: undefined, ssl: undefined })
      expect(sql.options.max).toBe(10)
      expect(sql.options.ssl).toBe(false) // postgres.js does no TLS itself: the connector's socket is already TLS
      expect(sql.options.user).toBe('admin')
      expect(sql.options.fetch_types).toBe(false)
      expect((sql.options as unknown as { socket: unknown }).socket).toEqual(expect.any(Function))
      await sql.end()
    } finally {
      process.env = saved
    }
  })

  test('application_name names the connector after a user value', async () => {
    const a = dsql({ host: HOST, credentials })
    const b = dsql({ host: HOST, credentials, connection: { application_name: 'billing' } })
    expect(a.options.connection.application_name).toMatch(/^postgres-dsql\/\d+\.\d+\.\d+$/)
    expect(b.options.connection.application_name).toMatch(/^billing postgres-dsql\//)
    await Promise.all([a.end(), b.end()])
  })

  test('max_lifetime stays under DSQL\'s 60 minutes, jittered per connection', async () => {
    const sql = dsql({ host: HOST, credentials })
    const lifetime = sql.options.max_lifetime as unknown as () => number
    const samples = Array.from({ length: 50 }, () => lifetime())
    expect(Math.max(...samples)).toBeLessThanOrEqual(55 * 60)
    expect(Math.min(...samples)).toBeGreaterThanOrEqual(50 * 60)
    expect(new Set(samples).size).toBeGreaterThan(1)
    await sql.end()
  })

  test('sql.options holds no secret', async () => {
    const sql = dsql({ host: HOST, credentials })
    const dump = inspect(sql.options, { depth: 10, showHidden: true }) + JSON.stringify(sql.options)
    for (const secret of [credentials.secretAccessKey, credentials.sessionToken]) expect(dump).not.toContain(secret)
    await sql.end()
  })

  test('config errors are thrown by dsql() itself', () => {
    expect(() => dsql({ host: 'nope' })).toThrow(DsqlConfigError)
  })
})

test('certs/AmazonRootCA1.pem is Amazon Root CA 1', () => {
  const cert = new X509Certificate(require('node:fs').readFileSync('certs/AmazonRootCA1.pem'))
  expect(cert.subject).toContain('CN=Amazon Root CA 1')
  expect(createHash('sha256').update(cert.raw).digest('hex')).toBe('8ecde6884f3d87b1125ba31ac3fcb13d7016de7f57cc904fe1cb97c6ae98196e')
})

test('a message that quotes another one ends in one full stop', () => {
  expect(new DsqlConnectionError('Connection failed during startup: socket hang up..', { retryable: true }).message).toBe('Connection failed during startup: socket hang up.')
  expect(new DsqlConnectionError('failed: boom.. Check the host.', { retryable: true }).message).toBe('failed: boom. Check the host.')
  expect(new DsqlConfigError('`port` 0 is not a TCP port (1..65535).').message).toContain('(1..65535).')
})
