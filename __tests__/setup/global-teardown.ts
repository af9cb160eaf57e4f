export default async function globalTeardown(): Promise<void> {
  await globalThis.__DSQL_LOCAL__?.stop()
}
