/** The logger the stand-in reports to; the same shape as the connector's. It never receives a secret. */
export interface Logger {
  debug?(msg: string): void
  warn?(msg: string): void
  error?(msg: string): void
}
