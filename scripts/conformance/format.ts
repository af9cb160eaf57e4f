/**
 * Values as the golden recordings show them. The recorder was a Go program (pgx): it decoded
 * each value to a Go type and printed it with %v, so a uuid reads "[0 0 ... 170]" (its bytes),
 * an array or a record "[1 2 3]", a boolean "true", an inet "127.0.0.1/32", a null "NULL". This
 * turns PostgreSQL's text output, by column type, into the same spelling.
 */

const BOOL = 16
const UUID = 2950
const INET = 869
const RECORD = 2249
const TIMESTAMPTZ = 1184
/** Array types of the built-in types the recordings use. */
const ARRAYS = new Set([1000, 1005, 1007, 1009, 1014, 1015, 1016, 1021, 1022, 1231, 2951, 1182, 1115, 1185, 199, 3807])

export function formatValue(value: string | null, type: number): string {
  if (value === null) return 'NULL'
  if (type === BOOL) return value === 't' ? 'true' : 'false'
  if (type === UUID) return `[${Array.from(Buffer.from(value.replace(/-/g, ''), 'hex')).join(' ')}]`
  if (type === INET) return value.includes('/') ? value : `${value}/${value.includes(':') ? 128 : 32}`
  if (type === RECORD) return `[${splitComposite(value.slice(1, -1)).join(' ')}]`
  if (ARRAYS.has(type)) return `[${splitComposite(value.slice(1, -1)).join(' ')}]`
  if (type === TIMESTAMPTZ) return new Date(value.replace(' ', 'T').replace(/([+-]\d\d)$/, '$1:00')).toISOString().replace('.000Z', 'Z')
  return value
}

/** Elements of an array or record literal body: comma-separated, double quotes and backslashes unescaped. */
function splitComposite(body: string): string[] {
  if (body === '') return []
  const out: string[] = []
  let current = ''
  let quoted = false
  for (let i = 0; i < body.length; i++) {
    const c = body[i]
    if (quoted && c === '\\') current += body[++i] ?? ''
    else if (c === '"' && quoted && body[i + 1] === '"') {
      current += '"'
      i++
    } else if (c === '"') quoted = !quoted
    else if (c === ',' && !quoted) {
      out.push(current)
      current = ''
    } else current += c
  }
  out.push(current)
  return out
}
