-- Row-level security on the merchant-scoped read tables: the database itself keeps one merchant
-- from reading another's rows, whatever the query says (projections/views.py is the caller).
--
-- Readers switch to the role echotransact_reader for one transaction and say who they are with
-- two transaction-local settings:
--     SET LOCAL ROLE echotransact_reader;
--     SELECT set_config('app.role', 'merchant', true), set_config('app.merchant_id', '<uuid>', true);
-- Unset or empty settings match no policy, so a reader that forgot them sees no rows.
--
--   table                        merchant   analyst   compliance   admin
--   session_status               own        -         -            all
--   payment_status               own        -         -            all
--   funnel_daily                 own        all       all          all
--   volume_daily                 own        all       all          all
--   analytics_session_cohorts    own        -         all          all
--   analytics_payments           own        -         all          all
--   audit_log                    own        -         all          all
--   ledger_balances              own (*)    -         -            all
--   (*) platform accounts have no merchant_id and are never a merchant's own.
--
-- FORCE applies the policies to the tables' owner too; the projections write as the owner
-- (or as a superuser, which bypasses RLS), so the owner gets a policy that allows everything.
-- A separate writer role would need the same. The reader role owns nothing, so it never
-- bypasses the policies. CREATE ROLE is cluster-wide: the role may exist already.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'echotransact_reader') THEN
        CREATE ROLE echotransact_reader NOLOGIN;
    END IF;
EXCEPTION
    -- Another database of the cluster migrating at the same moment created it first.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- The application's login role must be able to SET ROLE to the reader. A superuser always can;
-- any other migrating role (normally the application's own) is granted it when allowed, else an
-- operator has to: GRANT echotransact_reader TO <application role>.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'echotransact_reader', 'SET') THEN
        EXECUTE format('GRANT echotransact_reader TO %I WITH SET TRUE', current_user);
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE WARNING 'cannot grant echotransact_reader to %: read views will fail until an operator does',
            current_user;
END
$$;

GRANT USAGE ON SCHEMA public TO echotransact_reader;

DO $$
DECLARE
    t record;
    table_owner name;
    sees_all text;
BEGIN
    FOR t IN
        SELECT * FROM (VALUES
            ('session_status',            ARRAY['admin']),
            ('payment_status',            ARRAY['admin']),
            ('funnel_daily',              ARRAY['admin', 'analyst', 'compliance']),
            ('volume_daily',              ARRAY['admin', 'analyst', 'compliance']),
            ('analytics_session_cohorts', ARRAY['admin', 'compliance']),
            ('analytics_payments',        ARRAY['admin', 'compliance']),
            ('audit_log',                 ARRAY['admin', 'compliance']),
            ('ledger_balances',           ARRAY['admin'])
        ) AS v(name, all_rows_for)
    LOOP
        SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner
        FROM pg_class c WHERE c.oid = to_regclass(t.name);

        EXECUTE format('GRANT SELECT ON %I TO echotransact_reader', t.name);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t.name);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t.name);

        EXECUTE format('DROP POLICY IF EXISTS owner_writes ON %I', t.name);
        EXECUTE format(
            'CREATE POLICY owner_writes ON %I FOR ALL TO %I USING (true) WITH CHECK (true)',
            t.name, table_owner);

        -- NULL = anything is not true: no setting, no rows (a NULL merchant_id neither).
        EXECUTE format('DROP POLICY IF EXISTS merchant_own_rows ON %I', t.name);
        EXECUTE format(
            'CREATE POLICY merchant_own_rows ON %I FOR SELECT TO echotransact_reader USING ('
            '    NULLIF(current_setting(''app.role'', true), '''') = ''merchant'''
            '    AND merchant_id = NULLIF(current_setting(''app.merchant_id'', true), '''')::uuid)',
            t.name);

        FOREACH sees_all IN ARRAY ARRAY['admin', 'analyst', 'compliance'] LOOP
            EXECUTE format('DROP POLICY IF EXISTS %I ON %I', sees_all || '_all_rows', t.name);
            IF sees_all = ANY (t.all_rows_for) THEN
                EXECUTE format(
                    'CREATE POLICY %I ON %I FOR SELECT TO echotransact_reader USING ('
                    '    NULLIF(current_setting(''app.role'', true), '''') = %L)',
                    sees_all || '_all_rows', t.name, sees_all);
            END IF;
        END LOOP;
    END LOOP;
END
$$;
