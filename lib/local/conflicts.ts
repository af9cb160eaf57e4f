/**
 * PostgreSQL's concurrency errors in DSQL's words. The stand-in's PostgreSQL runs at repeatable
 * read with a lock_timeout of a few milliseconds, so where DSQL's optimistic concurrency control
 * would fail a transaction, PostgreSQL fails it too: with a serialization failure (40001), a
 * deadlock (40P01) or a lock timeout (55P03) instead of a lock wait. Each becomes SQLSTATE 40001
 * with DSQL's message: OC000 for a data conflict, OC001 when the wait was for a table lock, i.e.
 * a schema change (DDL) racing with the use of the table.
 */

export const OC000 = 'change conflicts with another transaction (OC000)'
export const OC001 = 'schema has been updated by another transaction, please retry: (OC001)'

const CONFLICT_CODES = new Set(['40001', '40P01', '55P03'])

/** DSQL's fields for a PostgreSQL conflict error, or undefined when `fields` is not one. */
export function asConflict(fields: Record<string, string>): Record<string, string> | undefined {
  const code = fields.C
  if (!code || !CONFLICT_CODES.has(code)) return undefined
  // Row-level waits say so in their context ("while updating tuple (0,1) in relation ...").
  const rowLevel = code !== '55P03' || /\btuple\b/.test(fields.W ?? '') || /\brow\b/.test(fields.M ?? '')
  const severity = fields.S ?? 'ERROR'
  return { S: severity, V: fields.V ?? severity, C: '40001', M: rowLevel ? OC000 : OC001 }
}

/**
 * An error raised by the stand-in's own SQL (row limits, schema guards, rewritten statements):
 * the PL/pgSQL context and internal query fields would point at code the user never wrote.
 */
const INTERNAL_FIELDS = new Set(['W', 'p', 'q', 's'])

export function withoutInternals(fields: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(fields).filter(([key]) => !INTERNAL_FIELDS.has(key)))
}
