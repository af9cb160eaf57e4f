/**
 * What the stand-in installs in PostgreSQL for the DSQL dialect, as the bootstrap superuser:
 *
 * - `sys.jobs` and `sys.wait_for_job(text)`: DSQL's job log for asynchronous DDL. The stand-in
 *   builds indexes synchronously, so every job is `completed` once its statement returns.
 * - `sys.iam_pg_role_mappings` with `AWS IAM GRANT/REVOKE` behind it (admin only).
 * - `dsql_local.*`: the procedures the relay rewrites DSQL syntax into, and the row and size
 *   limits per transaction, counted by statement-level triggers (with transition tables) that an
 *   event trigger adds to every new table. They raise DSQL's 54000 inside the statement that
 *   crosses a limit, so PostgreSQL fails that statement and its transaction itself, autocommit
 *   included.
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

/** Server settings (postgres -c) that carry the limits to the triggers. */
export function catalogSettings(limits: CatalogLimits): Record<string, string | number> {
  return { 'dsql_local.max_rows': limits.maxTransactionRows, 'dsql_local.max_bytes': limits.maxTransactionBytes }
}

/** `roles` are mapped to `arn` from the start, as if admin had run AWS IAM GRANT for each. */
export function catalogSql(admin: string, limits: CatalogLimits, roles: string[] = [], arn?: string): string {
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

CREATE FUNCTION dsql_local.record_job(job_type text, object_id oid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  id text := dsql_local.job_id();
BEGIN
  INSERT INTO sys.jobs VALUES (id, 'completed', NULL, job_type, CASE WHEN object_id IS NULL THEN NULL ELSE 'pg_class'::regclass::oid END,
    object_id, (SELECT relname FROM pg_class WHERE oid = object_id), now(), clock_timestamp());
  RETURN id;
END $$;

-- CREATE INDEX ASYNC and ALTER TABLE ASYNC: the statement runs at once, as its caller, and is
-- logged as a completed job; CALL answers with the job_id column DSQL answers with.
CREATE PROCEDURE dsql_local.run_async(INOUT job_id text, job_type text, ddl text) LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('dsql_local.last_object', '', true);
  EXECUTE ddl;
  job_id := dsql_local.record_job(job_type, nullif(current_setting('dsql_local.last_object', true), '')::oid);
END $$;

CREATE PROCEDURE sys.wait_for_job(job_id text) LANGUAGE plpgsql AS $$
BEGIN
  IF job_id IS NULL OR job_id !~ '^[a-z2-7]{26}$' THEN
    RAISE EXCEPTION USING ERRCODE = '22P02', MESSAGE = 'Unable to convert text to UUID', SCHEMA = 'dsql_local';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM sys.jobs j WHERE j.job_id = wait_for_job.job_id) THEN
    RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('job %s does not exist', job_id), SCHEMA = 'dsql_local';
  END IF;
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

CREATE FUNCTION dsql_local.on_ddl_end() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF r.command_tag IN ('CREATE INDEX', 'ALTER TABLE') AND r.object_type IN ('index', 'table') THEN
      PERFORM set_config('dsql_local.last_object', r.objid::text, true);
    END IF;
    IF r.command_tag = 'CREATE TABLE' AND r.object_type = 'table' THEN
      EXECUTE format('CREATE TRIGGER dsql_local_rows_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS dsql_local_new FOR EACH STATEMENT EXECUTE FUNCTION dsql_local.count_rows()', r.objid::regclass);
      EXECUTE format('CREATE TRIGGER dsql_local_rows_update AFTER UPDATE ON %s REFERENCING NEW TABLE AS dsql_local_new FOR EACH STATEMENT EXECUTE FUNCTION dsql_local.count_rows()', r.objid::regclass);
      EXECUTE format('CREATE TRIGGER dsql_local_rows_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS dsql_local_old FOR EACH STATEMENT EXECUTE FUNCTION dsql_local.count_rows()', r.objid::regclass);
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER dsql_local_ddl_end ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'CREATE INDEX', 'ALTER TABLE')
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
