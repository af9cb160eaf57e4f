// `preset: 'postgres-dsql'`: one local DSQL stand-in for the whole jest run (see README, "Testing with jest and vitest").
const { join } = require('node:path')

module.exports = {
  testEnvironment: 'node',
  globalSetup: join(__dirname, 'dist', 'jest', 'setup.js'),
  globalTeardown: join(__dirname, 'dist', 'jest', 'teardown.js'),
}
