/**
 * Leaving nothing behind when the Node process goes away without calling `stop()`:
 * - on 'exit' and on SIGINT/SIGTERM (when nobody else handles them), a synchronous cleanup;
 * - on a crash or SIGKILL, when no JavaScript runs any more, a watchdog shell that waits for
 *   its stdin (a pipe from this process) to close, then stops PostgreSQL and removes the
 *   temporary directory.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { Socket } from 'node:net'

type Cleanup = () => void

const cleanups = new Set<Cleanup>()
const SIGNALS = ['SIGINT', 'SIGTERM'] as const

/** Runs `cleanup` if the process exits before the returned function is called. */
export function onProcessExit(cleanup: Cleanup): () => void {
  if (cleanups.size === 0) install()
  cleanups.add(cleanup)
  return () => {
    cleanups.delete(cleanup)
    if (cleanups.size === 0) uninstall()
  }
}

function runAll(): void {
  for (const cleanup of [...cleanups]) {
    try {
      cleanup()
    } catch {
      // Best effort: the process is going away; the watchdog finishes what is left.
    }
  }
  cleanups.clear()
}

function onSignal(signal: NodeJS.Signals): void {
  // Someone else handles this signal (e.g. the CLI calls stop()): leave it to them.
  if (process.listenerCount(signal) > 1) return
  runAll()
  uninstall()
  // Without our listener the default action applies again: terminate as the signal asked.
  process.kill(process.pid, signal)
}

function install(): void {
  process.on('exit', runAll)
  for (const signal of SIGNALS) process.on(signal, onSignal)
}

function uninstall(): void {
  process.off('exit', runAll)
  for (const signal of SIGNALS) process.off(signal, onSignal)
}

const WATCHDOG = `
read _ignored
kill -INT "$1" 2>/dev/null
i=0
while kill -0 "$1" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
kill -KILL "$1" 2>/dev/null
rm -rf "$2"
`

/**
 * Starts the watchdog for the server `pid` and directory `dir`. It does not keep the event loop
 * alive. Call `dismiss()` after a clean stop.
 */
export function startWatchdog(pid: number, dir: string): { dismiss(): Promise<void> } {
  // Detached: a Ctrl-C sent to the terminal's process group must not take the watchdog with it.
  const child: ChildProcess = spawn('/bin/sh', ['-c', WATCHDOG, 'postgres-dsql-watchdog', String(pid), dir], {
    stdio: ['pipe', 'ignore', 'ignore'],
    detached: true,
  })
  child.on('error', () => undefined)
  child.unref()
  if (child.stdin instanceof Socket) child.stdin.unref()
  child.stdin?.on('error', () => undefined)
  return {
    dismiss: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return resolve()
        child.once('exit', () => resolve())
        child.ref() // so that the 'exit' we wait for still arrives
        child.kill('SIGKILL')
      }),
  }
}
