/**
 * What the stand-in installs in PostgreSQL for the DSQL dialect, as the bootstrap superuser:
 *
 * - `sys.jobs` and `sys.wait_for_job(text)`: DSQL's job log for asynchronous DDL. CREATE INDEX
 *   ASYNC builds the index at once but leaves it invalid and not ready (PostgreSQL's state for an
 *   index still being built concurrently: the planner ignores it, it is not maintained, a unique
 *   one enforces nothing and ON CONFLICT cannot use it); the job runner (jobs.ts) rebuilds it
 *   with REINDEX after a minimum time, which makes it valid, and ends the job `completed`, or
 *   `failed` when the build finds duplicate keys.
 * - `sys.iam_pg_role_mappings` with `AWS IAM GRANT/REVOKE` behind it (admin only).
 * - `dsql_local.*`: the procedures the relay rewrites DSQL syntax into, and the row and size
 *   limits per transaction, counted by statement-level triggers (with transition tables) that an
 *   event trigger adds to every new table. They raise DSQL's 54000 inside the statement that
 *   crosses a limit, so PostgreSQL fails that statement and its transaction itself, autocommit
 *   included.
 * - DSQL's quotas on the catalog (columns and indexes per table, tables and schemas per
 *   database), checked by the same event trigger, read from `dsql_local.quotas` (setLimits).
 * - A guard that refuses dropping a primary key column (DSQL cannot; PostgreSQL can).
 *
 * Errors raised here carry SCHEMA 'dsql_local', which tells the relay to strip their PL/pgSQL
 * context. Object names all start with dsql_local, so they cannot collide with a user's.
 */
import { SERVER_VERSION, SERVER_VERSION_NUM } from './dialect'

export interface CatalogLimits {
  /** Mutated rows per transaction (DSQL: 3,000). */
  maxTransactionRows: number
  /** Bytes written per transaction (DSQL: 10 MiB), measured as pg_column_size of the rows. */
  maxTransactionBytes: number
}

/** DSQL's quotas on the catalog, changeable at run time (`setLimits`). */
export interface CatalogQuotas {
  /** Columns per table (DSQL: 255), dropped ones not counted. */
  maxColumnsPerTable: number
  /** Indexes per table (DSQL: 24), the primary key's and unfinished ASYNC ones included. */
  maxIndexesPerTable: number
  /** Tables per database (DSQL: 1,000). */
  maxTables: number
  /** Schemas per database (DSQL: 10), public and sys not counted. */
  maxSchemas: number
}

export const DEFAULT_QUOTAS: CatalogQuotas = { maxColumnsPerTable: 255, maxIndexesPerTable: 24, maxTables: 1000, maxSchemas: 10 }

/** The statement that makes `quotas` the ones in force. */
export function quotasSql(quotas: CatalogQuotas): string {
  return `UPDATE dsql_local.quotas SET max_columns = ${quotas.maxColumnsPerTable}, max_indexes = ${quotas.maxIndexesPerTable}, max_tables = ${quotas.maxTables}, max_schemas = ${quotas.maxSchemas}`
}

/** Server settings (postgres -c) that carry the limits to the triggers. */
export function catalogSettings(limits: CatalogLimits): Record<string, string | number> {
  return { 'dsql_local.max_rows': limits.maxTransactionRows, 'dsql_local.max_bytes': limits.maxTransactionBytes }
}

