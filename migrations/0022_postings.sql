-- Postings by effective time: every posting of every money event, with the event's occurred_at,
-- so balances can be read as of any moment (GET /v1/balances?as_of=, /v1/balances/history).
-- ledger_balances keeps the current sums; this table is their history. Written by the postings
-- projection (projections/postings.py), rebuilt and verified by `echotransact replay` like the rest.
CREATE TABLE IF NOT EXISTS ledger_postings (
    -- The event's position and the posting's place in it: an event may post to one account twice.
    position bigint NOT NULL,
    line_no integer NOT NULL,
    occurred_at timestamptz NOT NULL,
    account text NOT NULL,
    currency text NOT NULL,
    -- Debits positive, credits negative, as ledger_balances: each event's postings sum to zero
    -- per currency, so at any cut-off time the balances do too.
    amount_minor bigint NOT NULL,
    -- Set for a merchant's own accounts (merchant:<id>:...), NULL for the platform's.
    merchant_id uuid,
    PRIMARY KEY (position, line_no)
);
CREATE INDEX IF NOT EXISTS ledger_postings_account_idx ON ledger_postings (account, occurred_at);
CREATE INDEX IF NOT EXISTS ledger_postings_merchant_idx ON ledger_postings (merchant_id, occurred_at);
CREATE INDEX IF NOT EXISTS ledger_postings_time_idx ON ledger_postings (occurred_at);

-- Row-level security as ledger_balances (0004): a merchant reads its own accounts' postings, admin
-- all (the platform's accounts too), analysts and compliance none. The application inserts only:
-- a posting never changes, and a rebuild (TRUNCATE) is the owner's (grants as 0015).
DO $$
DECLARE
    table_owner name;
BEGIN
    SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner
    FROM pg_class c WHERE c.oid = 'ledger_postings'::regclass;
    GRANT SELECT ON ledger_postings TO echotransact_reader;
    ALTER TABLE ledger_postings ENABLE ROW LEVEL SECURITY;
    ALTER TABLE ledger_postings FORCE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS owner_writes ON ledger_postings;
    EXECUTE format('CREATE POLICY owner_writes ON ledger_postings FOR ALL TO %I USING (true) WITH CHECK (true)',
                   table_owner);
    -- NULL = anything is not true: no setting, no rows (a NULL merchant_id neither).
    DROP POLICY IF EXISTS merchant_own_rows ON ledger_postings;
    CREATE POLICY merchant_own_rows ON ledger_postings FOR SELECT TO echotransact_reader USING (
        NULLIF(current_setting('app.role', true), '') = 'merchant'
        AND merchant_id = NULLIF(current_setting('app.merchant_id', true), '')::uuid);
    DROP POLICY IF EXISTS admin_all_rows ON ledger_postings;
    CREATE POLICY admin_all_rows ON ledger_postings FOR SELECT TO echotransact_reader USING (
        NULLIF(current_setting('app.role', true), '') = 'admin');
    DROP POLICY IF EXISTS app_writes ON ledger_postings;
    CREATE POLICY app_writes ON ledger_postings FOR ALL TO echotransact_app USING (true) WITH CHECK (true);
END
$$;
GRANT SELECT, INSERT ON ledger_postings TO echotransact_app;
