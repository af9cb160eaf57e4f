/**
 * Multi-Region clusters: a two-Region stand-in (one gateway, cluster id, certificate and token
 * scope per Region, one database behind both), driven explicitly: a Region stops and returns.
 */
import { DsqlSigner } from '@aws-sdk/dsql-signer'
import postgres from 'postgres'
import { startLocalDsql, type LocalDsql, type LocalDsqlRegion } from '../lib/local'

let local: LocalDsql

beforeAll(async () => {
  local = await startLocalDsql({ regions: ['us-east-1', 'us-east-2'], roles: ['appuser'] })
})
afterAll(() => local?.stop())

/** Plain postgres.js to one Region's endpoint, with a token signed for that endpoint and Region. */
function direct(r: LocalDsqlRegion, signedFor: LocalDsqlRegion = r) {
  const signer = new DsqlSigner({ hostname: signedFor.host, region: signedFor.region, credentials: local.credentials })
  return postgres({
    host: r.hostaddr, port: r.port, user: 'admin', database: 'postgres', max: 1, fetch_types: false, connect_timeout: 5,
    ssl: { ca: local.ca, servername: r.host },
    pass: () => signer.getDbConnectAdminAuthToken(),
  })
}

describe('two-Region stand-in', () => {
  test('each Region has its own endpoint, cluster id and port; the first is the single-Region API', () => {
    const [a, b] = local.regions
    expect(local.regions.map((r) => r.region)).toEqual(['us-east-1', 'us-east-2'])
    expect(a.host).toBe(`${a.clusterId}.dsql.us-east-1.on.aws`)
    expect(b.host).toBe(`${b.clusterId}.dsql.us-east-2.on.aws`)
    expect(a.clusterId).not.toBe(b.clusterId)
    expect(a.port).not.toBe(b.port)
    expect([local.host, local.port, local.region]).toEqual([a.host, a.port, a.region])
    expect(local.env.PGHOST).toBe(`${a.host},${b.host}`)
    expect(local.env.PGPORT).toBe(`${a.port},${b.port}`)
  })

  test('a row written in one Region is read in the other', async () => {
    const [a, b] = local.regions
    const east1 = direct(a)
    const east2 = direct(b)
    try {
      await east1`create table if not exists mr_rows (id int primary key, region text)`
      await east1`insert into mr_rows values (1, 'us-east-1')`
      expect(await east2`select id, region from mr_rows`).toEqual([{ id: 1, region: 'us-east-1' }])
    } finally {
      await east1`drop table if exists mr_rows`.catch(() => undefined)
      await Promise.all([east1.end(), east2.end()])
    }
  })

  test('a token is scoped to its Region and endpoint: one signed for the other Region is refused', async () => {
    const [a, b] = local.regions
    const wrong = direct(b, a)
    try {
      await expect(wrong`select 1`).rejects.toMatchObject({ code: '08006' })
    } finally {
      await wrong.end()
    }
  })

  test('stopRegion drops that Region\'s connections and refuses new ones; the other Region serves on; startRegion restores it', async () => {
    const [a, b] = local.regions
    const east1 = direct(a)
    const east2 = direct(b)
    try {
      await east1`select 1`
      await local.stopRegion('us-east-1')
      await expect(east1`select 1`).rejects.toMatchObject({ code: expect.stringMatching(/CONNECTION_CLOSED|ECONNREFUSED|CONNECTION_DESTROYED|CONNECT_TIMEOUT/) })
      expect(await east2`select 2 as two`).toEqual([{ two: 2 }])
      await local.startRegion('us-east-1')
      expect(await east1`select 3 as three`).toEqual([{ three: 3 }])
    } finally {
      await local.startRegion('us-east-1')
      await Promise.all([east1.end({ timeout: 1 }), east2.end({ timeout: 1 })])
    }
  })

  test('unknown Region names and region with regions are refused', async () => {
    await expect(local.stopRegion('eu-west-1')).rejects.toThrow(/No Region "eu-west-1".*us-east-1, us-east-2/)
    await expect(startLocalDsql({ region: 'us-east-1', regions: ['us-east-2'] })).rejects.toThrow(/not both/)
    await expect(startLocalDsql({ regions: ['us-east-1', 'us-east-1'] })).rejects.toThrow(/each Region once/)
  })
})
