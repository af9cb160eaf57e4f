// Writes an ESM entry beside each CommonJS entry, so `import dsql from 'postgres-dsql'` gets the
// function itself (Node's CJS interop would give the exports object) and named imports work too.
const { writeFileSync, existsSync } = require('node:fs')
const { join } = require('node:path')

for (const entry of ['index', 'local/index', 'jest/setup', 'jest/teardown', 'vitest']) {
  const file = join(__dirname, '..', 'dist', entry + '.js')
  if (!existsSync(file)) continue
  const names = Object.keys(require(file)).filter((name) => name !== 'default' && name !== '__esModule')
  const lines = [
    "import cjs from './" + entry.split('/').pop() + ".js'",
    'export default cjs.default ?? cjs',
    names.length ? 'export const { ' + names.join(', ') + ' } = cjs' : '',
  ]
  writeFileSync(file.replace(/\.js$/, '.mjs'), lines.filter(Boolean).join('\n') + '\n')
  // Types for `import`: the default export is the function, as at run time.
  const base = "'./" + entry.split('/').pop() + ".js'"
  // Seen from ESM, a CommonJS module's `default` is the whole module: name the function instead.
  const mod = require(file)
  const main = Object.keys(mod).find((name) => name !== 'default' && mod[name] === mod.default)
  const types = [
    main ? 'import type { ' + main + ' as main } from ' + base : '',
    main ? 'declare const _default: typeof main' : '',
    main ? 'export default _default' : '',
    'export * from ' + base,
  ]
  writeFileSync(file.replace(/\.js$/, '.d.mts'), types.filter(Boolean).join('\n') + '\n')
}
