-- Reconciliations on the read side (projections/reconciliations.py): one row per processor's day
-- reconciled (reconciliation.reconciled), and one row per finding of it. Rows come from events
-- only, so a rebuild from zero gives identical rows (echotransact replay --verify compares both).
--
-- Also: the platform's webhook (adapters/notifications/webhooks.py) is a delivery kind of its own.

CREATE TABLE IF NOT EXISTS reconciliations (
    reconciliation_id uuid PRIMARY KEY,
    processor text NOT NULL,
    day date NOT NULL,
    currency text NOT NULL,
    -- Findings per outcome (domain/reconciliation.py FINDINGS); discrepancy_count is the sum of
    -- amount_mismatch, missing_from_report and unknown_to_us (late ones were paid, only late).
    matched_count integer NOT NULL,
    amount_mismatch_count integer NOT NULL,
    missing_from_report_count integer NOT NULL,
    unknown_to_us_count integer NOT NULL,
    late_count integer NOT NULL,
    discrepancy_count integer NOT NULL,
    -- The report's deposits as the event has them: [{"deposit_id": ..., "total_minor": ...}].
    deposits jsonb NOT NULL,
    reconciled_at timestamptz NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL,
    -- The id derives from these three (domain/reconciliation.py reconciliation_id); the index
    -- also serves the processor filter over a range of days.
    UNIQUE (processor, day, currency)
);
-- The list: newest day first, paged by (day, id); and only the days with discrepancies.
CREATE INDEX IF NOT EXISTS reconciliations_day_idx ON reconciliations (day, reconciliation_id);
CREATE INDEX IF NOT EXISTS reconciliations_discrepancies_idx ON reconciliations (day, reconciliation_id)
    WHERE discrepancy_count > 0;

CREATE TABLE IF NOT EXISTS reconciliation_findings (
    reconciliation_id uuid NOT NULL,
    -- The finding's place in the event's list, from 1: a rebuild numbers them the same.
    finding_no integer NOT NULL,
    outcome text NOT NULL,
    discrepancy boolean NOT NULL,
    processor_reference text NOT NULL,
    kind text NOT NULL,
    payment_id uuid,
    expected_minor bigint,
    reported_minor bigint,
    fee_minor bigint,
    deposit_id text,
    PRIMARY KEY (reconciliation_id, finding_no)
);
-- One reconciliation's discrepancies without reading its matched lines (a busy day has thousands).
CREATE INDEX IF NOT EXISTS reconciliation_findings_discrepancies_idx
    ON reconciliation_findings (reconciliation_id, finding_no) WHERE discrepancy;

-- Row-level security as in 0004, and the application's grants as in 0015. The rows are the
-- platform's, no merchant's (there is no merchant_id): compliance and admin see every row,
-- merchants and analysts none (no policy of theirs, so no rows). The worker only inserts: the
-- aggregate has one event, and a rebuild (TRUNCATE) is the owner's.
DO $$
DECLARE
    t text;
    table_owner name;
    sees_all text;
BEGIN
    FOREACH t IN ARRAY ARRAY['reconciliations', 'reconciliation_findings'] LOOP
        SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner
        FROM pg_class c WHERE c.oid = to_regclass(t);

        EXECUTE format('GRANT SELECT ON %I TO echotransact_reader', t);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);

        EXECUTE format('DROP POLICY IF EXISTS owner_writes ON %I', t);
        EXECUTE format('CREATE POLICY owner_writes ON %I FOR ALL TO %I USING (true) WITH CHECK (true)',
                       t, table_owner);

        FOREACH sees_all IN ARRAY ARRAY['admin', 'compliance'] LOOP
            EXECUTE format('DROP POLICY IF EXISTS %I ON %I', sees_all || '_all_rows', t);
            EXECUTE format(
                'CREATE POLICY %I ON %I FOR SELECT TO echotransact_reader USING ('
                '    NULLIF(current_setting(''app.role'', true), '''') = %L)',
                sees_all || '_all_rows', t, sees_all);
        END LOOP;

        EXECUTE format('GRANT SELECT, INSERT ON %I TO echotransact_app', t);
        EXECUTE format('DROP POLICY IF EXISTS app_writes ON %I', t);
        EXECUTE format('CREATE POLICY app_writes ON %I FOR ALL TO echotransact_app USING (true) WITH CHECK (true)', t);
    END LOOP;
END
$$;

-- The platform's webhook (ECHOTRANSACT_PLATFORM_WEBHOOK_URL): reconciliations with discrepancies.
-- Its deliveries carry the platform's fixed id (adapters/notifications/webhooks.py PLATFORM_ID)
-- in merchant_id, the id whose secret signs them, as a merchant's id does for its own.
ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_kind_check;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_kind_check
    CHECK (kind IN ('merchant_webhook', 'session_callback', 'commerce_order', 'platform_webhook'));
