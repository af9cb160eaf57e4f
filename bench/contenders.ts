/**
 * The ways from Node to DSQL that the bench compares, each behind the same small interface,
 * all reaching the stand-in as `admin`: the endpoint name for SNI, certificate and token, while
 * the TCP connection goes to the loopback address (the endpoint does not resolve).
 */
import * as net from 'node:net'
import * as tls from 'node:tls'
import postgres from 'postgres'
import { DsqlSigner } from '@aws-sdk/dsql-signer'
import { AuroraDSQLPool } from '@aws/aurora-dsql-node-postgres-connector'
import type { AwsCredentialIdentity, AwsCredentialIdentityProvider } from '@smithy/types'
import { dsql } from '../lib'
import * as wire from '../lib/wire'
import type { Target } from './standin'

/** A pool of connections; nothing is opened before the first query. */
export interface Pool {
  /** `select 1`, checked. */
  selectOne(): Promise<void>
  /** The steady-state query, prepared: `select id, name from bench_items where id = $1`. */
  byId(id: number): Promise<void>
  end(): Promise<void>
}

export interface PoolOptions {
  max: number
  /** Default: the stand-in's static key pair. */
  credentials?: AwsCredentialIdentity | AwsCredentialIdentityProvider
}

export interface Contender {
  key: string
  label: string
  open(target: Target, options: PoolOptions): Pool
}

export const BY_ID = 'select id, name from bench_items where id = $1'

function check(value: unknown, what: string): void {
  if (value !== 1) throw new Error(`${what}: select 1 returned ${JSON.stringify(value)}`)
}

/** postgres.js options that name the stand-in like a user would, without a connector. */
function byHandOptions(target: Target, options: PoolOptions): postgres.Options<{}> {
  const { host, hostaddr, port, region, ca } = target
  const credentials = options.credentials ?? target.credentials
  return {
    host: hostaddr,
    port,
    user: 'admin',
    database: 'postgres',
    max: options.max,
    ssl: { ca, servername: host },
    // As AWS's samples do: a signer per connection, the token as the password.
    pass: () => new DsqlSigner({ hostname: host, region, credentials }).getDbConnectAdminAuthToken(),
  }
}

function postgresJs(sql: postgres.Sql): Pool {
  return {
    selectOne: async () => check((await sql`select 1 as one`)[0].one, 'postgres.js'),
    byId: async (id) => void (await sql`select id, name from bench_items where id = ${id}`),
    end: () => sql.end({ timeout: 5 }),
  }
}

export const ours: Contender = {
  key: 'ours',
  label: 'postgres-dsql',
  open: (t, o) =>
    postgresJs(
      dsql({ host: t.host, hostaddr: t.hostaddr, port: t.port, sslrootcert: t.caFile, credentials: o.credentials ?? t.credentials, user: 'admin', max: o.max }),
    ),
}

export const byHand: Contender = {
  key: 'byhand',
  label: 'postgres.js + dsql-signer',
  open: (t, o) => postgresJs(postgres(byHandOptions(t, o))),
}

export const official: Contender = {
  key: 'official',
  label: 'pg + aurora-dsql-node-postgres-connector',
  open: (t, o) => {
    const pool = new AuroraDSQLPool({
      host: t.host,
      port: t.port,
      user: 'admin',
      customCredentialsProvider: o.credentials ?? t.credentials,
      ssl: { ca: t.ca },
      max: o.max,
      // The connector signs for `host` and pg verifies TLS against it; only TCP goes to hostaddr.
      stream: () => loopbackSocket(t.hostaddr),
    })
    pool.on('error', () => undefined)
    return {
      selectOne: async () => check((await pool.query<{ one: number }>('select 1 as one')).rows[0].one, 'pg'),
      byId: async (id) => void (await pool.query({ name: 'bench_by_id', text: BY_ID, values: [id] })),
      end: () => pool.end(),
    }
  },
}

