/** Base class of every error this package raises itself. `code` is stable; `message` says what to do. */
export class DsqlError extends Error {
  readonly code: string
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    // Messages quote other messages ("failed: <theirs>."): one full stop, not two.
    super(message.replace(/([^.])\.\.(?=\s|$)/g, '$1.'), options)
    this.name = new.target.name
    this.code = code
  }
}

/** The options given to `dsql()` cannot work: thrown by `dsql()` itself, before any connection. */
export class DsqlConfigError extends DsqlError {
  constructor(message: string) {
    super('DSQL_CONFIG', message)
  }
}

/** No usable AWS credentials: none found, an expired SSO session, a provider that threw. */
export class DsqlCredentialsError extends DsqlError {
  constructor(message: string, cause?: unknown) {
    super('DSQL_CREDENTIALS', message, { cause })
  }
}

/** DSQL refused the IAM token (SQLSTATE 08006 `access denied`); `hint` is DSQL's reason. */
export class DsqlTokenError extends DsqlError {
  readonly sqlstate: string
  readonly hint: string | undefined
  constructor(message: string, sqlstate: string, hint: string | undefined) {
    super('DSQL_TOKEN_REJECTED', message)
    this.sqlstate = sqlstate
    this.hint = hint
  }
}

/** TLS could not be established or the server's certificate did not verify. No token was sent. */
export class DsqlTlsError extends DsqlError {
  constructor(message: string, cause?: unknown) {
    super('DSQL_TLS', message, { cause })
  }
}

/**
 * A connection could not be opened or was lost: unreachable endpoint, time-out, or the service
 * refused it before authentication (rate exceeded `53400`, too many connections `53300`, waking
 * up). `retryable` is true when opening another connection later may work. `code` is the one
 * postgres.js uses for the same situation where it has one (`CONNECT_TIMEOUT`,
 * `CONNECTION_CLOSED`, the system's `ECONNREFUSED`, `ENOTFOUND`, ...), else `DSQL_CONNECTION`.
 */
export class DsqlConnectionError extends DsqlError {
  readonly sqlstate: string | undefined
  readonly retryable: boolean
  constructor(message: string, options: { sqlstate?: string; retryable: boolean; cause?: unknown; code?: string }) {
    super(options.code ?? 'DSQL_CONNECTION', message, { cause: options.cause })
    this.sqlstate = options.sqlstate
    this.retryable = options.retryable
  }
}
