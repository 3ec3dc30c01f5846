-- Issue 13: the funnel's card step, the reasons of declines and risk declines, and the webhook
-- signing secret's version.

-- Webhooks (adapters/notifications/webhooks.py) ---------------------------------------------------
-- What the planner remembers of a merchant's signing secret (merchant.webhook_secret_rotated): its
-- version and until when the previous version still signs. Never the secret: it is derived.
ALTER TABLE webhook_merchants ADD COLUMN IF NOT EXISTS secret_version integer NOT NULL DEFAULT 1;
ALTER TABLE webhook_merchants ADD COLUMN IF NOT EXISTS previous_secret_valid_until timestamptz;

-- Analytics (projections/analytics.py) -----------------------------------------------------------
-- The card step: sessions that attached a card (payment_session.payment_method_attached), counted
-- once per session however many cards it tried; the cohort row remembers that it was counted.
ALTER TABLE funnel_daily ADD COLUMN IF NOT EXISTS card_attached bigint NOT NULL DEFAULT 0;
ALTER TABLE analytics_session_cohorts ADD COLUMN IF NOT EXISTS card_attached boolean NOT NULL DEFAULT false;
-- A payment's session, for its voice platform in the reasons below.
ALTER TABLE analytics_payments ADD COLUMN IF NOT EXISTS session_id uuid;

-- Why payments did not go through, per merchant, day (UTC, the day of the event), voice platform
-- and currency: kind 'decline' counts payment.failed by reason_code (the processor's decline
-- codes, and risk_declined), kind 'risk' counts each reason of a payment.risk_assessed that
-- declined (a payment declined for two reasons counts under both).
CREATE TABLE IF NOT EXISTS decline_reasons_daily (
    merchant_id uuid NOT NULL,
    day date NOT NULL,
    voice_platform text NOT NULL,
    currency text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('decline', 'risk')),
    reason text NOT NULL,
    payments bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, day, voice_platform, currency, kind, reason)
);
CREATE INDEX IF NOT EXISTS decline_reasons_daily_day_idx ON decline_reasons_daily (day);

-- Each reason of each payment event, waiting to be counted above: the voice platform is the
-- session's, another aggregate whose events may arrive before or after the payment's, so a reason
-- is counted (counted = true, once) when both its payment and its session's cohort are here. The
-- projection's own bookkeeping: no reader may read it (no grant to echotransact_reader).
CREATE TABLE IF NOT EXISTS analytics_payment_reasons (
    payment_id uuid NOT NULL,
    version bigint NOT NULL,  -- the event's, so each event's reasons are recorded once
    kind text NOT NULL,
    reason text NOT NULL,
    day date NOT NULL,
    counted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (payment_id, version, kind, reason)
);
CREATE INDEX IF NOT EXISTS analytics_payment_reasons_waiting_idx ON analytics_payment_reasons (payment_id)
    WHERE NOT counted;
GRANT SELECT, INSERT, UPDATE ON analytics_payment_reasons TO echotransact_app;

-- Row-level security as funnel_daily (0004): a merchant reads its own rows; admin, analysts and
-- compliance all. The application inserts and updates (grants as 0015); emptying it is replay's.
DO $$
DECLARE
    table_owner name;
    sees_all text;
BEGIN
    SELECT pg_get_userbyid(c.relowner) INTO STRICT table_owner
    FROM pg_class c WHERE c.oid = 'decline_reasons_daily'::regclass;
    GRANT SELECT ON decline_reasons_daily TO echotransact_reader;
    ALTER TABLE decline_reasons_daily ENABLE ROW LEVEL SECURITY;
    ALTER TABLE decline_reasons_daily FORCE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS owner_writes ON decline_reasons_daily;
    EXECUTE format('CREATE POLICY owner_writes ON decline_reasons_daily FOR ALL TO %I USING (true) WITH CHECK (true)',
                   table_owner);
    -- NULL = anything is not true: no setting, no rows.
    DROP POLICY IF EXISTS merchant_own_rows ON decline_reasons_daily;
    CREATE POLICY merchant_own_rows ON decline_reasons_daily FOR SELECT TO echotransact_reader USING (
        NULLIF(current_setting('app.role', true), '') = 'merchant'
        AND merchant_id = NULLIF(current_setting('app.merchant_id', true), '')::uuid);
    FOREACH sees_all IN ARRAY ARRAY['admin', 'analyst', 'compliance'] LOOP
        EXECUTE format('DROP POLICY IF EXISTS %I ON decline_reasons_daily', sees_all || '_all_rows');
        EXECUTE format(
            'CREATE POLICY %I ON decline_reasons_daily FOR SELECT TO echotransact_reader USING ('
            '    NULLIF(current_setting(''app.role'', true), '''') = %L)',
            sees_all || '_all_rows', sees_all);
    END LOOP;
    DROP POLICY IF EXISTS app_writes ON decline_reasons_daily;
    CREATE POLICY app_writes ON decline_reasons_daily FOR ALL TO echotransact_app USING (true) WITH CHECK (true);
END
$$;
GRANT SELECT, INSERT, UPDATE ON decline_reasons_daily TO echotransact_app;

-- The new columns and table hold nothing of the events already applied: the analytics projection
-- starts again from the first event. Its rows and positions are emptied here, in the migration's
-- transaction, and the worker's catch-up applies the whole outbox to it (the other projections
-- skip those events by their versions), as `echotransact replay --projections analytics` would.
TRUNCATE analytics_session_cohorts, analytics_payments, funnel_daily, volume_daily, analytics_payment_reasons,
    decline_reasons_daily;
DELETE FROM projection_versions WHERE projection = 'analytics';
DELETE FROM projection_checkpoints WHERE projection = 'analytics';