/** A socket that connects to `address` whatever host pg asks for; pg still uses its host for SNI. */
function loopbackSocket(address: string): net.Socket {
  const socket = new net.Socket()
  const connect = socket.connect.bind(socket) as (port: number, host: string) => net.Socket
  socket.connect = ((port: number) => connect(port, address)) as typeof socket.connect
  return socket
}

/** Variants that explain the differences; measured for connect time only. */
export const variants: Contender[] = [
  {
    key: 'ours-noschema',
    label: 'postgres-dsql, schema: false',
    open: (t, o) =>
      postgresJs(dsql({ host: t.host, hostaddr: t.hostaddr, port: t.port, sslrootcert: t.caFile, credentials: t.credentials, max: o.max, schema: false })),
  },
  {
    key: 'ours-websocket',
    label: "postgres-dsql, transport: 'websocket'",
    open: (t, o) =>
      postgresJs(dsql({ host: t.host, hostaddr: t.hostaddr, port: t.port, sslrootcert: t.caFile, credentials: t.credentials, max: o.max, transport: 'websocket' })),
  },
  {
    key: 'byhand-tuned',
    label: 'postgres.js + dsql-signer, direct TLS, no type fetch',
    // postgres.js 3.4.8+ reads `sslnegotiation`; its typings do not list it.
    open: (t, o) => postgresJs(postgres({ ...byHandOptions(t, o), fetch_types: false, sslnegotiation: 'direct' } as postgres.Options<{}>)),
  },
]

/**
 * The floor, measured: a minimal client that does only what the protocol requires, each step
 * waiting for the answer it needs: direct TLS (1 round trip), StartupMessage -> password request
 * (1), token -> ReadyForQuery (1), `select 1` -> row (1). Signing overlaps the handshake.
 * `eager` sends the token with the StartupMessage, before the server asks for it: one round trip
 * less, the brief's 3-RTT floor, but it presumes the server's authentication method.
 */
export async function wireFloor(t: Target, signer: DsqlSigner, eager = false): Promise<void> {
  const token = signer.getDbConnectAdminAuthToken()
  const socket = tls.connect({ host: t.hostaddr, port: t.port, servername: t.host, ca: t.ca, ALPNProtocols: ['postgresql'] })
  socket.setNoDelay(true)
  const until = messages(socket)
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('secureConnect', resolve)
      socket.once('error', reject)
    })
    const startup = wire.startupMessage({ user: 'admin', database: 'postgres' })
    if (eager) socket.write(Buffer.concat([startup, wire.passwordMessage(await token)]))
    else {
      socket.write(startup)
      await until((m) => m[0] === 0x52 && wire.authCode(m) === 3) // R: AuthenticationCleartextPassword
      socket.write(wire.passwordMessage(await token))
    }
    await until((m) => m[0] === 0x5a) // Z: ReadyForQuery
    socket.write(wire.queryMessage('select 1'))
    await until((m) => m[0] === 0x44) // D: DataRow
    socket.end(wire.TERMINATE)
  } finally {
    socket.destroy()
  }
}

/** Waits for the first backend message that matches; an ErrorResponse or a close fails. */
function messages(socket: tls.TLSSocket): (wanted: (message: Buffer) => boolean) => Promise<void> {
  const frames = new wire.Frames()
  const queue: Buffer[] = []
  let failure: Error | undefined
  let wake: () => void = () => undefined
  socket.on('data', (chunk: Buffer) => {
    queue.push(...frames.push(chunk))
    wake()
  })
  socket.on('error', (err) => ((failure ??= err), wake()))
  socket.on('close', () => ((failure ??= new Error('closed by the server')), wake()))
  return async (wanted) => {
    for (let waits = 0; waits < 1000; waits++) {
      for (let message = queue.shift(); message; message = queue.shift()) {
        if (message[0] === 0x45) throw new Error(`server error: ${wire.errorFields(message).M}`)
        if (wanted(message)) return
      }
      if (failure) throw failure
      await new Promise<void>((resolve) => (wake = resolve))
    }
    throw new Error('too many messages')
  }
}
