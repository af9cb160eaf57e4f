#!/usr/bin/env bash
# Packs the package, installs it in an empty project next to postgres, and queries a local
# DSQL stand-in through both `require` and `import`, as a user's project would.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'kill $local_pid 2>/dev/null || true; wait $local_pid 2>/dev/null || true; rm -rf "$work"' EXIT

tarball=$(cd "$repo" && npm pack --silent --pack-destination "$work" | tail -n 1)
postgres_version=$(node -p "require('$repo/node_modules/postgres/package.json').version")
cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund "./$tarball" "postgres@$postgres_version" >/dev/null

# The stand-in comes from the repository (the packed project has no embedded-postgres).
node "$repo/dist/cli.js" local > env.sh &
local_pid=$!
for _ in $(seq 1 120); do grep -q AWS_REGION env.sh 2>/dev/null && break; sleep 0.5; done
grep -q AWS_REGION env.sh || { echo "pack-check: the local stand-in did not start"; exit 1; }
set -a; . ./env.sh; set +a

cat > check.cjs <<'JS'
const dsql = require('postgres-dsql')
const { dsql: named, isOccError } = require('postgres-dsql')
if (typeof dsql !== 'function' || dsql !== named || dsql.default !== dsql || typeof isOccError !== 'function') throw new Error('CommonJS exports are wrong')
const sql = dsql({ host: process.env.CLUSTER_ENDPOINT })
sql`select current_user as u`.then(([r]) => { if (r.u !== 'admin') throw new Error('wrong user ' + r.u); console.log('require: ok') }).finally(() => sql.end())
JS
cat > check.mjs <<'JS'
import dsql, { isOccError } from 'postgres-dsql'
if (typeof dsql !== 'function' || typeof isOccError !== 'function') throw new Error('ESM exports are wrong')
const sql = dsql({ host: process.env.CLUSTER_ENDPOINT, user: 'appuser' })
const [r] = await sql`select current_user as u, current_schema() as s`
await sql.end()
if (r.u !== 'appuser' || r.s !== 'myschema') throw new Error('wrong session ' + JSON.stringify(r))
console.log('import: ok')
JS
node check.cjs
node check.mjs

# The published types, from ESM and CommonJS TypeScript: generics flow through to postgres.Sql.
typescript_version=$(node -p "require('$repo/node_modules/typescript/package.json').version")
npm install --no-audit --no-fund "typescript@$typescript_version" "@types/node@20" >/dev/null
for ext in mts cts; do
  cat > "types.$ext" <<'TS'
import dsql, { isOccError, type DsqlOptions } from 'postgres-dsql'
import postgres from 'postgres'
const options: DsqlOptions = { host: 'abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws', schema: false }
const sql = dsql({ ...options, types: { bigint: postgres.BigInt } })
const typed: postgres.Sql<{ bigint: bigint }> = sql
export const check = [typed, isOccError(null)]
TS
done
npx --no-install tsc --noEmit --strict --module node16 --moduleResolution node16 --skipLibCheck false types.mts types.cts
npx --no-install postgres-dsql --help >/dev/null

# Migrations from the installed package, which has no libpg-query: applying needs none.
cp -r "$repo/samples/migrations" migrations
npx --no-install postgres-dsql migrate | grep -q '003_welcome_invoices.sql: applied 2 statements'
cat > migrate.mjs <<'JS'
import dsql from 'postgres-dsql'
import { migrate } from 'postgres-dsql/migrate'
const sql = dsql({ host: process.env.CLUSTER_ENDPOINT, onnotice: () => {} })
const { applied } = await migrate(sql)
await sql.end()
if (applied.length !== 0) throw new Error('applied again: ' + applied)
console.log('migrate: ok')
JS
node migrate.mjs
echo "pack-check: ok ($tarball)"
