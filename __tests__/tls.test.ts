/**
 * TLS modes against the stand-in, whose CA is not in Node's root store: every string mode
 * verifies the certificate, so each is refused before a token is sent; only the explicit object
 * `{ rejectUnauthorized: false }` connects, and says so once.
 */
import dsql, { DsqlTlsError, type DsqlOptions } from '../lib'
import { target } from './helpers/target'

// jest's global setup gives every test file the stand-in's CA in PGSSLROOTCERT: not this one.
delete process.env.PGSSLROOTCERT

/** Reaches the stand-in as a user without its CA would: no sslrootcert, PGSSLROOTCERT or NODE_EXTRA_CA_CERTS. */
function untrusted(extra: DsqlOptions): DsqlOptions {
  const t = target()
  return { host: t.host, hostaddr: t.hostaddr, port: t.port, credentials: t.credentials, max: 1, connect_timeout: 10, ...extra }
}

describe('TLS modes', () => {
  test.each([true, 'require', 'prefer', 'allow', 'verify-ca', 'verify-full'] as const)('ssl: %p refuses a certificate it cannot verify', async (ssl) => {
    const sql = dsql(untrusted({ ssl }))
    try {
      const err = await sql`select 1`.catch((e: unknown) => e)
      expect(err).toBeInstanceOf(DsqlTlsError)
      expect((err as Error).message).toMatch(/did not verify .*No token was sent/)
    } finally {
      await sql.end()
    }
  })

  test('verify-ca checks the host name too', async () => {
    // The stand-in's CA is trusted here, but the endpoint asked for is not on its certificate.
    const t = target()
    const named = dsql(untrusted({ ssl: 'verify-ca', sslrootcert: t.caFile, host: `${'a'.repeat(26)}.dsql.${t.region}.on.aws` }))
    try {
      const err = await named`select 1`.catch((e: unknown) => e)
      expect(err).toBeInstanceOf(DsqlTlsError)
      expect((err as { cause?: { code?: string } }).cause?.code).toBe('ERR_TLS_CERT_ALTNAME_INVALID')
    } finally {
      await named.end()
    }
  })

  test('ssl: { rejectUnauthorized: false } connects, with one warning per dsql() call', async () => {
    const warnings: string[] = []
    const sql = dsql(untrusted({ ssl: { rejectUnauthorized: false }, max: 3, logger: { warn: (m) => warnings.push(m) } }))
    try {
      // Three connections at once: still one warning.
      const rows = await Promise.all([1, 2, 3].map((n) => sql`select ${n}::int as n, pg_sleep(0.05)`))
      expect(rows.map((r) => r[0].n)).toEqual([1, 2, 3])
      expect(warnings).toEqual([expect.stringMatching(/certificate verification is off/)])
    } finally {
      await sql.end()
    }
  })
})
