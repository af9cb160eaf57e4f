/**
 * A small SQL tokenizer for what libpg_query cannot see: DSQL's own syntax (`CREATE INDEX
 * ASYNC`, `ALTER TABLE ASYNC`, `AWS IAM GRANT`), which PostgreSQL's grammar refuses, and so
 * the statement boundaries of a query that holds such a statement. It knows PostgreSQL's lexical
 * rules (quoted identifiers, '' / E'' / $tag$ strings, nested comments) so that a `;` or a
 * keyword inside a string or comment is never taken for one. Classification itself is always
 * done on libpg_query's parse tree; this only finds tokens and boundaries.
 */

export interface Token {
  /** 'word': unquoted identifier or keyword (value lower-cased); 'ident': "quoted"; 'string': a literal (value unescaped). */
  kind: 'word' | 'ident' | 'string' | 'number' | 'param' | 'op'
  value: string
  start: number
  end: number
}

const WORD_START = /[A-Za-z_\u0080-\uffff]/
const WORD_PART = /[A-Za-z0-9_$\u0080-\uffff]/
const OP_CHARS = '+-*/<>=~!@#%^&|`?'

export function tokenize(sql: string): Token[] {
  const tokens: Token[] = []
  let i = 0
  const n = sql.length
  while (i < n) {
    const c = sql[i]
    const start = i
    if (/\s/.test(c)) {
      i++
    } else if (c === '-' && sql[i + 1] === '-') {
      while (i < n && sql[i] !== '\n') i++
    } else if (c === '/' && sql[i + 1] === '*') {
      // Comments nest in PostgreSQL.
      let depth = 0
      while (i < n) {
        if (sql[i] === '/' && sql[i + 1] === '*') {
          depth++
          i += 2
        } else if (sql[i] === '*' && sql[i + 1] === '/') {
          i += 2
          if (--depth === 0) break
        } else i++
      }
    } else if (c === "'" || ((c === 'E' || c === 'e') && sql[i + 1] === "'")) {
      const escapes = c !== "'"
      i += escapes ? 2 : 1
      let value = ''
      while (i < n) {
        if (escapes && sql[i] === '\\' && i + 1 < n) {
          value += sql[i + 1]
          i += 2
        } else if (sql[i] === "'" && sql[i + 1] === "'") {
          value += "'"
          i += 2
        } else if (sql[i] === "'") {
          i++
          break
        } else value += sql[i++]
      }
      tokens.push({ kind: 'string', value, start, end: i })
    } else if (c === '"') {
      i++
      let value = ''
      while (i < n) {
        if (sql[i] === '"' && sql[i + 1] === '"') {
          value += '"'
          i += 2
        } else if (sql[i] === '"') {
          i++
          break
        } else value += sql[i++]
      }
      tokens.push({ kind: 'ident', value, start, end: i })
    } else if (c === '$' && /[0-9]/.test(sql[i + 1] ?? '')) {
      i++
      while (i < n && /[0-9]/.test(sql[i])) i++
      tokens.push({ kind: 'param', value: sql.slice(start, i), start, end: i })
    } else if (c === '$') {
      // $tag$ ... $tag$ (a tag is empty or an identifier without '$').
      let j = i + 1
      while (j < n && WORD_PART.test(sql[j]) && sql[j] !== '$') j++
      if (sql[j] === '$') {
        const tag = sql.slice(i, j + 1)
        const close = sql.indexOf(tag, j + 1)
        const stop = close < 0 ? n : close
        tokens.push({ kind: 'string', value: sql.slice(j + 1, stop), start, end: close < 0 ? n : close + tag.length })
        i = close < 0 ? n : close + tag.length
      } else {
        i++
        tokens.push({ kind: 'op', value: '$', start, end: i })
      }
    } else if (WORD_START.test(c)) {
      while (i < n && WORD_PART.test(sql[i])) i++
      tokens.push({ kind: 'word', value: sql.slice(start, i).toLowerCase(), start, end: i })
    } else if (/[0-9]/.test(c) || (c === '.' && /[0-9]/.test(sql[i + 1] ?? ''))) {
      while (i < n && /[0-9.eE_]/.test(sql[i])) i++
      tokens.push({ kind: 'number', value: sql.slice(start, i), start, end: i })
    } else if (OP_CHARS.includes(c)) {
      while (i < n && OP_CHARS.includes(sql[i])) i++
      tokens.push({ kind: 'op', value: sql.slice(start, i), start, end: i })
    } else {
      i++
      tokens.push({ kind: 'op', value: c, start, end: i })
    }
  }
  return tokens
}

/** Source ranges of the statements of `sql`, split at top-level semicolons; empty ones dropped. */
export function splitStatements(sql: string): { start: number; end: number; tokens: Token[] }[] {
  const out: { start: number; end: number; tokens: Token[] }[] = []
  let current: Token[] = []
  let depth = 0
  const flush = () => {
    if (current.length) out.push({ start: current[0].start, end: current[current.length - 1].end, tokens: current })
    current = []
  }
  for (const token of tokenize(sql)) {
    if (token.kind === 'op' && token.value === '(') depth++
    if (token.kind === 'op' && token.value === ')') depth = Math.max(0, depth - 1)
    if (token.kind === 'op' && token.value === ';' && depth === 0) flush()
    else current.push(token)
  }
  flush()
  return out
}

/** True when the tokens start with these words (unquoted, case-insensitive). */
export function startsWith(tokens: Token[], ...words: string[]): boolean {
  return words.every((word, i) => tokens[i]?.kind === 'word' && tokens[i].value === word)
}
