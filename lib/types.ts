import { dirname, join } from 'node:path'

/**
 * PostgreSQL 16's built-in element type oid -> array type oid. DSQL has no user-defined base
 * types, so this replaces postgres.js's per-connection `pg_type` query (about 3.6 round trips).
 */
const ARRAY_TYPES: ReadonlyArray<readonly [number, number]> = [
  [16, 1000], [17, 1001], [18, 1002], [19, 1003], [20, 1016], [21, 1005], [22, 1006], [23, 1007],
  [24, 1008], [25, 1009], [26, 1028], [27, 1010], [28, 1011], [29, 1012], [30, 1013], [114, 199],
  [142, 143], [600, 1017], [601, 1018], [602, 1019], [603, 1020], [604, 1027], [628, 629],
  [650, 651], [700, 1021], [701, 1022], [718, 719], [774, 775], [790, 791], [829, 1040], [869, 1041],
  [1033, 1034], [1042, 1014], [1043, 1015], [1082, 1182], [1083, 1183], [1114, 1115], [1184, 1185],
  [1186, 1187], [1266, 1270], [1560, 1561], [1562, 1563], [1700, 1231], [1790, 2201], [2202, 2207],
  [2203, 2208], [2204, 2209], [2205, 2210], [2206, 2211], [2275, 1263], [2950, 2951], [2970, 2949],
  [3220, 3221], [3614, 3643], [3615, 3645], [3642, 3644], [3734, 3735], [3769, 3770], [3802, 3807],
  [3904, 3905], [3906, 3907], [3908, 3909], [3910, 3911], [3912, 3913], [3926, 3927], [4072, 4073],
  [4089, 4090], [4096, 4097], [4191, 4192], [4451, 6150], [4532, 6151], [4533, 6152], [4534, 6153],
  [4535, 6155], [4536, 6157], [5038, 5039], [5069, 271],
]

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
    const parse: Handler = (xs: never) => found.arrayParser(xs, parser, typarray)
    parse.array = true
    options.parsers[typarray] = parse
    options.serializers[typarray] = (xs: never) => found.arraySerializer(xs, options.serializers[oid], options, typarray)
  }
}
