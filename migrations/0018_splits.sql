-- Splits: a payout line says what the splits gave other parties, and a partner merchant's shares
-- of other merchants' payments are due to it until a payout pays them.
ALTER TABLE payout_lines ADD COLUMN IF NOT EXISTS shares_minor bigint NOT NULL DEFAULT 0;

-- One row per payment and partner: its share, settled and not yet paid out (the payout loop's
-- hint, like payment_status.payout_due_minor for the payment's own merchant).
CREATE TABLE IF NOT EXISTS partner_dues (
    payment_id uuid NOT NULL,
    merchant_id uuid NOT NULL,  -- the partner
    currency text NOT NULL,
    due_minor bigint NOT NULL,
    PRIMARY KEY (payment_id, merchant_id)
);
CREATE INDEX IF NOT EXISTS partner_dues_due_idx ON partner_dues (merchant_id, currency) WHERE due_minor <> 0;

-- Only the application reads and writes it (the payout loop, the worker); no reader sees it.
DO $$
DECLARE
    table_owner name;
BEGIN
    SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner FROM pg_class c WHERE c.oid = 'partner_dues'::regclass;
    ALTER TABLE partner_dues ENABLE ROW LEVEL SECURITY;
    ALTER TABLE partner_dues FORCE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS owner_writes ON partner_dues;
    EXECUTE format('CREATE POLICY owner_writes ON partner_dues FOR ALL TO %I USING (true) WITH CHECK (true)',
                   table_owner);
    DROP POLICY IF EXISTS app_writes ON partner_dues;
    CREATE POLICY app_writes ON partner_dues FOR ALL TO echotransact_app USING (true) WITH CHECK (true);
END
$$;
GRANT SELECT, INSERT, UPDATE ON partner_dues TO echotransact_app;
