/**
 * The schema and rows the golden recordings were made against, and the SQL of the two-session
 * cases (occ_conflict.json records only the answers). Reconstructed from the recording suite's
 * description of its probes (see ../shared/dsql-golden/README.md for where the records come from).
 * Each statement runs on its own, as DSQL wants: one DDL per transaction.
 */

export const SETUP: string[] = [
  'CREATE TABLE baseline_parent (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL)',
  'CREATE TABLE baseline_child (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), parent_id uuid NOT NULL REFERENCES baseline_parent(id))',
  'CREATE TABLE baseline_idx (id uuid PRIMARY KEY, value text)',
  'CREATE TABLE baseline_bulk (id int)',
  'CREATE TABLE baseline_drop_me (id int)',
  'CREATE TABLE baseline_alter (id int PRIMARY KEY, a text, b int)',
  'CREATE TABLE baseline_alter_pk (id int PRIMARY KEY, a text)',
  'CREATE TABLE baseline_alter_big (big bigint, note text)',
  'CREATE TABLE baseline_alter_fk (id int PRIMARY KEY, parent_id uuid)',
  'CREATE TABLE baseline_alter_pkadd (id int, v text)',
  'CREATE TABLE baseline_lat_parent (id text NOT NULL PRIMARY KEY)',
  'CREATE TABLE baseline_lat_child (id bigint NOT NULL PRIMARY KEY, parent_id text)',
  "INSERT INTO baseline_lat_parent (id) VALUES ('a')",
  "INSERT INTO baseline_lat_child (id, parent_id) VALUES (1, 'a')",
  'CREATE TABLE baseline_implicit_bulk (id int)',
  'CREATE TABLE baseline_multi (id int PRIMARY KEY, a int)',
  'CREATE TABLE baseline_fk_action (id uuid PRIMARY KEY, name text NOT NULL)',
  "INSERT INTO baseline_fk_action (id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 'cascade')",
  "INSERT INTO baseline_fk_action (id, name) VALUES ('00000000-0000-0000-0000-0000000000c2', 'set-null')",
  "INSERT INTO baseline_fk_action (id, name) VALUES ('00000000-0000-0000-0000-0000000000c3', 'set-default')",
  "INSERT INTO baseline_fk_action (id, name) VALUES ('00000000-0000-0000-0000-0000000000c4', 'default-target')",
  'CREATE TABLE baseline_fk_cascade (id uuid PRIMARY KEY, parent_id uuid REFERENCES baseline_fk_action(id) ON DELETE CASCADE, note text)',
  'CREATE TABLE baseline_fk_setnull (id uuid PRIMARY KEY, parent_id uuid REFERENCES baseline_fk_action(id) ON DELETE SET NULL, note text)',
  "CREATE TABLE baseline_fk_setdefault (id uuid PRIMARY KEY, parent_id uuid DEFAULT '00000000-0000-0000-0000-0000000000c4' REFERENCES baseline_fk_action(id) ON DELETE SET DEFAULT, note text)",
  "INSERT INTO baseline_fk_cascade (id, parent_id, note) VALUES ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-0000000000c1', 'child')",
  "INSERT INTO baseline_fk_setnull (id, parent_id, note) VALUES ('00000000-0000-0000-0000-0000000000d2', '00000000-0000-0000-0000-0000000000c2', 'child')",
  "INSERT INTO baseline_fk_setdefault (id, parent_id, note) VALUES ('00000000-0000-0000-0000-0000000000d3', '00000000-0000-0000-0000-0000000000c3', 'child')",
  'CREATE TABLE baseline_span (id int PRIMARY KEY, k int NOT NULL, v text)',
  "INSERT INTO baseline_span (id, k, v) VALUES (1, 1, 'a'), (2, 1, 'b'), (3, 1, 'c'), (4, 2, 'other')",
  "INSERT INTO baseline_parent (id, name) VALUES ('00000000-0000-0000-0000-0000000000aa', 'seed')",
  'CREATE TABLE baseline_conflict (id uuid PRIMARY KEY, name text NOT NULL)',
  'CREATE TABLE baseline_conflict_child (id uuid PRIMARY KEY, parent_id uuid NOT NULL REFERENCES baseline_conflict(id))',
  "INSERT INTO baseline_conflict (id, name) VALUES ('00000000-0000-0000-0000-0000000000ab', 'conflict-fk')",
  "INSERT INTO baseline_conflict (id, name) VALUES ('00000000-0000-0000-0000-0000000000ac', 'conflict-row')",
  "INSERT INTO baseline_conflict (id, name) VALUES ('00000000-0000-0000-0000-0000000000ad', 'disjoint-a')",
  "INSERT INTO baseline_conflict (id, name) VALUES ('00000000-0000-0000-0000-0000000000ae', 'disjoint-b')",
  "INSERT INTO baseline_conflict (id, name) VALUES ('00000000-0000-0000-0000-0000000000af', 'conflict-nonkey')",
]

