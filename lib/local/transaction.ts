/**
 * DSQL's transaction rules, decided per statement as the client sends it: one DDL statement per
 * transaction, never DDL and DML together, and a maximum transaction age. The relay keeps one
 * of these per session and tells it what PostgreSQL reported (ReadyForQuery) whenever nothing
 * else is in flight, so a misprediction never outlives the next idle moment.
 *
 * Row and size limits are enforced inside PostgreSQL (catalog.ts), where the rows are counted.
 */
import type { Statement } from './dialect'
import type { Refusal } from './statements'

export interface TransactionLimits {
  /** DSQL: 300 s. */
  maxAgeMs: number
  /**
   * Bytes of rows one statement may answer (DSQL: 128 MiB of memory per query; a result this
   * large is where a test meets it). Checked by the relay as the rows go through.
   */
  maxResultBytes: number
}

export const MAX_RESULT_BYTES = 128 * 1024 * 1024
/** A guess between two texts: AWS's quota page gives 53200 "query requires too much temp space, out of memory."; a cluster observed in 2026 answered this. */
export const RESULT_TOO_LARGE = { code: '54000', message: 'query requires more than allowed temp space of 131072 KB to execute' }

export class TransactionRules {
  /** Inside BEGIN ... COMMIT/ROLLBACK (else: an implicit transaction, one query or one Sync's worth). */
  private explicit = false
  /** PostgreSQL will answer 25P02 to anything but the end of the transaction. */
  private aborted = false
  private ddl = 0
  private dml = false
  private startedAt = 0

  constructor(private readonly limits: TransactionLimits) {}

  /** The refusal for `statement` about to run now, or undefined; either way the state moves on as PostgreSQL's will. */
  admit(statement: Statement, now: number): Refusal | undefined {
    const refusal = this.decide(statement, now)
    if (refusal) {
      // A refused statement fails the explicit transaction it is in, as any error does.
      if (this.explicit) this.aborted = true
      return refusal
    }
    return undefined
  }

  private decide(statement: Statement, now: number): Refusal | undefined {
    if (statement.refusal) return statement.refusal
    if (statement.effect === 'end') {
      this.reset()
      return undefined
    }
    // In a failed transaction PostgreSQL answers 25P02 first, as DSQL does: no rule is checked.
    if (this.aborted) return undefined
    if (this.explicit && now - this.startedAt > this.limits.maxAgeMs)
      return { code: '54000', message: `transaction age limit of ${Math.round(this.limits.maxAgeMs / 1000)}s exceeded` }
    switch (statement.effect) {
      case 'begin':
        if (!this.explicit) {
          this.reset()
          this.explicit = true
          this.startedAt = now
        }
        return undefined
      case 'ddl':
        if (this.ddl > 0) return { code: '0A000', message: 'multiple ddl statements not supported in a transaction' }
        if (this.dml) return { code: '0A000', message: 'ddl and dml are not supported in the same transaction' }
        this.ddl++
        return undefined
      case 'dml':
        if (this.ddl > 0) return { code: '0A000', message: 'ddl and dml are not supported in the same transaction' }
        this.dml = true
        return undefined
      default:
        return undefined
    }
  }

  /** The end of an implicit transaction (a simple query's end, a Sync) outside BEGIN. */
  endImplicit(): void {
    if (!this.explicit) this.reset()
  }

  /** What PostgreSQL's ReadyForQuery said, with nothing else in flight: the truth to start from. */
  settle(status: string, now: number): void {
    if (status === 'I') return this.reset()
    if (!this.explicit) {
      // In a transaction we did not see begin (e.g. BEGIN inside a function): count its age from now.
      this.explicit = true
      this.startedAt = now
    }
    this.aborted = status === 'E'
  }

  private reset(): void {
    this.explicit = false
    this.aborted = false
    this.ddl = 0
    this.dml = false
  }
}
