-- Least privilege: the application's login role, echotransact_app, and exactly what it may do.
--
--   role                 who                                        may
--   (the owner)          whoever runs migrations (MIGRATION_DATABASE_URL: `echotransact migrate`,
--                        the start-up migration of `echotransact run`, and `replay`): owns every
--                        table and function; an embedded server's is its superuser
--   echotransact_app     API, relay, worker, dispatch, webhooks     the grants below, nothing else
--   echotransact_reader  the read views (SET LOCAL ROLE, 0004)      SELECT under row-level security
--
-- echotransact_app is NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE. It never UPDATEs, DELETEs
-- or TRUNCATEs an event, a snapshot, an outbox row's content or the command log, and inserts
-- events only through ledger_append (below), never with an INSERT of its own: its positions stay
-- gap-free in commit order and every event has its outbox row. It cannot change an audit row's
-- content, nor the hash of a row already chained. The migration sets no password: on an
-- embedded server the unix socket trusts it; elsewhere an operator runs
--     ALTER ROLE echotransact_app PASSWORD '...';
-- A later migration that adds a table grants echotransact_app what it needs there, or nothing
-- (tests/integration/test_roles.py fails for a table nobody decided about).
--
-- CREATE ROLE is cluster-wide, so the role may exist already (another database of the cluster,
-- or an operator made it beforehand with its password): then only its attributes are checked.

DO $$
DECLARE
    r pg_roles%ROWTYPE;
BEGIN
    SELECT * INTO r FROM pg_roles WHERE rolname = 'echotransact_app';
    IF NOT FOUND THEN
        BEGIN
            CREATE ROLE echotransact_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;
        EXCEPTION
            -- Another database of the cluster migrating at the same moment created it first.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'cannot create the role echotransact_app as %', current_user
                    USING HINT = 'migrate as a role with CREATEROLE, or have a superuser run: CREATE ROLE '
                                 'echotransact_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE';
        END;
    ELSIF r.rolsuper OR r.rolbypassrls OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication
          OR NOT r.rolcanlogin THEN
        BEGIN
            ALTER ROLE echotransact_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'the role echotransact_app exists with privileges it must not have (superuser, '
                            'BYPASSRLS, CREATEDB, CREATEROLE or REPLICATION), and % cannot take them away',
                            current_user
                USING HINT = 'as a superuser: ALTER ROLE echotransact_app LOGIN NOSUPERUSER NOBYPASSRLS '
                             'NOCREATEDB NOCREATEROLE NOREPLICATION';
        END;
    END IF;
END
$$;

-- The read views switch to the reader role (SET LOCAL ROLE echotransact_reader) and nothing
-- else: membership without inheriting its privileges where the server knows the difference.
DO $$
BEGIN
    IF NOT pg_has_role('echotransact_app', 'echotransact_reader', 'MEMBER') THEN
        IF current_setting('server_version_num')::int >= 160000 THEN
            EXECUTE 'GRANT echotransact_reader TO echotransact_app WITH INHERIT FALSE, SET TRUE';
        ELSE
            EXECUTE 'GRANT echotransact_reader TO echotransact_app';
        END IF;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'cannot grant echotransact_reader to echotransact_app as %', current_user
        USING HINT = 'as a superuser: GRANT echotransact_reader TO echotransact_app WITH INHERIT FALSE, SET TRUE';
END
$$;

DO $$ BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO echotransact_app', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    -- Not the database's owner; PUBLIC's default CONNECT may be all it needs.
    IF NOT has_database_privilege('echotransact_app', current_database(), 'CONNECT') THEN
        RAISE EXCEPTION 'echotransact_app cannot connect to database %', current_database()
            USING HINT = format('as its owner: GRANT CONNECT ON DATABASE %I TO echotransact_app', current_database());
    END IF;
END $$;
GRANT USAGE ON SCHEMA public TO echotransact_app;

-- The write path -------------------------------------------------------------------------------
-- Events, their outbox rows, SMS, card attachments and the command record are written by
-- ledger_append (0013) only. Its LOCK TABLE ledger_events IN EXCLUSIVE MODE needs UPDATE, DELETE
-- or TRUNCATE on the table, which the application must not have: the function runs as its
-- owner (SECURITY DEFINER) with a fixed search_path, so no object of another schema can stand in
-- for the tables it names, and only echotransact_app (and the owner) may call it.
DO $$ BEGIN
    EXECUTE format(
        'ALTER FUNCTION ledger_append(uuid[], bigint[], text[], bytea[], uuid[], text[], text[], bytea[],'
        ' uuid[], uuid[], bytea[], text[], uuid[], integer, text, text, text, uuid, jsonb)'
        ' SECURITY DEFINER SET search_path = %I, pg_temp', current_schema());
