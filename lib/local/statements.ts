/**
 * DSQL's static rules for one statement, read from libpg_query's parse tree: what it is for the
 * transaction rules (DDL, DML, BEGIN, COMMIT/ROLLBACK, or neither) and whether DSQL refuses it
 * outright, with DSQL's SQLSTATE and words. Wording follows recordings of a real cluster where
 * there is one; otherwise it follows DSQL's pattern for the neighbouring cases.
 */
import { columnTypeRefusal, NO_RUNTIME, typeRef, type TypeRef } from './datatypes'
import { notSupported, settingAllowed, type SessionSettingsMode } from './settings'

/** A parse tree node: `{ NodeName: { ...fields } }`, as libpg_query's JSON output has it. */
export type Node = Record<string, unknown>
type Fields = Record<string, unknown>

export type Effect = 'ddl' | 'dml' | 'begin' | 'end' | 'other'

export interface Refusal {
  code: string
  message: string
}

export interface Judgement {
  effect: Effect
  refusal?: Refusal
}

const refuse = (message: string, code = '0A000'): Refusal => ({ code, message })
const unsupportedStatement = (node: string): Refusal => refuse(`unsupported statement: ${node.replace(/Stmt$/, '')}`)

/** Statements DSQL refuses whatever their details, answered `unsupported statement: <node>`. */
const UNSUPPORTED_NODES = new Set([
  'TruncateStmt',
  'CreateExtensionStmt',
  'AlterExtensionStmt',
  'AlterExtensionContentsStmt',
  'CreatedbStmt',
  'DropdbStmt',
  'AlterDatabaseStmt',
  'AlterDatabaseSetStmt',
  'AlterDatabaseRefreshCollStmt',
  'CreateTableSpaceStmt',
  'DropTableSpaceStmt',
  'AlterTableSpaceOptionsStmt',
  'AlterTableMoveAllStmt',
  'CreateForeignTableStmt',
  'CreateFdwStmt',
  'AlterFdwStmt',
  'CreateForeignServerStmt',
  'AlterForeignServerStmt',
  'CreateUserMappingStmt',
  'AlterUserMappingStmt',
  'DropUserMappingStmt',
  'ImportForeignSchemaStmt',
  'ListenStmt',
  'NotifyStmt',
  'UnlistenStmt',
  'AlterSystemStmt',
  'CompositeTypeStmt',
  'CreateRangeStmt',
  'CreateTableAsStmt',
  'RefreshMatViewStmt',
  'RuleStmt',
  'CreatePublicationStmt',
  'AlterPublicationStmt',
  'CreateSubscriptionStmt',
  'AlterSubscriptionStmt',
  'DropSubscriptionStmt',
  'ClusterStmt',
  'ReindexStmt',
  'CheckPointStmt',
  'LoadStmt',
  'CreateEventTrigStmt',
  'AlterEventTrigStmt',
  'CreatePLangStmt',
  'CreateConversionStmt',
  'CreateCastStmt',
  'CreateOpClassStmt',
  'CreateOpFamilyStmt',
  'AlterOpFamilyStmt',
  'CreateTransformStmt',
  'CreateAmStmt',
  'CreateStatsStmt',
  'AlterStatsStmt',
  'SecLabelStmt',
  'DoStmt',
  'LockStmt',
  'AlterCollationStmt',
  'AlterTSDictionaryStmt',
  'AlterTSConfigurationStmt',
])

/** Statements that change the catalog: DSQL allows one per transaction, never with DML. */
const DDL_NODES = new Set([
  'CreateStmt',
  'AlterTableStmt',
  'IndexStmt',
  'DropStmt',
  'ViewStmt',
  'CreateSeqStmt',
  'AlterSeqStmt',
  'CreateSchemaStmt',
  'CreateFunctionStmt',
  'AlterFunctionStmt',
  'CreateDomainStmt',
  'AlterDomainStmt',
  'RenameStmt',
  'AlterObjectSchemaStmt',
  'AlterOwnerStmt',
  'CommentStmt',
  'CreateRoleStmt',
  'AlterRoleStmt',
  'AlterRoleSetStmt',
  'DropRoleStmt',
  'GrantStmt',
  'GrantRoleStmt',
  'AlterDefaultPrivilegesStmt',
  'DropOwnedStmt',
  'ReassignOwnedStmt',
  'CreatePolicyStmt',
  'AlterPolicyStmt',
])

