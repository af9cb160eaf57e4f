/**
 * DSQL's session settings: an allowlist, not a denylist. A real cluster refuses `SET` of a
 * configuration parameter it does not support, with `0A000 setting configuration parameter "x"
 * not supported` (recorded for default_transaction_isolation; users met it for
 * statement_timeout in 2026, SET LOCAL included). The same rule is applied to set_config() and to
 * startup parameters (`options=-c x=y` and GUCs sent as startup parameters): DSQL's answer on
 * those two paths is not known, so the stand-in takes the strict side (README, "guessed").
 *
 * `sessionSettings: 'postgres'` turns the rule off for users who need PostgreSQL's behaviour.
 */
import type { Refusal } from './statements'

export type SessionSettingsMode = 'dsql' | 'postgres'

/**
 * Parameters a client may set. The list, checked against the recordings (TimeZone and
 * client_encoding SHOW UTC/UTF8) and what drivers send at startup: postgres.js sends
 * client_encoding and application_name; pgjdbc adds DateStyle, TimeZone and extra_float_digits;
 * the connector and AWS's samples set search_path (SET, and `options=-c search_path=...`).
 */
const ALLOWED = new Set(['search_path', 'application_name', 'timezone', 'client_encoding', 'datestyle', 'intervalstyle', 'extra_float_digits', 'client_min_messages'])

/** Startup packet keys that are not configuration parameters. */
const STARTUP_KEYS = new Set(['user', 'database', 'options', 'replication'])

export const notSupported = (name: string): Refusal => ({ code: '0A000', message: `setting configuration parameter "${name}" not supported` })

export const settingAllowed = (name: string): boolean => ALLOWED.has(name.toLowerCase())

/**
 * The first configuration parameter of a startup packet that DSQL would not accept: a GUC sent
 * as a startup parameter, or one set with `-c name=value` / `--name=value` in `options`.
 */
export function startupSettingRefusal(params: Record<string, string>): Refusal | undefined {
  for (const key of Object.keys(params)) {
    if (STARTUP_KEYS.has(key) || key.startsWith('_pq_.')) continue
    if (!settingAllowed(key)) return notSupported(key.toLowerCase())
  }
  for (const name of optionSettings(params.options ?? '')) if (!settingAllowed(name)) return notSupported(name.toLowerCase())
  return undefined
}

/** The parameter names set in a libpq `options` value: `-c a=b`, `-ca=b`, `--a=b`, backslash escapes. */
export function optionSettings(options: string): string[] {
  const words: string[] = []
  let word = ''
  for (let i = 0; i < options.length; i++) {
    const c = options[i]
    if (c === '\\' && i + 1 < options.length) word += options[++i]
    else if (/\s/.test(c)) {
      if (word) words.push(word)
      word = ''
    } else word += c
  }
  if (word) words.push(word)
  const names: string[] = []
  for (let i = 0; i < words.length; i++) {
    let setting: string | undefined
    if (words[i] === '-c') setting = words[++i]
    else if (words[i].startsWith('-c')) setting = words[i].slice(2)
    else if (words[i].startsWith('--')) setting = words[i].slice(2)
    // Other postgres command-line switches (-B, -F, ...) set server parameters too: not DSQL's to allow.
    else if (words[i].startsWith('-')) setting = words[i].slice(1)
    if (setting) names.push(setting.split('=')[0].replace(/-/g, '_'))
  }
  return names
}
