-- Disputes: one row per dispute for merchants, compliance and admins (and analysts, for the rates:
-- a dispute row carries no personal data); payout lines say what disputes held or returned; the
-- processor's capture reference finds its payment.
CREATE TABLE IF NOT EXISTS disputes (
    dispute_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    payment_id uuid NOT NULL,
    processor text NOT NULL,
    processor_dispute_id text NOT NULL,
    -- needs_response, under_review, won, lost, accepted, expired
    status text NOT NULL,
    reason text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    fee_minor bigint NOT NULL,
    due_by timestamptz NOT NULL,
    evidence_submitted_at timestamptz,
    reminded boolean NOT NULL DEFAULT false,
    opened_at timestamptz NOT NULL,
    closed_at timestamptz,
    updated_at timestamptz NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS disputes_merchant_idx ON disputes (merchant_id, opened_at, dispute_id);
CREATE INDEX IF NOT EXISTS disputes_payment_idx ON disputes (payment_id);
CREATE INDEX IF NOT EXISTS disputes_due_idx ON disputes (due_by) WHERE status = 'needs_response';

ALTER TABLE payout_lines ADD COLUMN IF NOT EXISTS disputes_minor bigint NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS audit_log_capture_reference_idx ON audit_log ((data->>'processor_reference'))
    WHERE event_type = 'payment.captured';

DO $$
DECLARE
    table_owner name;
    sees_all text;
BEGIN
    SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner FROM pg_class c WHERE c.oid = 'disputes'::regclass;
    GRANT SELECT ON disputes TO echotransact_reader;
    ALTER TABLE disputes ENABLE ROW LEVEL SECURITY;
    ALTER TABLE disputes FORCE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS owner_writes ON disputes;
    EXECUTE format('CREATE POLICY owner_writes ON disputes FOR ALL TO %I USING (true) WITH CHECK (true)', table_owner);
    DROP POLICY IF EXISTS merchant_own_rows ON disputes;
    CREATE POLICY merchant_own_rows ON disputes FOR SELECT TO echotransact_reader USING (
        NULLIF(current_setting('app.role', true), '') = 'merchant'
        AND merchant_id = NULLIF(current_setting('app.merchant_id', true), '')::uuid);
    FOREACH sees_all IN ARRAY ARRAY['admin', 'analyst', 'compliance'] LOOP
        EXECUTE format('DROP POLICY IF EXISTS %I ON disputes', sees_all || '_all_rows');
        EXECUTE format('CREATE POLICY %I ON disputes FOR SELECT TO echotransact_reader USING ('
                       '    NULLIF(current_setting(''app.role'', true), '''') = %L)', sees_all || '_all_rows', sees_all);
    END LOOP;
    DROP POLICY IF EXISTS app_writes ON disputes;
    CREATE POLICY app_writes ON disputes FOR ALL TO echotransact_app USING (true) WITH CHECK (true);
END
$$;
GRANT SELECT, INSERT, UPDATE ON disputes TO echotransact_app;
