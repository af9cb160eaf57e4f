/** Jest loads global setup and teardown as separate modules: they meet on a global. */
const KEY = Symbol.for('postgres-dsql.jest.stop')

type Holder = { [KEY]?: () => Promise<void> }

export function keepStop(stop: () => Promise<void>): void {
  ;(globalThis as Holder)[KEY] = stop
}

export function takeStop(): (() => Promise<void>) | undefined {
  const stop = (globalThis as Holder)[KEY]
  delete (globalThis as Holder)[KEY]
  return stop
}