/** Transaction settings DSQL does not let a client change: its isolation is fixed. */
const FIXED_SETTINGS = new Set([
  'default_transaction_isolation',
  'transaction_isolation',
  'default_transaction_read_only',
  'transaction_read_only',
  'default_transaction_deferrable',
  'transaction_deferrable',
])

/** pg_advisory_lock, pg_try_advisory_xact_lock_shared, pg_advisory_unlock_all, ... */
const ADVISORY_LOCK = /^pg_(try_)?advisory_/

/** Text search functions whose first argument names a configuration; DSQL has none. */
const TEXT_SEARCH = new Set(['to_tsvector', 'to_tsquery', 'plainto_tsquery', 'phraseto_tsquery', 'websearch_to_tsquery', 'ts_headline', 'json_to_tsvector', 'jsonb_to_tsvector'])

/** The one statement node of `stmt` and its name. */
export function nodeOf(stmt: Node): [string, Fields] {
  const name = Object.keys(stmt)[0] ?? ''
  return [name, (stmt[name] ?? {}) as Fields]
}

/** `settings`: whether DSQL's allowlist of session settings applies ('dsql') or PostgreSQL's rules ('postgres'). */
export function judge(stmt: Node, settings: SessionSettingsMode = 'dsql'): Judgement {
  const [name, node] = nodeOf(stmt)
  const effect = effectOf(name, node)
  const refusal = statementRefusal(name, node, settings) ?? expressionRefusal(stmt, settings)
  return refusal ? { effect, refusal } : { effect }
}

function effectOf(name: string, node: Fields): Effect {
  if (name === 'TransactionStmt') {
    const kind = node.kind
    if (kind === 'TRANS_STMT_BEGIN' || kind === 'TRANS_STMT_START') return 'begin'
    if (kind === 'TRANS_STMT_COMMIT' || kind === 'TRANS_STMT_ROLLBACK') return 'end'
    return 'other'
  }
  if (DDL_NODES.has(name)) return 'ddl'
  if (name === 'InsertStmt' || name === 'UpdateStmt' || name === 'DeleteStmt' || name === 'MergeStmt') return 'dml'
  if (name === 'CopyStmt') return node.is_from ? 'dml' : 'other'
  if (name === 'ExplainStmt') {
    const analyze = options(node.options).some((o) => o.defname === 'analyze')
    return analyze && containsNode(node.query, DML_NAMES) ? 'dml' : 'other'
  }
  // A SELECT with a data-modifying WITH is DML.
  if (name === 'SelectStmt' && containsNode(node.withClause, DML_NAMES)) return 'dml'
  return 'other'
}

const DML_NAMES = new Set(['InsertStmt', 'UpdateStmt', 'DeleteStmt', 'MergeStmt'])

function statementRefusal(name: string, node: Fields, settings: SessionSettingsMode): Refusal | undefined {
  if (UNSUPPORTED_NODES.has(name)) return unsupportedStatement(name)
  switch (name) {
    case 'MergeStmt':
      return refuse('unsupported statement type: MERGE')
    case 'TransactionStmt':
      return transactionRefusal(node)
    case 'VariableSetStmt':
      return settingRefusal(node, settings)
    case 'VariableShowStmt':
      return ['lc_collate', 'lc_ctype'].includes(String(node.name).toLowerCase())
        ? refuse(`unrecognized configuration parameter "${String(node.name).toLowerCase()}"`, '42704')
        : undefined
    case 'CreateStmt':
      return createTableRefusal(node)
    case 'AlterTableStmt':
      return alterTableRefusal(node)
    case 'IndexStmt':
      return refuse('unsupported mode. please use CREATE INDEX ASYNC.')
    case 'CreateSeqStmt':
      return cacheRefusal(node.options, 'CREATE SEQUENCE')
    case 'AlterSeqStmt':
      return options(node.options).some((o) => o.defname === 'cache') ? cacheRefusal(node.options, 'ALTER SEQUENCE') : undefined
    case 'CreateEnumStmt':
      return refuse('CREATE TYPE not supported')
    case 'DefineStmt':
      return node.kind === 'OBJECT_TYPE' ? refuse('CREATE TYPE not supported') : unsupportedStatement(name)
    case 'AlterEnumStmt':
    case 'AlterTypeStmt':
      return refuse('ALTER TYPE not supported')
    case 'CreateTrigStmt':
      return refuse('CREATE TRIGGER not supported')
    case 'CreateFunctionStmt':
      return functionRefusal(node)
    case 'DropStmt':
      return DROPPABLE.has(String(node.removeType)) ? undefined : refuse('unsupported object in DROP statement')
    case 'RenameStmt':
      return node.renameType === 'OBJECT_TYPE' ? refuse('unsupported object in RENAME statement') : undefined
    case 'VacuumStmt':
      return node.is_vacuumcmd ? refuse('unsupported VACUUM statement') : undefined
    case 'SelectStmt':
      // SELECT ... INTO creates a table from a query: CTAS in disguise.
      return node.intoClause ? unsupportedStatement('CreateTableAsStmt') : undefined
    default:
      return undefined
  }
}

