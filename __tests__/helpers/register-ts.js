// Runs lib/*.ts in a child process with esbuild's transform: a CLI start takes a fraction of
// ts-node's time, so tests that start the CLI a few dozen times stay quick on a shared machine.
const { transformSync } = require('esbuild')
const { readFileSync } = require('node:fs')

require.extensions['.ts'] = (module, filename) => {
  const source = readFileSync(filename, 'utf8')
  // import() becomes require(), as tsc's CommonJS output does.
  const options = { loader: 'ts', format: 'cjs', target: 'node20', sourcefile: filename, sourcemap: 'inline', supported: { 'dynamic-import': false } }
  const { code } = transformSync(source, options)
  module._compile(code, filename)
}
