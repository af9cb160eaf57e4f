/**
 * Simulated distance to a region: a Duplex between the raw TCP socket and everything above it
 * (negotiation, TLS, relay) that holds every chunk for half the round trip in each direction.
 * Because it sits below TLS, the handshake pays the latency too, as it would over a WAN.
 *
 * It sits above TCP, though: the kernels see a loopback without delay. TCP's handshake is free,
 * and ACKs are not delayed, so with `nagle` a held segment leaves as soon as the client's ACK is
 * sent and arrives at once: each hold looks a round trip shorter than over a network. The bench's
 * bench/wan.py delays packets instead (ACKs too) where that matters.
 */
import { Duplex } from 'node:stream'
import type { Socket } from 'node:net'
import { performance } from 'node:perf_hooks'

/** A FIFO of actions, each run `delayMs` after it was queued; order is always preserved. */
export class DelayLine {
  private queue: { due: number; run: () => void }[] = []
  private timer: NodeJS.Timeout | undefined

  constructor(private readonly delayMs: number) {}

  push(run: () => void): void {
    // Without latency, run at once: the wrapper is then a plain pass-through.
    if (this.delayMs <= 0 && this.queue.length === 0) return run()
    this.queue.push({ due: performance.now() + this.delayMs, run })
    this.schedule()
  }

  clear(): void {
    clearTimeout(this.timer)
    this.timer = undefined
    this.queue = []
  }

  private schedule(): void {
    if (this.timer || this.queue.length === 0) return
    const wait = Math.max(0, this.queue[0].due - performance.now())
    this.timer = setTimeout(() => {
      this.timer = undefined
      this.flush()
    }, wait)
  }

  private flush(): void {
    // setTimeout may fire a little early; a millisecond of slack avoids a second timer.
    while (this.queue.length && this.queue[0].due <= performance.now() + 1) this.queue.shift()!.run()
    this.schedule()
  }
}

/**
 * Wraps a socket, delaying reads and writes by `roundTripMs / 2` each. Writes are accepted at
 * once (no backpressure towards the writer): fine for a test stand-in, where what matters is
 * when the bytes arrive, not how much memory the queue takes.
 */
export class DelayedDuplex extends Duplex {
  private readonly inbound: DelayLine
  private readonly outbound: DelayLine

  constructor(
    private readonly raw: Socket,
    roundTripMs: number,
    nagle = false,
  ) {
    super()
    this.inbound = new DelayLine(roundTripMs / 2)
    this.outbound = new DelayLine(roundTripMs / 2)
    raw.setNoDelay(!nagle)
    raw.on('data', (chunk: Buffer) =>
      this.inbound.push(() => {
        if (!this.push(chunk)) raw.pause()
      }),
    )
    raw.on('end', () => this.inbound.push(() => this.push(null)))
    raw.on('close', () => this.inbound.push(() => this.destroy()))
    raw.on('error', (err) => this.destroy(err))
  }

  override _read(): void {
    this.raw.resume()
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.outbound.push(() => {
      if (!this.raw.destroyed) this.raw.write(chunk)
    })
    callback()
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.outbound.push(() => this.raw.end())
    callback()
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.inbound.clear()
    this.outbound.clear()
    this.raw.destroy()
    callback(error)
  }
}