const DROPPABLE = new Set([
  'OBJECT_TABLE',
  'OBJECT_INDEX',
  'OBJECT_VIEW',
  'OBJECT_SEQUENCE',
  'OBJECT_SCHEMA',
  'OBJECT_FUNCTION',
  'OBJECT_PROCEDURE',
  'OBJECT_ROUTINE',
  'OBJECT_DOMAIN',
  'OBJECT_POLICY',
])

function transactionRefusal(node: Fields): Refusal | undefined {
  switch (node.kind) {
    case 'TRANS_STMT_BEGIN':
    case 'TRANS_STMT_START':
      return isolationRefusal(node.options)
    case 'TRANS_STMT_SAVEPOINT':
      return refuse('unsupported transaction statement: SAVEPOINT')
    case 'TRANS_STMT_RELEASE':
      return refuse('unsupported transaction statement: RELEASE')
    case 'TRANS_STMT_ROLLBACK_TO':
      return refuse('unsupported transaction statement: ROLLBACK TO')
    case 'TRANS_STMT_PREPARE':
      return refuse('unsupported transaction statement: PREPARE TRANSACTION')
    case 'TRANS_STMT_COMMIT_PREPARED':
      return refuse('unsupported transaction statement: COMMIT PREPARED')
    case 'TRANS_STMT_ROLLBACK_PREPARED':
      return refuse('unsupported transaction statement: ROLLBACK PREPARED')
    default:
      return undefined
  }
}

/** DSQL runs every transaction at repeatable read; asking for another level is refused. */
function isolationRefusal(list: unknown): Refusal | undefined {
  const level = options(list).find((o) => o.defname === 'transaction_isolation')
  const value = level ? constString(level.arg) : undefined
  if (value === undefined || value === 'repeatable read') return undefined
  return refuse(`Unsupported isolation level: ${value.toUpperCase()}`)
}

/**
 * SET, SET LOCAL, RESET: DSQL accepts only the parameters of its allowlist (settings.ts). RESET
 * ALL changes nothing DSQL has not allowed, so it passes (a guess: not recorded).
 */
function settingRefusal(node: Fields, settings: SessionSettingsMode): Refusal | undefined {
  const name = String(node.name ?? '')
  if (name === 'TRANSACTION' || name === 'SESSION CHARACTERISTICS') return isolationRefusal(node.args) ?? notSupported(name)
  const lower = name.toLowerCase()
  // Isolation is fixed and the stand-in's own bookkeeping (row counts, limits) is not the
  // client's to change, whatever the mode.
  if (FIXED_SETTINGS.has(lower) || lower.startsWith('dsql_local.')) return notSupported(lower)
  if (settings === 'postgres' || node.kind === 'VAR_RESET_ALL' || settingAllowed(lower)) return undefined
  return notSupported(lower)
}

function createTableRefusal(node: Fields): Refusal | undefined {
  const relation = (node.relation ?? {}) as Fields
  if (relation.relpersistence === 't') return refuse('TEMPORARY or TEMP table not supported for CREATE TABLE')
  if (relation.relpersistence === 'u') return refuse('UNLOGGED table not supported for CREATE TABLE')
  for (const element of list(node.tableElts)) {
    const [kind, column] = nodeOf(element)
    if (kind !== 'ColumnDef') continue
    const refusal = columnRefusal(column)
    if (refusal) return refusal
  }
  return undefined
}

