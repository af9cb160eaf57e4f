/**
 * Migration files: `*.sql` in one directory, in lexicographic order, split into statements with
 * the stand-in's SQL tokenizer (so a `;` in a string, a dollar quote or a comment never splits).
 * A statement is the unit the ledger records, except a block the file wraps in BEGIN ... COMMIT,
 * which runs as one transaction and is recorded as one.
 */
import { createHash } from 'node:crypto'
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { startsWith, tokenize, type Token } from '../local/lexer'
import { MigrationError } from './errors'

export interface Statement {
  /** The statement's text, without the `;` and the comments around it. */
  text: string
  /** 1-based line in the file where it starts. */
  line: number
  tokens: Token[]
}

/** What runs as one transaction and is recorded as one ledger row. */
export interface Unit {
  /** 1-based, counting a BEGIN ... COMMIT block as one. */
  number: number
  line: number
  /** One statement, or BEGIN, the block's statements and COMMIT. */
  statements: Statement[]
  block: boolean
  checksum: string
}

export interface MigrationFile {
  name: string
  units: Unit[]
}

export function readMigrations(dir: string): MigrationFile[] {
  const path = resolve(dir)
  if (!existsSync(path) || !statSync(path).isDirectory())
    throw new MigrationError('MIGRATE_FILES', `No migrations directory at ${path}: create it and put *.sql files in it, or pass another directory.`)
  const names = readdirSync(path)
    .filter((name) => name.endsWith('.sql') && !name.startsWith('.'))
    .sort()
  return names.map((name) => ({ name, units: units(name, splitSql(normalized(readFileSync(join(path, name), 'utf8')))) }))
}

/**
 * The file as a Linux checkout has it: a Windows checkout (CRLF line ends, an editor's byte order
 * mark) must apply the same statements with the same checksums, or a deploy from one would
 * refuse what a deploy from the other applied.
 */
function normalized(text: string): string {
  return text.replace(/^\uFEFF/, '').replace(/\r\n/g, '\n')
}

/** The statements of a SQL script, as psql would send them. */
export function splitSql(sql: string): Statement[] {
  const out: Statement[] = []
  let current: Token[] = []
  let parens = 0
  // BEGIN ATOMIC ... END bodies (SQL functions) hold semicolons; CASE ... END nests inside them.
  let atomic = 0
  const flush = () => {
    if (!current.length) return
    const start = current[0].start
    out.push({ text: sql.slice(start, current[current.length - 1].end), line: lineAt(sql, start), tokens: current })
    current = []
  }
  const tokens = tokenize(sql)
  tokens.forEach((token, i) => {
    const word = token.kind === 'word' ? token.value : undefined
    if (token.kind === 'op' && token.value === '(') parens++
    else if (token.kind === 'op' && token.value === ')') parens = Math.max(0, parens - 1)
    else if (word === 'begin' && tokens[i + 1]?.kind === 'word' && tokens[i + 1].value === 'atomic') atomic++
    else if (atomic && word === 'case') atomic++
    else if (atomic && word === 'end') atomic--
    if (token.kind === 'op' && token.value === ';' && parens === 0 && atomic === 0) flush()
    else current.push(token)
  })
  flush()
  return out
}

function lineAt(text: string, offset: number): number {
  let line = 1
  for (let i = 0; i < offset; i++) if (text.charCodeAt(i) === 10) line++
  return line
}

const isBegin = (t: Token[]) => (startsWith(t, 'begin') && t[1]?.value !== 'atomic') || startsWith(t, 'start', 'transaction')
const isEnd = (t: Token[]) => startsWith(t, 'commit') || startsWith(t, 'end') || startsWith(t, 'rollback') || startsWith(t, 'abort')

/** Groups a file's statements into units: single statements, and BEGIN ... COMMIT blocks. */
function units(file: string, statements: Statement[]): Unit[] {
  const out: Unit[] = []
  let block: Statement[] | undefined
  const push = (list: Statement[], isBlock: boolean) =>
    out.push({ number: out.length + 1, line: list[0].line, statements: list, block: isBlock, checksum: checksum(list) })
  for (const statement of statements) {
    if (isBegin(statement.tokens)) {
      if (block) throw new MigrationError('MIGRATE_FILES', `${file}:${statement.line}: BEGIN inside the block that starts at line ${block[0].line}: end that block with COMMIT first.`, { file, line: statement.line })
      block = [statement]
    } else if (isEnd(statement.tokens)) {
      if (!block) throw new MigrationError('MIGRATE_FILES', `${file}:${statement.line}: ${statement.tokens[0].value.toUpperCase()} without BEGIN: each statement already runs in its own transaction, so remove it.`, { file, line: statement.line })
      push([...block, statement], true)
      block = undefined
    } else if (block) block.push(statement)
    else push([statement], false)
  }
  if (block) throw new MigrationError('MIGRATE_FILES', `${file}:${block[0].line}: BEGIN without COMMIT: end the block with COMMIT.`, { file, line: block[0].line })
  return out
}

/** Of the statement texts only: comments and blank lines around statements may change freely. */
function checksum(statements: Statement[]): string {
  const hash = createHash('sha256')
  for (const s of statements) hash.update(s.text).update('\0')
  return hash.digest('hex')
}

/** The first line of a unit's text, shortened, for plans and messages. */
export function summary(unit: Unit, width = 72): string {
  const first = unit.statements[unit.block ? 1 : 0] ?? unit.statements[0]
  const text = first.text.replace(/\s+/g, ' ')
  const short = text.length > width ? text.slice(0, width - 1) + '…' : text
  return unit.block ? `BEGIN; ${short} ...; COMMIT (${unit.statements.length - 2} statements)` : short
}
