/**
 * DSQL's column types: which built-in types a table column may have, and the names DSQL uses
 * for them in its refusals (`datatype money not supported`, `datatype integer[] not supported`,
 * PostgreSQL's `format_type` spelling). Names are read from libpg_query's TypeName nodes.
 */

/** Internal names (as the parser writes them, pg_catalog stripped) to the SQL names of format_type. */
const SQL_NAME: Record<string, string> = {
  int2: 'smallint',
  int4: 'integer',
  int8: 'bigint',
  float4: 'real',
  float8: 'double precision',
  bool: 'boolean',
  varchar: 'character varying',
  bpchar: 'character',
  varbit: 'bit varying',
  timestamp: 'timestamp without time zone',
  timestamptz: 'timestamp with time zone',
  time: 'time without time zone',
  timetz: 'time with time zone',
  decimal: 'numeric',
}

/** The column types DSQL documents as supported. */
const SUPPORTED = new Set([
  'smallint',
  'integer',
  'bigint',
  'real',
  'double precision',
  'numeric',
  'character',
  'character varying',
  'text',
  'date',
  'time without time zone',
  'time with time zone',
  'timestamp without time zone',
  'timestamp with time zone',
  'interval',
  'boolean',
  'bytea',
  'uuid',
  'json',
  'jsonb',
])

/**
 * Built-in types that exist in PostgreSQL but not as DSQL column types. A name in neither set
 * (a domain the user made, a type that does not exist) is left to PostgreSQL to resolve.
 */
const UNSUPPORTED = new Set([
  'money',
  'xml',
  'inet',
  'cidr',
  'macaddr',
  'macaddr8',
  'point',
  'line',
  'lseg',
  'box',
  'path',
  'polygon',
  'circle',
  'tsvector',
  'tsquery',
  'int4range',
  'int8range',
  'numrange',
  'tsrange',
  'tstzrange',
  'daterange',
  'int4multirange',
  'int8multirange',
  'nummultirange',
  'tsmultirange',
  'tstzmultirange',
  'datemultirange',
  'bit',
  'bit varying',
  'pg_lsn',
  'pg_snapshot',
  'txid_snapshot',
  'jsonpath',
])

/** Geometric types: DSQL refuses them even in expressions (`line('{1,2,3}')`, `'...'::circle`). */
export const NO_RUNTIME = new Set(['point', 'line', 'lseg', 'box', 'path', 'polygon', 'circle'])

/** `serial` and friends are not types on DSQL: 42704 `type "serial" does not exist`. */
export const SERIALS = new Set(['serial', 'serial2', 'serial4', 'serial8', 'smallserial', 'bigserial'])

export interface TypeRef {
  /** The type's name as written, without a pg_catalog qualifier, lower case unless quoted. */
  written: string
  /** format_type's name for a built-in (e.g. integer), else `written`. */
  sql: string
  array: boolean
  /** Schema-qualified with something other than pg_catalog: a user type, never judged here. */
  qualified: boolean
}

/** Reads a TypeName node's `names` (list of String nodes) and `arrayBounds`. */
export function typeRef(names: string[], array: boolean): TypeRef {
  const qualified = names.length > 1 && names[0] !== 'pg_catalog'
  const written = names[names.length - 1] ?? ''
  return { written, sql: SQL_NAME[written] ?? written, array, qualified }
}

/** Why DSQL refuses this column type, or undefined when it accepts it (or leaves it to PostgreSQL). */
export function columnTypeRefusal(type: TypeRef): { code: string; message: string } | undefined {
  if (type.qualified) return undefined
  if (!type.array && SERIALS.has(type.written)) return { code: '42704', message: `type "${type.written}" does not exist` }
  if (type.array) return { code: '0A000', message: `datatype ${type.sql}[] not supported` }
  if (UNSUPPORTED.has(type.sql)) return { code: '0A000', message: `datatype ${type.sql} not supported` }
  return undefined
}

export const isSupportedColumnType = (type: TypeRef): boolean => !type.array && SUPPORTED.has(type.sql)
