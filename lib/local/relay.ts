/**
 * The message-level relay of one session, with the DSQL dialect on: reads whole protocol
 * messages both ways and changes only what DSQL would answer differently.
 *
 * Client to server: each statement (a simple Query, each of its statements, a Parse, a Bind) is
 * classified (dialect.ts) and judged against the transaction rules (transaction.ts). A refused
 * statement is replaced by a "poison" that PostgreSQL fails at the same point of the protocol
 * (a query on a relation that does not exist, a Bind of a statement that does not exist), so
 * PostgreSQL itself aborts the transaction, skips to Sync, answers 25P02 afterwards and turns a
 * later COMMIT into ROLLBACK, in both protocols. Its error is then replaced by DSQL's.
 *
 * Server to client: errors are rewritten (refusals, OCC conflicts, the stand-in's own internal
 * context), CommandComplete tags of rewritten statements become DSQL's, and server_version
 * becomes DSQL's. To know which statement an answer belongs to, the relay keeps the queue of
 * what is in flight: simple queries, Executes and Syncs, in order.
 */
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { Frames } from '../wire'
import { asConflict, withoutInternals } from './conflicts'
import { SERVER_VERSION, type Dialect, type Statement } from './dialect'
import {
  bindMessage,
  commandComplete,
  errorFieldsOf,
  errorFromFields,
  executePortal,
  parameterStatus,
  parseMessage,
  queryMessage,
  queryText,
  readBind,
  readParameterStatus,
  readParse,
  targetOf,
  transactionStatus,
  typeOf,
} from './frames'
import { errorResponse } from './protocol'
import type { Refusal } from './statements'
import { RESULT_TOO_LARGE, TransactionRules, type TransactionLimits } from './transaction'

export interface DialectSettings {
  dialect: Dialect
  limits: TransactionLimits
}

/** One statement's answer in flight; `statement` is undefined for one the relay knows nothing about. */
interface Unit {
  statement?: Statement
}

type Pending = { kind: 'query'; units: Unit[]; next: number } | { kind: 'execute'; unit: Unit } | { kind: 'sync' }

const POISON = 'dsql_local refusal '

export class DialectSession {
  private readonly rules: TransactionRules
  private readonly pending: Pending[] = []
  /** Prepared statements and portals by name, as classified when they were parsed and bound. */
  private readonly statements = new Map<string, Statement>()
  private readonly portals = new Map<string, Statement | undefined>()
  private readonly refusals = new Map<string, Refusal>()
  private nextRefusal = 1
  /** Bytes of DataRows of the statement answering now; past the limit, its answer becomes an error. */
  private resultBytes = 0
  /** A result was cut off: what PostgreSQL still sends up to ReadyForQuery is dropped. */
  private cutOff = false

  constructor(
    private readonly settings: DialectSettings,
    private readonly now: () => number = Date.now,
  ) {
    this.rules = new TransactionRules(settings.limits)
  }

  /** What to send to PostgreSQL for these whole client messages. */
  fromClient(messages: Buffer[]): Buffer {
    const out: Buffer[] = []
    for (const message of messages) {
      switch (typeOf(message)) {
        case 'Q':
          out.push(this.query(message))
          break
        case 'P':
          out.push(this.parse(message))
          break
        case 'B':
          out.push(this.bind(message))
          break
        case 'E':
          this.pending.push({ kind: 'execute', unit: { statement: this.portals.get(executePortal(message)) } })
          out.push(message)
          break
        case 'S':
          this.rules.endImplicit()
          this.pending.push({ kind: 'sync' })
          out.push(message)
          break
        case 'F':
          // FunctionCall: answered with FunctionCallResponse or an error, then ReadyForQuery.
          this.pending.push({ kind: 'sync' })
          out.push(message)
          break
        case 'C': {
          const { kind, name } = targetOf(message)
          if (kind === 'S') this.statements.delete(name)
          else this.portals.delete(name)
          out.push(message)
          break
        }
        default:
          out.push(message)
      }
    }
    return Buffer.concat(out)
  }

  /** What to send to the client for these whole server messages. */
  fromServer(messages: Buffer[]): Buffer {
    const out: Buffer[] = []
    for (const message of messages) {
      const type = typeOf(message)
      if (this.cutOff && type !== 'Z') continue
      switch (type) {
        case 'D':
          this.resultBytes += message.length
          if (this.resultBytes > this.settings.limits.maxResultBytes) {
            // PostgreSQL runs the statement to its end; the client gets DSQL's error in its place.
            // (The transaction is not failed by it, unlike on DSQL: README, "guessed".)
            this.fail()
            this.cutOff = true
            out.push(errorResponse({ severity: 'ERROR', ...RESULT_TOO_LARGE }))
          } else out.push(message)
          break
        case 'E':
          this.resultBytes = 0
          out.push(this.error(message))
          break
        case 'N': {
          const unit = this.currentUnit()
          out.push(unit?.statement?.internal ? errorFromFields(withoutInternals(errorFieldsOf(message)), 'N') : message)
          break
        }
        case 'C': {
          this.resultBytes = 0
          const tag = this.complete()?.statement?.tag
          out.push(tag ? commandComplete(tag) : message)
          break
        }
        case 'I':
        case 's':
          this.resultBytes = 0
          this.complete()
          out.push(message)
          break
        case 'Z':
          this.resultBytes = 0
          this.cutOff = false
          this.ready(transactionStatus(message))
          out.push(message)
          break
        case 'S':
          out.push(serverParameter(message))
          break
        default:
          out.push(message)
      }
    }
    return Buffer.concat(out)
  }

