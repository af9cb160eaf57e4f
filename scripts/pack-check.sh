#!/usr/bin/env bash
# Packs the package and checks the tarball as a user's project meets it: its files (LICENSE,
# CHANGELOG, source maps that resolve), `require` and `import` of every entry point, queries
# against a local DSQL stand-in, and the types of every entry point under TypeScript's node10,
# node16 (ESM and CommonJS) and bundler resolution. The entry points are read from the
# package.json `exports` map, so a new subpath is checked without a change here.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
POSTGRES_DSQL_LOCAL_PID=
trap '[ -n "$POSTGRES_DSQL_LOCAL_PID" ] && kill $POSTGRES_DSQL_LOCAL_PID 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "pack-check: $*" >&2; exit 1; }

tarball=$(cd "$repo" && npm pack --silent --pack-destination "$work" | tail -n 1)
postgres_version=$(node -p "require('$repo/node_modules/postgres/package.json').version")
typescript_version=$(node -p "require('$repo/node_modules/typescript/package.json').version")
cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund "./$tarball" "postgres@$postgres_version" "typescript@$typescript_version" "@types/node@20" >/dev/null
pkg=node_modules/postgres-dsql

# Files: the license and changelog ship, package.json says where the project lives, and every
# source map resolves (its sources are in the tarball or embedded as sourcesContent).
for file in LICENSE CHANGELOG.md README.md; do [ -s "$pkg/$file" ] || fail "$file is not in the tarball"; done
node - "$pkg" <<'JS'
const { readdirSync, existsSync, readFileSync } = require('node:fs')
const { join, dirname, resolve } = require('node:path')
const pkg = process.argv[2]
const meta = require(resolve(pkg, 'package.json'))
for (const key of ['license', 'repository', 'homepage', 'bugs']) if (!meta[key]) throw new Error(`package.json has no ${key}`)
if (!readFileSync(join(pkg, 'LICENSE'), 'utf8').startsWith(`${meta.license} License`)) throw new Error(`LICENSE is not the ${meta.license} license package.json names`)
const maps = readdirSync(pkg, { recursive: true }).filter((f) => f.endsWith('.map'))
if (maps.length === 0) throw new Error('no source maps in the tarball')
for (const file of maps) {
  const map = JSON.parse(readFileSync(join(pkg, file), 'utf8'))
  map.sources.forEach((source, i) => {
    if (typeof map.sourcesContent?.[i] !== 'string' && !existsSync(join(pkg, dirname(file), source)))
      throw new Error(`${file}: source ${source} is neither in the tarball nor embedded`)
  })
}
console.log(`files: ok (${maps.length} source maps resolve)`)
JS

# The entry points: every `exports` key with types (not ./package.json or the certificate).
subpaths=$(node -p "Object.entries(require('./$pkg/package.json').exports).filter(([, t]) => typeof t === 'object' && t.require?.types).map(([k]) => k.replace(/^\\./, 'postgres-dsql')).join(' ')")
echo "entry points: $subpaths"

# Every entry point resolves from `require` and from `import` to files that exist.
for subpath in $subpaths; do
  node -e "require('node:fs').accessSync(require.resolve('$subpath'))" || fail "require.resolve('$subpath') fails"
  node --input-type=module -e "import { accessSync } from 'node:fs'; import { fileURLToPath } from 'node:url'; accessSync(fileURLToPath(import.meta.resolve('$subpath')))" ||
    fail "import.meta.resolve('$subpath') fails"
done

# The stand-in comes from the repository (the packed project has no embedded-postgres); started
# the way README shows, in the background, which also checks --print-env of the built CLI.
eval "$(node "$repo/dist/cli.js" local --print-env)"
[ -n "$POSTGRES_DSQL_LOCAL_PID" ] && [ -n "${CLUSTER_ENDPOINT:-}" ] || fail "the local stand-in did not start"

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

# Types. Each entry point must resolve to its declarations (an untyped or missing module fails
# under --strict) and declare every name it exports at run time; the main entry also keeps
# postgres.js's generics. The same sources are checked under each resolution.
typed_import() { # $1: entry point
  local names
  names=$(node -p "try { JSON.stringify(Object.keys(require('$1')).filter((n) => n !== '__esModule')) } catch { '[]' }")
  printf "import * as entry from '%s'\nexport const names: (keyof typeof entry)[] = %s\n" "$1" "$names"
}
main_check="import dsql, { isOccError, type DsqlOptions } from 'postgres-dsql'
import postgres from 'postgres'
const options: DsqlOptions = { host: 'abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws', schema: false }
const sql = dsql({ ...options, types: { bigint: postgres.BigInt } })
const typed: postgres.Sql<{ bigint: bigint }> = sql
export const check = [typed, isOccError(null)]"
for mode in node10 node16-esm node16-cjs bundler; do
  ext=ts; [ "$mode" = node16-esm ] && ext=mts; [ "$mode" = node16-cjs ] && ext=cts
  mkdir -p "types/$mode"
  echo "$main_check" > "types/$mode/main.$ext"
  i=0
  for subpath in $subpaths; do i=$((i + 1)); typed_import "$subpath" > "types/$mode/entry$i.$ext"; done
done
# node10 as NestJS sets it up: module commonjs, allowSyntheticDefaultImports (esModuleInterop implies it).
tsc() { npx --no-install tsc --noEmit --strict --skipLibCheck false --types node "$@"; }
tsc --module commonjs --moduleResolution node10 --allowSyntheticDefaultImports types/node10/*.ts || fail "types under node10 (module commonjs)"
tsc --module node16 --moduleResolution node16 types/node16-esm/*.mts types/node16-cjs/*.cts || fail "types under node16"
tsc --module esnext --moduleResolution bundler types/bundler/*.ts || fail "types under bundler resolution"
echo "types: ok (node10, node16 ESM and CommonJS, bundler; $(echo $subpaths | wc -w) entry points)"

npx --no-install postgres-dsql --version >/dev/null
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
# The jest preset from the installed package: a scratch project whose workers reach its stand-in.
mkdir jest-app && cd jest-app
echo '{ "name": "jest-app", "private": true, "postgres-dsql": { "roles": ["appuser"] } }' > package.json
echo "module.exports = { preset: 'postgres-dsql', transform: {} }" > jest.config.js
cat > preset.test.js <<'JS'
const { dsql } = require('postgres-dsql')
test('reaches the stand-in of the preset', async () => {
  const sql = dsql({ user: 'appuser' })
  const [r] = await sql`select current_user as u, current_schema() as s`
  await sql.end()
  expect(r).toEqual({ u: 'appuser', s: 'myschema' })
})
JS
NODE_PATH="$repo/node_modules" node "$repo/node_modules/jest/bin/jest.js" --ci
cd ..
for sub in jest/setup jest/teardown vitest; do
  node -e "if (typeof require('postgres-dsql/$sub').default !== 'function') process.exit(1)"
  node --input-type=module -e "if (typeof (await import('postgres-dsql/$sub')).default !== 'function') process.exit(1)"
done
echo "jest preset and test-runner entries: ok"
echo "pack-check: ok ($tarball)"