END $$;
REVOKE ALL ON FUNCTION ledger_append(uuid[], bigint[], text[], bytea[], uuid[], text[], text[], bytea[],
    uuid[], uuid[], bytea[], text[], uuid[], integer, text, text, text, uuid, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger_append(uuid[], bigint[], text[], bytea[], uuid[], text[], text[], bytea[],
    uuid[], uuid[], bytea[], text[], uuid[], integer, text, text, text, uuid, jsonb) TO echotransact_app;

GRANT SELECT ON ledger_events, command_log TO echotransact_app;
-- The library writes snapshots with plain INSERTs (no lock) and never changes one.
GRANT SELECT, INSERT ON ledger_snapshots TO echotransact_app;
-- The relay marks what it published (or why it could not); the rows themselves stay as written.
GRANT SELECT ON outbox TO echotransact_app;
GRANT UPDATE (published_at, publish_attempts, last_error) ON outbox TO echotransact_app;

-- Side tables ------------------------------------------------------------------------------------
-- DELETE where retention (adapters/postgres/retention.py) or the code itself removes rows. A
-- retention batch locks its rows first (SELECT ... FOR UPDATE SKIP LOCKED), which PostgreSQL
-- allows only with UPDATE on some column: where nothing else updates the table, that is one
-- column no code changes, worth no more than the DELETE already granted.
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_records TO echotransact_app;
GRANT SELECT, UPDATE, DELETE ON outbox_messages TO echotransact_app;           -- SMS: queued by ledger_append
GRANT SELECT, INSERT, DELETE ON dev_sms_inbox TO echotransact_app;
GRANT UPDATE (received_at) ON dev_sms_inbox TO echotransact_app;                -- retention's row locks
GRANT SELECT, INSERT, UPDATE ON webhook_checkpoint, webhook_merchants, webhook_sessions, webhook_payments
    TO echotransact_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_deliveries TO echotransact_app;
GRANT SELECT, INSERT, DELETE ON webhook_attempts TO echotransact_app;
GRANT UPDATE (attempted_at) ON webhook_attempts TO echotransact_app;            -- retention's row locks
GRANT USAGE ON SEQUENCE webhook_deliveries_delivery_id_seq, webhook_attempts_attempt_id_seq TO echotransact_app;
GRANT SELECT, INSERT, DELETE ON card_vault TO echotransact_app;                 -- attached by ledger_append
GRANT UPDATE (created_at) ON card_vault TO echotransact_app;                    -- retention's row locks
GRANT SELECT, INSERT, DELETE ON risk_attempts TO echotransact_app;
GRANT UPDATE (at) ON risk_attempts TO echotransact_app;                         -- retention's row locks

-- Read models: the worker inserts and updates them; emptying them is `echotransact replay`'s,
-- which runs as the owner (TRUNCATE, and a scratch schema for --verify).
GRANT SELECT, INSERT, UPDATE ON projection_versions, projection_checkpoints TO echotransact_app;
GRANT SELECT, INSERT, UPDATE ON session_status, payment_status, analytics_session_cohorts, funnel_daily,
    volume_daily, analytics_payments, ledger_balances TO echotransact_app;
-- The audit log is append-only: rows are inserted, and a row that arrived before the one it
-- follows gets its hashes once that one is there (projections/audit.py). Nothing else changes.
GRANT SELECT, INSERT ON audit_log TO echotransact_app;
GRANT UPDATE (prev_hash, hash) ON audit_log TO echotransact_app;

-- A chained audit row is final for everyone but the owner: setting the hashes of a row still
-- waiting for its predecessor is the only update the worker makes.
CREATE OR REPLACE FUNCTION audit_log_chained_rows_are_final() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'USAGE') THEN
        RAISE EXCEPTION 'audit_log row % is already chained and cannot change', OLD.position
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION audit_log_chained_rows_are_final() FROM PUBLIC;
DROP TRIGGER IF EXISTS audit_log_chained_rows_are_final ON audit_log;
CREATE TRIGGER audit_log_chained_rows_are_final BEFORE UPDATE ON audit_log
    FOR EACH ROW WHEN (OLD.hash IS NOT NULL) EXECUTE FUNCTION audit_log_chained_rows_are_final();

-- Row-level security (0004) applies to every role but the owner's policy: the application sees
-- and writes every row of the read tables; merchants' scoping is the reader's.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['session_status', 'payment_status', 'funnel_daily', 'volume_daily',
                             'analytics_session_cohorts', 'analytics_payments', 'ledger_balances'] LOOP
        EXECUTE format('DROP POLICY IF EXISTS app_writes ON %I', t);
        EXECUTE format('CREATE POLICY app_writes ON %I FOR ALL TO echotransact_app USING (true) WITH CHECK (true)', t);
    END LOOP;
END
$$;
DROP POLICY IF EXISTS app_reads ON audit_log;
CREATE POLICY app_reads ON audit_log FOR SELECT TO echotransact_app USING (true);
DROP POLICY IF EXISTS app_appends ON audit_log;
CREATE POLICY app_appends ON audit_log FOR INSERT TO echotransact_app WITH CHECK (true);
DROP POLICY IF EXISTS app_chains ON audit_log;
CREATE POLICY app_chains ON audit_log FOR UPDATE TO echotransact_app USING (true) WITH CHECK (true);
