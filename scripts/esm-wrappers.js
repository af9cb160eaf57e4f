// Writes an ESM entry beside each CommonJS entry, so `import dsql from 'postgres-dsql'` gets the
// function itself (Node's CJS interop would give the exports object) and named imports work too.
// The entries are those of package.json `exports` whose `import` points at a `.mjs` file: a new
// subpath needs only its `exports` entry (and its line in `typesVersions`).
const { writeFileSync } = require('node:fs')
const { basename, join } = require('node:path')

const root = join(__dirname, '..')
const entries = require(join(root, 'package.json')).exports

for (const target of Object.values(entries)) {
  const esm = target.import && target.import.default
  const cjs = target.require && target.require.default
  if (typeof esm !== 'string' || !esm.endsWith('.mjs') || typeof cjs !== 'string') continue
  const file = join(root, cjs)
  const mod = require(file)
  const base = "'./" + basename(cjs) + "'"
  const names = Object.keys(mod).filter((name) => name !== 'default' && name !== '__esModule')
  writeFileSync(
    join(root, esm),
    lines(["import cjs from " + base, 'export default cjs.default ?? cjs', names.length && 'export const { ' + names.join(', ') + ' } = cjs']),
  )
  // Seen from ESM, a CommonJS module's `default` is the whole module: name the function instead.
  const main = Object.keys(mod).find((name) => name !== 'default' && mod[name] === mod.default)
  writeFileSync(
    join(root, target.import.types),
    lines([
      main && 'import type { ' + main + ' as main } from ' + base,
      main && 'declare const _default: typeof main',
      main && 'export default _default',
      'export * from ' + base,
    ]),
  )
}

function lines(list) {
  return list.filter(Boolean).join('\n') + '\n'
}
