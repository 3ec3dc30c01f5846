-- Payouts: what each payment has due to its merchant, and the payouts with their lines.
--
-- payment_status gains when the processor settled the payment and what of it is due and not yet
-- paid out (its gross less our fee less refunds, net of earlier payouts): the payout loop asks
-- for the payments with something due (a hint; each Payment decides, domain/payout.py).
ALTER TABLE payment_status ADD COLUMN IF NOT EXISTS settled_at timestamptz;
ALTER TABLE payment_status ADD COLUMN IF NOT EXISTS payout_due_minor bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS payment_status_payout_due_idx ON payment_status (merchant_id, currency)
    WHERE payout_due_minor <> 0;
-- Our side of a settlement report: captures not yet settled, by processor and currency.
CREATE INDEX IF NOT EXISTS payment_status_unsettled_idx ON payment_status (processor, currency)
    WHERE settled_at IS NULL AND captured_minor > 0;

CREATE TABLE IF NOT EXISTS payouts (
    payout_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    currency text NOT NULL,
    cutoff date NOT NULL,
    -- created (with the bank), paid, failed, carried_forward (zero or less: nothing sent)
    status text NOT NULL,
    amount_minor bigint NOT NULL,
    carried_in_minor bigint NOT NULL,
    reserve_held_minor bigint NOT NULL,
    reserve_released_minor bigint NOT NULL,
    line_count integer NOT NULL,
    bank_reference text,
    failure_reason text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS payouts_merchant_idx ON payouts (merchant_id, created_at, payout_id);
CREATE INDEX IF NOT EXISTS payouts_unsent_idx ON payouts (created_at) WHERE status = 'created';

-- One row per payment a payout paid (gross, our fee, refunds, net), in the payout's order.
CREATE TABLE IF NOT EXISTS payout_lines (
    payout_id uuid NOT NULL,
    line_no integer NOT NULL,
    merchant_id uuid NOT NULL,
    payment_id uuid NOT NULL,
    gross_minor bigint NOT NULL,
    fee_minor bigint NOT NULL,
    refunds_minor bigint NOT NULL,
    net_minor bigint NOT NULL,
    PRIMARY KEY (payout_id, line_no)
);
CREATE INDEX IF NOT EXISTS payout_lines_payment_idx ON payout_lines (payment_id);

-- Row-level security as 0004: a merchant reads its own payouts; admin and compliance read all;
-- analysts none. The owner (migrations, replay) and the application (the worker writes, the
-- payout loop reads) see every row.
DO $$
DECLARE
    t text;
    table_owner name;
    sees_all text;
BEGIN
    FOREACH t IN ARRAY ARRAY['payouts', 'payout_lines'] LOOP
        SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner
        FROM pg_class c WHERE c.oid = to_regclass(t);

        EXECUTE format('GRANT SELECT ON %I TO echotransact_reader', t);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('DROP POLICY IF EXISTS owner_writes ON %I', t);
        EXECUTE format('CREATE POLICY owner_writes ON %I FOR ALL TO %I USING (true) WITH CHECK (true)',
                       t, table_owner);
        EXECUTE format('DROP POLICY IF EXISTS merchant_own_rows ON %I', t);
        EXECUTE format(
            'CREATE POLICY merchant_own_rows ON %I FOR SELECT TO echotransact_reader USING ('
            '    NULLIF(current_setting(''app.role'', true), '''') = ''merchant'''
            '    AND merchant_id = NULLIF(current_setting(''app.merchant_id'', true), '''')::uuid)', t);
        FOREACH sees_all IN ARRAY ARRAY['admin', 'compliance'] LOOP
            EXECUTE format('DROP POLICY IF EXISTS %I ON %I', sees_all || '_all_rows', t);
            EXECUTE format(
                'CREATE POLICY %I ON %I FOR SELECT TO echotransact_reader USING ('
                '    NULLIF(current_setting(''app.role'', true), '''') = %L)', sees_all || '_all_rows', t, sees_all);
        END LOOP;

        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I TO echotransact_app', t);
        EXECUTE format('DROP POLICY IF EXISTS app_writes ON %I', t);
        EXECUTE format('CREATE POLICY app_writes ON %I FOR ALL TO echotransact_app USING (true) WITH CHECK (true)', t);
    END LOOP;
END
$$;