const id = (suffix: string) => `'00000000-0000-0000-0000-0000000000${suffix}'`
const txn = (sql: string) => ['BEGIN', sql, 'COMMIT']

/** The statements of each session of the two-session cases, by case name. */
export const SESSIONS: Record<string, [string[], string[]]> = {
  occ_write_write: [
    txn(`UPDATE baseline_conflict SET name = 'ww-a' WHERE id = ${id('ac')}`),
    txn(`UPDATE baseline_conflict SET name = 'ww-b' WHERE id = ${id('ac')}`),
  ],
  occ_for_update_vs_write: [
    txn(`SELECT name FROM baseline_conflict WHERE id = ${id('ac')} FOR UPDATE`),
    txn(`UPDATE baseline_conflict SET name = 'fu-b' WHERE id = ${id('ac')}`),
  ],
  occ_for_key_share_vs_delete: [
    txn(`SELECT name FROM baseline_conflict WHERE id = ${id('ac')} FOR KEY SHARE`),
    txn(`DELETE FROM baseline_conflict WHERE id = ${id('ac')}`),
  ],
  occ_fk_delete_insert: [
    txn(`DELETE FROM baseline_conflict WHERE id = ${id('ab')}`),
    txn(`INSERT INTO baseline_conflict_child (id, parent_id) VALUES (${id('b0')}, ${id('ab')})`),
  ],
  occ_fk_nonkey_update: [
    txn(`UPDATE baseline_conflict SET name = 'nk' WHERE id = ${id('af')}`),
    txn(`INSERT INTO baseline_conflict_child (id, parent_id) VALUES (${id('b1')}, ${id('af')})`),
  ],
  occ_fk_cascade_vs_child_write: [
    txn(`DELETE FROM baseline_fk_action WHERE id = ${id('c1')}`),
    txn(`UPDATE baseline_fk_cascade SET note = 'touched' WHERE id = ${id('d1')}`),
  ],
  occ_fk_set_null_vs_child_write: [
    txn(`DELETE FROM baseline_fk_action WHERE id = ${id('c2')}`),
    txn(`UPDATE baseline_fk_setnull SET note = 'touched' WHERE id = ${id('d2')}`),
  ],
  occ_fk_set_default_vs_child_write: [
    txn(`DELETE FROM baseline_fk_action WHERE id = ${id('c3')}`),
    txn(`UPDATE baseline_fk_setdefault SET note = 'touched' WHERE id = ${id('d3')}`),
  ],
  occ_multirow_predicate: [txn(`UPDATE baseline_span SET v = 'a-side' WHERE k = 1`), txn(`UPDATE baseline_span SET v = 'b-side' WHERE k = 1`)],
  occ_disjoint_writes: [
    txn(`UPDATE baseline_conflict SET name = 'dw-a' WHERE id = ${id('ad')}`),
    txn(`UPDATE baseline_conflict SET name = 'dw-b' WHERE id = ${id('ae')}`),
  ],
}

/**
 * The order the groups were recorded in (one connection, one after the other), which later
 * cases depend on: e.g. queries.json sees the row transaction.json's `commit` case inserted.
 */
export const FILE_ORDER = [
  'unsupported.json',
  'transaction.json',
  'supported.json',
  'isolation.json',
  'index.json',
  'backlog.json',
  'types.json',
  'enum.json',
  'environment.json',
  'occ.json',
  'queries.json',
  'alters.json',
  'occ_conflict.json',
  'multi_statement.json',
]