  private query(message: Buffer): Buffer {
    const { statements } = this.settings.dialect.classify(queryText(message))
    const units: Unit[] = []
    let changed = false
    const parts: string[] = []
    // Unparsable text goes as it is: PostgreSQL answers with its syntax error and runs nothing.
    for (const statement of statements ?? []) {
      const refusal = this.rules.admit(statement, this.now())
      if (refusal) {
        // Statements after a failing one never run in a simple query: they are dropped.
        parts.push(`SELECT FROM ${this.poison(refusal)}`)
        units.push({})
        changed = true
        break
      }
      parts.push(statement.rewrite ?? statement.text)
      changed ||= statement.rewrite !== undefined
      units.push({ statement })
    }
    this.rules.endImplicit()
    this.pending.push({ kind: 'query', units, next: 0 })
    return changed ? queryMessage(parts.join(';')) : message
  }

  private parse(message: Buffer): Buffer {
    const parse = readParse(message)
    const { statements } = this.settings.dialect.classify(parse.query)
    if (!statements || statements.length !== 1) {
      // Several statements or none, or a syntax error: PostgreSQL answers for itself.
      this.statements.delete(parse.name)
      return message
    }
    const [statement] = statements
    if (statement.refusal) {
      this.statements.delete(parse.name)
      const refusal = this.rules.admit(statement, this.now()) ?? statement.refusal
      return parseMessage({ name: parse.name, query: `SELECT FROM ${this.poison(refusal)}`, params: Buffer.alloc(2) })
    }
    this.statements.set(parse.name, statement)
    return statement.rewrite ? parseMessage({ ...parse, query: statement.rewrite }) : message
  }

  /** Transaction rules apply when a statement runs, and a prepared one may run in any transaction: so at Bind. */
  private bind(message: Buffer): Buffer {
    const { portal, statement: name } = readBind(message)
    const statement = this.statements.get(name)
    if (!statement) {
      this.portals.set(portal, undefined)
      return message
    }
    const refusal = this.rules.admit(statement, this.now())
    if (refusal) {
      this.portals.delete(portal)
      // The Bind names a statement that does not exist: PostgreSQL fails it and skips to Sync.
      return bindMessage(portal, this.poison(refusal).slice(1, -1))
    }
    this.portals.set(portal, statement)
    return message
  }

  /** A quoted name that exists nowhere, remembered with the error DSQL answers in its place. */
  private poison(refusal: Refusal): string {
    const id = String(this.nextRefusal++)
    this.refusals.set(id, refusal)
    return `"${POISON}${id}"`
  }

  private error(message: Buffer): Buffer {
    const fields = errorFieldsOf(message)
    const unit = this.fail()
    const marker = fields.M?.indexOf(POISON) ?? -1
    if (marker >= 0) {
      const id = fields.M.slice(marker + POISON.length).replace(/".*$/, '')
      const refusal = this.refusals.get(id)
      if (refusal) {
        this.refusals.delete(id)
        return errorResponse({ severity: 'ERROR', code: refusal.code, message: refusal.message })
      }
    }
    const conflict = asConflict(fields)
    if (conflict) return errorFromFields(conflict)
    if (fields.s === 'dsql_local' || unit?.statement?.internal) return errorFromFields(withoutInternals(fields))
    return message
  }

  /** The unit an answer now arriving belongs to, without consuming it. */
  private currentUnit(): Unit | undefined {
    const head = this.pending[0]
    if (head?.kind === 'query') return head.units[head.next]
    return head?.kind === 'execute' ? head.unit : undefined
  }

  /** A statement completed (CommandComplete, EmptyQueryResponse, PortalSuspended): its unit. */
  private complete(): Unit | undefined {
    const head = this.pending[0]
    if (head?.kind === 'query') return head.units[head.next++]
    if (head?.kind === 'execute') {
      this.pending.shift()
      return head.unit
    }
    return undefined
  }

  /** An error: in a simple query it ends the query; in the extended protocol everything up to Sync is skipped. */
  private fail(): Unit | undefined {
    const head = this.pending[0]
    if (head?.kind === 'query') {
      const unit = head.units[head.next]
      head.next = head.units.length
      return unit
    }
    let first: Unit | undefined
    while (this.pending[0]?.kind === 'execute') {
      const skipped = this.pending.shift() as { kind: 'execute'; unit: Unit }
      first ??= skipped.unit
    }
    return first
  }

  private ready(status: string): void {
    while (this.pending.length && this.pending[0].kind === 'execute') this.pending.shift()
    this.pending.shift()
    if (this.pending.length === 0) {
      this.rules.settle(status, this.now())
      this.refusals.clear()
    }
  }
}

/** DSQL reports its own server_version. */
export function serverParameter(message: Buffer): Buffer {
  const [name] = readParameterStatus(message)
  return name === 'server_version' ? parameterStatus(name, SERVER_VERSION) : message
}

/**
 * Relays a session through `session`: whole messages each way, with backpressure (a side whose
 * peer cannot keep up is paused until the peer drains).
 */
export function relayMessages(client: Duplex, server: Socket, session: DialectSession): void {
  const fromClient = new Frames()
  const fromServer = new Frames()
  client.on('data', (chunk: Buffer) => {
    const out = session.fromClient(fromClient.push(chunk))
    if (out.length && !server.write(out)) client.pause()
  })
  server.on('data', (chunk: Buffer) => {
    const out = session.fromServer(fromServer.push(chunk))
    if (out.length && !client.write(out)) server.pause()
  })
  server.on('drain', () => client.resume())
  client.on('drain', () => server.resume())
}