/** A column of CREATE TABLE: its type, and an identity column's type and sequence cache. */
function columnRefusal(column: Fields): Refusal | undefined {
  const type = columnType(column)
  if (type) {
    const refusal = columnTypeRefusal(type)
    if (refusal) return refusal
  }
  const identity = constraints(column).find((c) => c.contype === 'CONSTR_IDENTITY')
  if (!identity) return undefined
  if (type && !type.array && !type.qualified && type.sql !== 'bigint' && ['smallint', 'integer'].includes(type.sql))
    return refuse(`datatype ${type.sql} not supported, identity column type must be bigint`)
  return cacheRefusal(identity.options, 'identity column')
}

/** DSQL wants CACHE 1 or CACHE >= 65536 written out on every sequence, identity columns included. */
function cacheRefusal(list: unknown, what: 'CREATE SEQUENCE' | 'ALTER SEQUENCE' | 'identity column'): Refusal | undefined {
  const cache = options(list).find((o) => o.defname === 'cache')
  const value = cache ? constNumber(cache.arg) : undefined
  if (value !== undefined && (value === 1 || value >= 65536)) return undefined
  return refuse(`${what} is not supported without an explicit cache size. please define CACHE greater than or equal to 65536 or equal to 1`)
}

function alterTableRefusal(node: Fields): Refusal | undefined {
  for (const cmd of list(node.cmds)) {
    const [, command] = nodeOf(cmd)
    const refusal = alterCommandRefusal(command)
    if (refusal) return refusal
  }
  return undefined
}

function alterCommandRefusal(command: Fields): Refusal | undefined {
  const def = (command.def ?? {}) as Node
  switch (command.subtype) {
    case 'AT_AddColumn': {
      const [, column] = nodeOf(def)
      // Any constraint on a new column (DEFAULT, NOT NULL, identity, CHECK, UNIQUE) is refused
      // first, before its type is looked at.
      if (constraints(column).length) return refuse('ALTER TABLE ADD COLUMN with constraint not supported')
      const type = columnType(column)
      return type ? columnTypeRefusal(type) : undefined
    }
    case 'AT_AddConstraint': {
      const [, constraint] = nodeOf(def)
      const kind = constraint.contype
      // Keys only by adopting an existing index; CHECK and FOREIGN KEY only as NOT VALID.
      const ok =
        ((kind === 'CONSTR_PRIMARY' || kind === 'CONSTR_UNIQUE') && Boolean(constraint.indexname)) ||
        ((kind === 'CONSTR_FOREIGN' || kind === 'CONSTR_CHECK') && Boolean(constraint.skip_validation))
      return ok ? undefined : refuse('unsupported ALTER TABLE ADD CONSTRAINT statement')
    }
    case 'AT_ValidateConstraint':
      return refuse('unsupported ALTER TABLE VALIDATE CONSTRAINT statement')
    case 'AT_AlterColumnType':
      return refuse('unsupported ALTER TABLE ALTER COLUMN ... SET DATA TYPE statement')
    case 'AT_AddInherit':
    case 'AT_DropInherit':
    case 'AT_AttachPartition':
    case 'AT_DetachPartition':
    case 'AT_SetLogged':
    case 'AT_SetUnLogged':
    case 'AT_EnableTrig':
    case 'AT_DisableTrig':
    case 'AT_EnableTrigAll':
    case 'AT_DisableTrigAll':
    case 'AT_EnableTrigUser':
    case 'AT_DisableTrigUser':
      return refuse(`unsupported ALTER TABLE statement`)
    default:
      return undefined
  }
}

function functionRefusal(node: Fields): Refusal | undefined {
  const language = options(node.options).find((o) => o.defname === 'language')
  const name = language ? constString(language.arg) : undefined
  // A body in BEGIN ATOMIC ... END (sql_body) is SQL whatever LANGUAGE says.
  if (name === undefined || name === 'sql' || node.sql_body) return undefined
  return refuse(`CREATE ${node.is_procedure ? 'PROCEDURE' : 'FUNCTION'} with language ${name} not supported`)
}

/** Refusals found anywhere in a statement: locking clauses, TABLESAMPLE, unsupported types and functions. */
function expressionRefusal(stmt: Node, settings: SessionSettingsMode): Refusal | undefined {
  let found: Refusal | undefined
  walk(stmt, (name, node) => {
    if (found) return
    if (name === 'LockingClause' && node.strength !== 'LCS_FORUPDATE' && node.strength !== 'LCS_FORKEYSHARE')
      found = refuse('locking clauses other than FOR UPDATE/FOR KEY SHARE are not supported')
    else if (name === 'RangeTableSample') found = refuse('TABLESAMPLE clause not supported')
    else if (name === 'TypeCast') {
      const type = typeOfNode(node.typeName)
      if (type && !type.qualified && NO_RUNTIME.has(type.sql)) found = refuse(`datatype ${type.sql} not supported`)
    } else if (name === 'FuncCall') found = functionCallRefusal(node, settings)
  })
  return found
}

