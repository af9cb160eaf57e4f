// Replaces postgres.js's tests/bootstrap.js: the stand-in is set up by the harness, and its
// PostgreSQL cannot be reconfigured from here (no psql, no superuser), so exec() does nothing.
export function exec() {}
