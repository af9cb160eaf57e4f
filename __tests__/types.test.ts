/**
 * Arrays of every built-in type come back as plain postgres.js with `fetch_types: true` returns
 * them, without the connector paying for the type fetch.
 */
import { inspect } from 'node:util'
import postgres from 'postgres'
import dsql from '../lib'
import { resolveConfig } from '../lib/config'
import { ARRAY_TYPES } from '../lib/pg-types'
import { credentialProvider, tokenMinter } from '../lib/token'
import { connectOptions, target } from './helpers/target'

interface ArrayType {
  oid: number
  name: string
  elem: number
  /** Fields of a composite element type (catalog and view row types), else 0. */
  fields: number
  /** Its element's input function fails hard, which pg_input_is_valid cannot catch. */
  unreadable: boolean
}

/** Input functions that refuse every value with a hard error, not a soft one (found by trying each). */
const HARD_INPUTS = ['gtsvectorin']

/** Element literals to try, in order; the first the type accepts gives its sample array. */
const CANDIDATES = [
  '1', 't', 'a b', '2020-01-02', '12:34:56', '2020-01-02 03:04:05+00', '1 day', '{"a": [1, 2]}', '(1,2)', '((0,0),(1,1))',
  '<(0,0),1>', '1.2.3.4', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', 'a & b', '0/16B6C50', '10:20:10,14,15',
  '00000000-0000-0000-0000-000000000001', '[1,3)', '{[1,3)}', '<a>x</a>', '{1,2,3}', '$.a', 'pg_class', 'int4', 'upper', '+', 'english', '(0,1)', '1,2',
]

const quoteElement = (x: string) => `"${x.replace(/["\\]/g, (c) => `\\${c}`)}"`

/** Every candidate array literal of every type, as `<oid>:<literal>`; composites get all-NULL fields. */
function literals(types: ArrayType[]): string[] {
  return types.flatMap((t) => (t.fields ? [`(${','.repeat(t.fields - 1)})`] : CANDIDATES).map((c) => `${t.oid}:{${quoteElement(c)},NULL}`))
}

describe('array types', () => {
  const t = target()
  const config = resolveConfig(connectOptions() as never)
  const mint = tokenMinter(config, credentialProvider(t.credentials, undefined))
  const plain = postgres({
    host: t.hostaddr,
    port: t.port,
    user: 'admin',
    database: 'postgres',
    ssl: { ca: t.ca, servername: t.host },
    pass: mint,
    fetch_types: true,
    max: 1,
  })
  const sql = dsql(connectOptions({ max: 1 }))
  afterAll(() => Promise.all([plain.end(), sql.end()]))

  // Oids from 16384 on are the database's own (here: the stand-in's sys tables), not built in.
  test('the generated table is what postgres.js fetches from the stand-in', async () => {
    const rows = await plain<{ oid: number; typarray: number }[]>`
      select b.oid, b.typarray from pg_catalog.pg_type a left join pg_catalog.pg_type b on b.oid = a.typelem
      where a.typcategory = 'A' and b.oid < 16384 group by b.oid, b.typarray order by b.oid`
    expect(rows.map((r) => [r.oid, r.typarray])).toEqual(ARRAY_TYPES.map((p) => [...p]))
  })

  test('every array type parses and serialises as with fetch_types', async () => {
    const types = await plain<ArrayType[]>`
      select a.oid, a.oid::regtype::text as name, a.typelem as elem, e.typinput::text = any(${HARD_INPUTS}::text[]) as unreadable,
        (select count(*)::int from pg_catalog.pg_attribute where attrelid = e.typrelid and attnum > 0 and not attisdropped) as fields
      from pg_catalog.pg_type a join pg_catalog.pg_type e on e.oid = a.typelem
      where a.typcategory = 'A' and a.oid < 16384 order by a.oid`
    expect(types.length).toBeGreaterThan(290)
    // One query picks each type's sample: the first candidate its input function accepts.
    const samples = await plain<{ oid: number; literal: string | null }[]>`
      select t.oid, (
        select l from unnest(${literals(types)}::text[]) with ordinality as u(l, i)
        where l like t.oid::text || ':%' and pg_input_is_valid(substr(l, length(t.oid::text) + 2), t.oid::regtype::text)
        order by i limit 1) as literal
      from unnest(${types.filter((t) => !t.unreadable).map((t) => t.oid)}::oid[]) as t(oid)`
    const sampleOf = new Map(samples.map((r) => [r.oid, r.literal && r.literal.slice(String(r.oid).length + 1)]))
    let withValues = 0
    for (const type of types) {
      const literal = sampleOf.get(type.oid) ?? (type.oid === 22 || type.oid === 30 ? '1 2' : '{NULL}')
      if (sampleOf.get(type.oid)) withValues++
      // Compared as outcomes: postgres.js itself fails on some (a NULL in a json array).
      const outcome = (s: postgres.Sql) =>
        s.unsafe(`select $1::text::${type.name} as v`, [literal]).then((r) => ({ v: r[0].v as unknown }), (e: Error) => ({ error: e.message }))
      const expected = await outcome(plain)
      // inspect(): an invalid Date (a NULL element) never equals itself.
      expect({ type: type.name, got: inspect(await outcome(sql), { depth: null }) }).toEqual({ type: type.name, got: inspect(expected, { depth: null }) })
      if (!('v' in expected) || !Array.isArray(expected.v)) continue
      // Back the other way: the parsed value as an array parameter of the element type.
      const send = (s: postgres.Sql) => s`select ${s.array(expected.v as never[], type.elem)}::text as t`.then((r) => r[0].t, (e: Error) => e.message)
      expect({ type: type.name, t: await send(sql) }).toEqual({ type: type.name, t: await send(plain) })
    }
    // Most types accept one of the candidates, so their parsers see real elements, not only NULL.
    expect(withValues).toBeGreaterThan(200)
  }, 120_000)

  test('information_schema domains: sql_identifier[] is an array of strings', async () => {
    const [row] = await sql`select array_agg(table_name order by table_name) as names from information_schema.tables where table_name in ('pg_class', 'pg_type')`
    expect(row.names).toEqual(['pg_class', 'pg_type'])
  })
})
