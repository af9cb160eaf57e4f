/**
 * Statements whose outcome is unknown: their runner lost the connection (or died) while a DDL
 * statement ran, which cannot share a transaction with its ledger row on DSQL. A person settles
 * them (`migrate --settle file:n=applied|not-applied`), or the catalog does when it can prove
 * what happened.
 */
import type postgres from 'postgres'
import type { Token } from '../local/lexer'
import { startsWith } from '../local/lexer'
import type { Unit } from './files'
import type { Outcome } from './ledger'

/**
 * What the catalog proves about a unit, or undefined when it proves nothing. Only
 * `CREATE TABLE [IF NOT EXISTS] name`: no table of that name in any schema means it did not
 * take effect (running it again is right); a table of that name where the statement would create
 * it (its schema, else the session's current schema) means it did (running it again would fail).
 * A table of that name only in another schema proves nothing.
 */
export async function proveOutcome(sql: postgres.Sql, unit: Unit): Promise<Outcome | undefined> {
  const target = unit.block ? undefined : createdTable(unit.statements[0].tokens)
  if (!target) return undefined
  const rows = await sql.unsafe(
    `SELECT n.nspname = coalesce($2, current_schema()) AS here FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = $1 AND c.relkind IN ('r', 'p')`,
    [target.name, target.schema ?? null],
  )
  if (!rows.length) return 'not-applied'
  return rows.some((r) => r.here === true) ? 'applied' : undefined
}

/** The table a `CREATE TABLE` statement creates, as the catalog spells it; undefined for any other statement. */
function createdTable(t: Token[]): { schema?: string; name: string } | undefined {
  if (!startsWith(t, 'create', 'table')) return undefined
  let at = startsWith(t.slice(2), 'if', 'not', 'exists') ? 5 : 2
  const part = (token: Token | undefined) => (token?.kind === 'ident' || token?.kind === 'word' ? token.value : undefined)
  const first = part(t[at])
  if (first === undefined) return undefined
  if (!(t[at + 1]?.kind === 'op' && t[at + 1].value === '.')) return { name: first }
  at += 2
  const second = part(t[at])
  // A three-part name (database.schema.table) or anything odd: prove nothing.
  if (second === undefined || (t[at + 1]?.kind === 'op' && t[at + 1].value === '.')) return undefined
  return { schema: first, name: second }
}
