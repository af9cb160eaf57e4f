/**
 * The token fast path: environment credentials are signed with node:crypto instead of the SDK.
 * Its tokens must equal @aws-sdk/dsql-signer's byte for byte, and the stand-in must accept them.
 */
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { join } from 'node:path'
import { DsqlSigner } from '@aws-sdk/dsql-signer'
import type { AwsCredentialIdentity } from '@smithy/types'
import { presignDsqlToken, type PresignInput } from '../lib/presign'
import { credentialProvider } from '../lib/token'
import { target } from './helpers/target'

async function sdkToken(input: PresignInput): Promise<string> {
  jest.useFakeTimers({ now: input.now, doNotFake: ['nextTick', 'setImmediate', 'queueMicrotask'] })
  try {
    const signer = new DsqlSigner({ hostname: input.host, region: input.region, credentials: input.credentials, expiresIn: input.expiresIn })
    return input.action === 'DbConnectAdmin' ? await signer.getDbConnectAdminAuthToken() : await signer.getDbConnectAuthToken()
  } finally {
    jest.useRealTimers()
  }
}

const keys: AwsCredentialIdentity[] = [
  { accessKeyId: 'AKIAIOSFODNN7EXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' },
  { accessKeyId: 'ASIAQWERTYUIOPASDFGH', secretAccessKey: 'a+b/c=d', sessionToken: "IQoJb3JpZ2luX2VjE+/=!'()*~ token with spaces" },
  { accessKeyId: 'ASIA0000000000000000', secretAccessKey: 'x'.repeat(40), sessionToken: 'FwoGZXIvYXdzE' + 'A'.repeat(600) + '==' },
]
const hosts: [string, string][] = [
  ['abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws', 'us-east-1'],
  ['a1b2c3d4e5f6g7h8i9j0k1l2m3.dsql-fnh4.eu-west-2.on.aws', 'eu-west-2'],
  ['tunnel.example.internal', 'ap-southeast-2'],
]

describe('presignDsqlToken equals DsqlSigner', () => {
  const cases: PresignInput[] = []
  let i = 0
  for (const credentials of keys)
    for (const [host, region] of hosts)
      for (const action of ['DbConnect', 'DbConnectAdmin'] as const)
        for (const expiresIn of [1, 900, 604800])
          cases.push({ host, region, action, expiresIn, credentials, now: new Date(Date.UTC(2026, i % 12, 1 + (i % 28), i % 24, (i * 7) % 60, (i++ * 13) % 60, i % 1000)) })

  test(`${cases.length} combinations of keys, session tokens, hosts, actions, durations and dates`, async () => {
    for (const input of cases) expect(presignDsqlToken(input)).toBe(await sdkToken(input))
  })
})

describe('environment credentials', () => {
  const env = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => ({ AWS_ACCESS_KEY_ID: 'AKIAENV', AWS_SECRET_ACCESS_KEY: 'envsecret', ...extra })

  test('are read as the SDK reads them: session token and expiration included, at every call', async () => {
    const vars = env({ AWS_SESSION_TOKEN: 'sess', AWS_CREDENTIAL_EXPIRATION: '2030-01-01T00:00:00Z' })
    const provider = credentialProvider(undefined, undefined, vars)
    expect(await provider()).toEqual({ accessKeyId: 'AKIAENV', secretAccessKey: 'envsecret', sessionToken: 'sess', expiration: new Date('2030-01-01T00:00:00Z') })
    vars.AWS_ACCESS_KEY_ID = 'AKIAROTATED'
    expect((await provider()).accessKeyId).toBe('AKIAROTATED')
  })

  test('a named profile takes the SDK chain, as the SDK does (the profile wins over environment keys)', async () => {
    const vars = env({ AWS_CONFIG_FILE: '/nonexistent', AWS_SHARED_CREDENTIALS_FILE: '/nonexistent' })
    // The SDK also reads process.env: without the stand-in's keys there (jest's global setup exports
    // them), it has no second source to warn about on the console.
    const saved = process.env
    process.env = { ...saved }
    delete process.env.AWS_ACCESS_KEY_ID
    delete process.env.AWS_SECRET_ACCESS_KEY
    try {
      await expect(credentialProvider(undefined, 'no-such-profile', vars)()).rejects.toThrow()
    } finally {
      process.env = saved
    }
  })

  test('a dsql() with only environment keys connects, signing without loading the AWS SDK', async () => {
    const t = target()
    // A fresh process, as a Lambda cold start: which modules did the first query load?
    const script = `
      const dsql = require(${JSON.stringify(join(__dirname, '..', 'lib'))}).default
      const sql = dsql({ host: process.env.T_HOST, hostaddr: process.env.T_ADDR, port: Number(process.env.T_PORT), sslrootcert: process.env.T_CA, max: 1 })
      sql\`select current_user as u\`.then(async ([row]) => {
        await sql.end()
        const loaded = Object.keys(require.cache).filter((f) => /@aws-sdk|@smithy/.test(f))
        console.log(JSON.stringify({ user: row.u, loaded }))
      }, (e) => { console.error(e.message); process.exit(1) })`
    // Not execFileSync: the stand-in may share this process's event loop (jest in band).
    const { stdout } = await promisify(execFile)(process.execPath, ['-r', 'ts-node/register/transpile-only', '-e', script], {
      cwd: join(__dirname, '..'),
      encoding: 'utf8',
      env: {
        PATH: process.env.PATH,
        AWS_ACCESS_KEY_ID: t.credentials.accessKeyId,
        AWS_SECRET_ACCESS_KEY: t.credentials.secretAccessKey,
        AWS_EC2_METADATA_DISABLED: 'true',
        T_HOST: t.host, T_ADDR: t.hostaddr, T_PORT: String(t.port), T_CA: t.caFile,
      },
      timeout: 60_000,
    })
    expect(JSON.parse(stdout.trim().split('\n').pop() as string)).toEqual({ user: 'admin', loaded: [] })
  })
})