/** `roles` are mapped to `arn` from the start, as if admin had run AWS IAM GRANT for each. */
export function catalogSql(admin: string, limits: CatalogLimits, roles: string[] = [], arn?: string, quotas: CatalogQuotas = DEFAULT_QUOTAS): string {
  const mappings = arn
    ? roles.map((role) => `INSERT INTO sys.iam_pg_role_mappings SELECT ${literal(arn)}, r.oid, r.rolname, a.oid, a.rolname FROM pg_roles r, pg_roles a WHERE r.rolname = ${literal(role)} AND a.rolname = ${literal(admin)};`)
    : []
  const mib = limits.maxTransactionBytes / (1024 * 1024)
  const sizeMessage = `transaction size limit ${Number.isInteger(mib) ? `${mib}mb` : `${limits.maxTransactionBytes} bytes`} exceeded`
  return `
CREATE SCHEMA dsql_local;
GRANT USAGE ON SCHEMA dsql_local TO PUBLIC;
CREATE SCHEMA sys;
GRANT USAGE ON SCHEMA sys TO PUBLIC;

CREATE TABLE sys.jobs (
  job_id text PRIMARY KEY, status text NOT NULL, details text, job_type text NOT NULL,
  class_id oid, object_id oid, object_name text, start_time timestamptz NOT NULL, update_time timestamptz NOT NULL);
GRANT SELECT ON sys.jobs TO PUBLIC;

CREATE TABLE sys.iam_pg_role_mappings (
  arn text NOT NULL, pg_role_oid oid NOT NULL, pg_role_name name NOT NULL,
  grantor_pg_role_oid oid, grantor_pg_role_name name, PRIMARY KEY (pg_role_name, arn));
GRANT SELECT ON sys.iam_pg_role_mappings TO PUBLIC;

-- DSQL's job ids: 26 characters of lower-case base32.
CREATE FUNCTION dsql_local.job_id() RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT string_agg(substr('abcdefghijklmnopqrstuvwxyz234567', 1 + floor(random() * 32)::int, 1), '') FROM generate_series(1, 26)
$$;

-- The job runner's side of each job (jobs.ts): the index to finish, or why the build failed.
CREATE TABLE dsql_local.job_work (job_id text PRIMARY KEY, index_oid oid, failure text);

-- A job starts 'submitted'. An index is left invalid and not ready until the runner rebuilds it.
CREATE FUNCTION dsql_local.record_job(job_type text, object_id oid, failure text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  id text := dsql_local.job_id();
  -- Nothing to build (CREATE INDEX ASYNC IF NOT EXISTS of an existing index): done at once.
  async boolean := job_type = 'INDEX_BUILD' AND (object_id IS NOT NULL OR failure IS NOT NULL);
BEGIN
  INSERT INTO sys.jobs VALUES (id, CASE WHEN async THEN 'submitted' ELSE 'completed' END, NULL, job_type,
    CASE WHEN object_id IS NULL THEN NULL ELSE 'pg_class'::regclass::oid END,
    object_id, (SELECT relname FROM pg_class WHERE oid = object_id), now(), clock_timestamp());
  IF async THEN
    INSERT INTO dsql_local.job_work VALUES (id, object_id, failure);
    UPDATE pg_index SET indisvalid = false, indisready = false WHERE indexrelid = object_id;
    PERFORM pg_notify('dsql_local_jobs', id);
  END IF;
  RETURN id;
END $$;

-- CREATE INDEX ASYNC and ALTER TABLE ASYNC: the statement runs at once, as its caller; CALL
-- answers with the job_id column DSQL answers with. Duplicate keys do not fail the statement:
-- the job fails, as DSQL's does.
CREATE PROCEDURE dsql_local.run_async(INOUT job_id text, job_type text, ddl text) LANGUAGE plpgsql AS $$
DECLARE
  failure text;
  detail text;
BEGIN
  PERFORM set_config('dsql_local.last_object', '', true);
  IF job_type = 'INDEX_BUILD' THEN
    BEGIN
      EXECUTE ddl;
    EXCEPTION WHEN unique_violation THEN
      GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
      failure := SQLERRM || coalesce(' ' || nullif(detail, ''), '');
    END;
  ELSE
    EXECUTE ddl;
  END IF;
  job_id := dsql_local.record_job(job_type, nullif(current_setting('dsql_local.last_object', true), '')::oid, failure);
END $$;

-- Waits by committing and looking again (the runner's update is seen in a new snapshot), so it
-- waits only as a CALL of its own: in a transaction block PostgreSQL refuses the COMMIT
-- ("invalid transaction termination").
CREATE PROCEDURE sys.wait_for_job(job_id text) LANGUAGE plpgsql AS $$
DECLARE
  state text;
BEGIN
  IF job_id IS NULL OR job_id !~ '^[a-z2-7]{26}$' THEN
    RAISE EXCEPTION USING ERRCODE = '22P02', MESSAGE = 'Unable to convert text to UUID', SCHEMA = 'dsql_local';
  END IF;
  LOOP
    SELECT j.status INTO state FROM sys.jobs j WHERE j.job_id = wait_for_job.job_id;
    IF state IS NULL THEN
      RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('job %s does not exist', job_id), SCHEMA = 'dsql_local';
    END IF;
    EXIT WHEN state NOT IN ('submitted', 'processing');
    COMMIT;
    PERFORM pg_sleep(0.01);
  END LOOP;
END $$;

CREATE FUNCTION dsql_local.iam_role(role text) RETURNS oid LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  found oid;
BEGIN
  IF session_user <> ${literal(admin)} THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'permission denied: only admin can change IAM role mappings', SCHEMA = 'dsql_local';
  END IF;
  SELECT oid INTO found FROM pg_roles WHERE rolname = role;
  IF found IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('role "%s" does not exist', role), SCHEMA = 'dsql_local';
  END IF;
  RETURN found;
END $$;

CREATE PROCEDURE dsql_local.aws_iam_grant(role text, arn text) LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  target oid := dsql_local.iam_role(role);
BEGIN
  INSERT INTO sys.iam_pg_role_mappings VALUES (arn, target, role, (SELECT oid FROM pg_roles WHERE rolname = session_user), session_user)
  ON CONFLICT DO NOTHING;
END $$;

CREATE PROCEDURE dsql_local.aws_iam_revoke(role text, arn text) LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
  PERFORM dsql_local.iam_role(role);
  DELETE FROM sys.iam_pg_role_mappings m WHERE m.pg_role_name = role AND m.arn = aws_iam_revoke.arn;
END $$;

-- DSQL's version for the two settings that name it; PostgreSQL's answer for every other.
CREATE FUNCTION dsql_local.current_setting(setting text) RETURNS text LANGUAGE sql STABLE AS $$
  SELECT CASE lower(setting) WHEN 'server_version' THEN '${SERVER_VERSION}' WHEN 'server_version_num' THEN '${SERVER_VERSION_NUM}'
    ELSE pg_catalog.current_setting(setting) END
$$;
CREATE FUNCTION dsql_local.current_setting(setting text, missing_ok boolean) RETURNS text LANGUAGE sql STABLE AS $$
  SELECT CASE lower(setting) WHEN 'server_version' THEN '${SERVER_VERSION}' WHEN 'server_version_num' THEN '${SERVER_VERSION_NUM}'
    ELSE pg_catalog.current_setting(setting, missing_ok) END
$$;

CREATE FUNCTION dsql_local.version() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT regexp_replace(pg_catalog.version(), '^PostgreSQL [0-9.]+', 'PostgreSQL ${SERVER_VERSION}')
$$;

-- Rows and bytes written by this transaction so far, kept in transaction-local settings.
CREATE FUNCTION dsql_local.count_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
  bytes bigint;
  rows_total bigint;
  bytes_total bigint;
BEGIN
  IF TG_OP = 'DELETE' THEN
    SELECT count(*), coalesce(sum(pg_column_size(o.*)), 0) INTO n, bytes FROM dsql_local_old o;
  ELSE
    SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) INTO n, bytes FROM dsql_local_new t;
  END IF;
  rows_total := coalesce(nullif(current_setting('dsql_local.rows', true), ''), '0')::bigint + n;
  bytes_total := coalesce(nullif(current_setting('dsql_local.bytes', true), ''), '0')::bigint + bytes;
  IF rows_total > current_setting('dsql_local.max_rows')::bigint THEN
    RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = 'transaction row limit exceeded', SCHEMA = 'dsql_local';
  END IF;
  IF bytes_total > current_setting('dsql_local.max_bytes')::bigint THEN
    RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = ${literal(sizeMessage)}, SCHEMA = 'dsql_local';
  END IF;
  PERFORM set_config('dsql_local.rows', rows_total::text, true);
  PERFORM set_config('dsql_local.bytes', bytes_total::text, true);
  RETURN NULL;
END $$;

-- DSQL's catalog quotas (setLimits changes them through the control connection).
CREATE TABLE dsql_local.quotas (max_columns int NOT NULL, max_indexes int NOT NULL, max_tables int NOT NULL, max_schemas int NOT NULL);
INSERT INTO dsql_local.quotas VALUES (${quotas.maxColumnsPerTable}, ${quotas.maxIndexesPerTable}, ${quotas.maxTables}, ${quotas.maxSchemas});

CREATE FUNCTION dsql_local.check_quotas(tables oid[], schema_created boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  q dsql_local.quotas;
  t oid;
  n bigint;
BEGIN
  SELECT * INTO q FROM dsql_local.quotas;
  FOREACH t IN ARRAY tables LOOP
    SELECT count(*) INTO n FROM pg_attribute WHERE attrelid = t AND attnum > 0 AND NOT attisdropped;
    IF n > q.max_columns THEN
      RAISE EXCEPTION USING ERRCODE = '54011', MESSAGE = format('tables can have at most %s columns', q.max_columns), SCHEMA = 'dsql_local';
    END IF;
    SELECT count(*) INTO n FROM pg_index WHERE indrelid = t;
    IF n > q.max_indexes THEN
      RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = format('more than %s indexes per table are not allowed', q.max_indexes), SCHEMA = 'dsql_local';
    END IF;
  END LOOP;
  IF cardinality(tables) > 0 THEN
    SELECT count(*) INTO n FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p') AND s.nspname NOT IN ('pg_catalog', 'information_schema', 'sys', 'dsql_local') AND s.nspname !~ '^pg_toast';
    IF n > q.max_tables THEN
      RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = format('creating more than %s tables not allowed', q.max_tables), SCHEMA = 'dsql_local';
    END IF;
  END IF;
  IF schema_created THEN
    SELECT count(*) INTO n FROM pg_namespace
      WHERE nspname NOT IN ('public', 'sys', 'dsql_local', 'information_schema') AND nspname !~ '^pg_';
    IF n > q.max_schemas THEN
      RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = format('more than %s schemas not allowed', q.max_schemas), SCHEMA = 'dsql_local';
    END IF;
  END IF;
END $$;

CREATE FUNCTION dsql_local.on_ddl_end() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  r record;
  tables oid[] := '{}';
  schema_created boolean := false;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF r.command_tag IN ('CREATE INDEX', 'ALTER TABLE') AND r.object_type IN ('index', 'table') THEN
      PERFORM set_config('dsql_local.last_object', r.objid::text, true);
    END IF;
    IF r.object_type = 'table' THEN
      tables := tables || r.objid;
    ELSIF r.object_type = 'index' THEN
      tables := tables || (SELECT indrelid FROM pg_index WHERE indexrelid = r.objid);
    ELSIF r.object_type = 'schema' THEN
      schema_created := true;
    END IF;
    IF r.command_tag = 'CREATE TABLE' AND r.object_type = 'table' THEN
      EXECUTE format('CREATE TRIGGER dsql_local_rows_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS dsql_local_new FOR EACH STATEMENT EXECUTE FUNCTION dsql_local.count_rows()', r.objid::regclass);
      EXECUTE format('CREATE TRIGGER dsql_local_rows_update AFTER UPDATE ON %s REFERENCING NEW TABLE AS dsql_local_new FOR EACH STATEMENT EXECUTE FUNCTION dsql_local.count_rows()', r.objid::regclass);
      EXECUTE format('CREATE TRIGGER dsql_local_rows_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS dsql_local_old FOR EACH STATEMENT EXECUTE FUNCTION dsql_local.count_rows()', r.objid::regclass);
    END IF;
  END LOOP;
  PERFORM dsql_local.check_quotas(tables, schema_created);
END $$;
CREATE EVENT TRIGGER dsql_local_ddl_end ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'CREATE INDEX', 'ALTER TABLE', 'CREATE SCHEMA')
  EXECUTE FUNCTION dsql_local.on_ddl_end();

-- Primary key columns as they were before an ALTER TABLE, to refuse dropping one afterwards.
CREATE FUNCTION dsql_local.on_alter_start() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
  PERFORM set_config('dsql_local.pk_columns', coalesce((SELECT string_agg(c.conrelid::text || ':' || k::text, ',')
    FROM pg_constraint c, unnest(c.conkey) k WHERE c.contype = 'p'), ''), true);
END $$;
CREATE EVENT TRIGGER dsql_local_alter_start ON ddl_command_start WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION dsql_local.on_alter_start();

CREATE FUNCTION dsql_local.on_drop() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type = 'table column' LOOP
    IF (r.objid::text || ':' || r.objsubid::text) = ANY (string_to_array(current_setting('dsql_local.pk_columns', true), ',')) THEN
      RAISE EXCEPTION USING ERRCODE = '0A000', SCHEMA = 'dsql_local',
        MESSAGE = format('cannot drop primary key column %s', r.address_names[array_upper(r.address_names, 1)]);
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER dsql_local_drop ON sql_drop WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION dsql_local.on_drop();
${mappings.join('\n')}
`
}

/** A string literal for SQL built here (values are ours, never a client's). */
function literal(value: string): string {
  return `'${value.replace(/'/g, "''")}'`
}