function functionCallRefusal(node: Fields, settings: SessionSettingsMode): Refusal | undefined {
  const names = list(node.funcname).map(stringValue)
  const qualified = names.length > 1 && names[0] !== 'pg_catalog'
  const fn = names[names.length - 1] ?? ''
  if (qualified) return undefined
  // DSQL has no advisory locks: golang-migrate's users met "function pg_advisory_lock not supported".
  if (ADVISORY_LOCK.test(fn)) return refuse(`function ${fn} not supported`)
  if (fn === 'set_config') {
    // A name known only at run time (a parameter, an expression) is left to PostgreSQL.
    const setting = constString(list(node.args)[0])?.toLowerCase()
    if (setting !== undefined && (FIXED_SETTINGS.has(setting) || setting.startsWith('dsql_local.') || (settings === 'dsql' && !settingAllowed(setting))))
      return notSupported(setting)
  }
  // line(...), circle(...): function-style casts to geometric types.
  if (NO_RUNTIME.has(fn)) return refuse(`datatype ${fn} not supported`)
  const args = list(node.args)
  if (TEXT_SEARCH.has(fn) && args.length >= 2) {
    const config = constString(args[0])
    if (config !== undefined) return refuse(`text search configuration "${config}" does not exist`, '42704')
  }
  return undefined
}

/** Calls `visit` for every node (`{ Name: fields }`) in the tree. */
export function walk(value: unknown, visit: (name: string, node: Fields) => void): void {
  if (Array.isArray(value)) {
    for (const item of value) walk(item, visit)
    return
  }
  if (!value || typeof value !== 'object') return
  for (const [key, child] of Object.entries(value as Fields)) {
    if (child && typeof child === 'object' && !Array.isArray(child) && /^[A-Z]/.test(key)) visit(key, child as Fields)
    walk(child, visit)
  }
}

function containsNode(value: unknown, names: Set<string>): boolean {
  let found = false
  walk(value, (name) => (found ||= names.has(name)))
  return found
}

const list = (value: unknown): Node[] => (Array.isArray(value) ? (value as Node[]) : [])

function options(value: unknown): { defname: string; arg: unknown }[] {
  return list(value).map((item) => {
    const def = (item.DefElem ?? {}) as Fields
    return { defname: String(def.defname ?? ''), arg: def.arg }
  })
}

function constraints(column: Fields): Fields[] {
  return list(column.constraints).map((c) => (c.Constraint ?? {}) as Fields)
}

function columnType(column: Fields): TypeRef | undefined {
  return typeOfNode(column.typeName)
}

function typeOfNode(value: unknown): TypeRef | undefined {
  if (!value || typeof value !== 'object') return undefined
  const type = value as Fields
  const names = list(type.names).map(stringValue)
  if (!names.length) return undefined
  return typeRef(names, list(type.arrayBounds).length > 0)
}

/** The text of a String node (`{ String: { sval } }`). */
export function stringValue(node: Node): string {
  const s = node.String as Fields | undefined
  return String(s?.sval ?? '')
}

/** A string constant: an A_Const with sval, or a String node. */
export function constString(value: unknown): string | undefined {
  if (!value || typeof value !== 'object') return undefined
  const node = value as Fields
  if (node.String) return stringValue(node)
  const a = node.A_Const as Fields | undefined
  const sval = a?.sval as Fields | undefined
  return sval ? String(sval.sval ?? '') : undefined
}

/** An integer option value: Integer ({} when 0, protobuf leaves defaults out), A_Const, or Float text. */
function constNumber(value: unknown): number | undefined {
  if (!value || typeof value !== 'object') return undefined
  const node = value as Fields
  if (node.Integer) return Number((node.Integer as Fields).ival ?? 0)
  if (node.Float) return Number((node.Float as Fields).fval)
  const a = node.A_Const as Fields | undefined
  if (a?.ival) return Number((a.ival as Fields).ival ?? 0)
  return undefined
}
