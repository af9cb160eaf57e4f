import { dirname, join } from 'node:path'
import { ARRAY_TYPES } from './pg-types'

/**
 * Oids from here on are assigned by initdb (information_schema, system views), not fixed by the
 * PostgreSQL release: a server whose catalog numbered them otherwise must not get its scalar
 * values parsed as arrays, so their parsers take only array text.
 */
const FIRST_INITDB_OID = 12000

type Handler = ((value: never) => unknown) & { array?: boolean }

/** The part of postgres.js's parsed options that holds its type handlers. */
export interface PgTypeOptions {
  fetch_types: boolean
  parsers: Record<number, Handler | undefined>
  serializers: Record<number, Handler | undefined>
  shared: { typeArrayMap: Record<number, number> }
}

interface ArrayCodecs {
  arrayParser(x: string, parser: Handler | undefined, typarray: number): unknown
  arraySerializer(xs: unknown, serializer: Handler | undefined, options: PgTypeOptions, typarray: number): string
}

let codecs: ArrayCodecs | null | undefined

/**
 * postgres.js keeps its array codecs in an internal module; the package's `exports` hide it, so
 * load it by path. If that ever fails, fall back to postgres.js's own type fetch.
 */
function loadCodecs(): ArrayCodecs | null {
  if (codecs !== undefined) return codecs
  try {
    const loaded = require(join(dirname(require.resolve('postgres')), 'types.js')) as Partial<ArrayCodecs>
    codecs = typeof loaded.arrayParser === 'function' && typeof loaded.arraySerializer === 'function' ? (loaded as ArrayCodecs) : null
  } catch {
    codecs = null
  }
  return codecs
}

/** Registers array parsing and serialising for every built-in type, as postgres.js's type fetch would. */
export function installArrayTypes(options: PgTypeOptions): void {
  if (options.fetch_types || options.shared.typeArrayMap[23]) return
  const found = loadCodecs()
  if (!found) {
    options.fetch_types = true
    return
  }
  for (const [oid, typarray] of ARRAY_TYPES) {
    if (options.parsers[typarray] && options.serializers[typarray]) continue
    const parser = options.parsers[oid]
    options.shared.typeArrayMap[oid] = typarray
    options.parsers[typarray] = typarray < FIRST_INITDB_OID ? arrayParse(found, parser, typarray) : guardedParse(found, parser, typarray)
    options.serializers[typarray] = (xs: never) => found.arraySerializer(xs, options.serializers[oid], options, typarray)
  }
}

/** As postgres.js does it: `array` tells it to pass the text without its leading `{`. */
function arrayParse(found: ArrayCodecs, parser: Handler | undefined, typarray: number): Handler {
  const parse: Handler = (xs: never) => found.arrayParser(xs, parser, typarray)
  parse.array = true
  return parse
}

/** Sees the whole text, and parses only array text (`{...}`); anything else stays a string. */
function guardedParse(found: ArrayCodecs, parser: Handler | undefined, typarray: number): Handler {
  return (x: never) => (typeof x === 'string' && (x as string)[0] === '{' ? found.arrayParser((x as string).slice(1), parser, typarray) : x)
}
