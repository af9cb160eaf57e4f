// Preload for child processes: resolves the stand-in's endpoint name (DSQL_TEST_RESOLVE) to
// 127.0.0.1, as DNS would resolve a real endpoint, for clients that take no hostaddr (a
// runtime's own WebSocket). Every other name resolves as usual.
const dns = require('node:dns')
const lookup = dns.lookup
const name = process.env.DSQL_TEST_RESOLVE

dns.lookup = function (host, options, callback) {
  if (host !== name) return lookup.apply(this, arguments)
  const done = typeof options === 'function' ? options : callback
  const all = typeof options === 'object' && options !== null && options.all
  process.nextTick(() => (all ? done(null, [{ address: '127.0.0.1', family: 4 }]) : done(null, '127.0.0.1', 4)))
}
