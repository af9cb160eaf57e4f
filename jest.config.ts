import type { Config } from 'jest'

const config: Config = {
  preset: 'ts-jest',
  // Node's, plus: an error unhandled outside a test fails its file (see setup/unhandled.ts).
  testEnvironment: '<rootDir>/__tests__/setup/environment.ts',
  // jest-circus fails the running test on an unhandled rejection; one more event-loop turn
  // after each test and hook lets it see those that the test itself left behind.
  waitForUnhandledRejections: true,
  roots: ['<rootDir>/__tests__'],
  testMatch: ['**/*.test.ts'],
  // postgres-dsql/jest/setup and teardown (lib/jest, options in package.json's "postgres-dsql"
  // key), with this repository's own checks around them.
  globalSetup: '<rootDir>/__tests__/setup/global-setup.ts',
  globalTeardown: '<rootDir>/__tests__/setup/global-teardown.ts',
  // Generous: a bound against hangs, not a speed test (2 shared cores can be very busy).
  testTimeout: 60_000,
  // Integration suites share one stand-in; two workers fit these 2-core machines.
  maxWorkers: 2,
}

export default config
