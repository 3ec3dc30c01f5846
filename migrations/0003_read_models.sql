-- Read models built by the projections (projections/). Every row is derived from events only
-- (times are the events' times, never now()), so a rebuild from zero gives identical rows.

-- Which version of each aggregate each projection has applied: a redelivered event is a no-op,
-- a gap is filled from the outbox before the event is applied.
CREATE TABLE IF NOT EXISTS projection_versions (
    projection text NOT NULL,
    aggregate_id uuid NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL,
    PRIMARY KEY (projection, aggregate_id)
);

-- Every event at or below this position is applied; catch-up scans the outbox from here.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    projection text PRIMARY KEY,
    position bigint NOT NULL
);

-- status ---------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS session_status (
    session_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    status text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    customer_phone_masked text NOT NULL,
    order_reference text NOT NULL,
    voice_platform text NOT NULL,
    conversation_id text NOT NULL,
    identity_required boolean NOT NULL,
    payment_id uuid,
    code_attempts integer NOT NULL DEFAULT 0,
    end_reason text,
    expires_at timestamptz NOT NULL,
    opened_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS session_status_merchant_idx ON session_status (merchant_id, opened_at);

CREATE TABLE IF NOT EXISTS payment_status (
    payment_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    session_id uuid,
    status text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    card_brand text NOT NULL,
    card_last4 text NOT NULL,
    processor text,
    authorized_minor bigint NOT NULL DEFAULT 0,
    captured_minor bigint NOT NULL DEFAULT 0,
    fee_minor bigint NOT NULL DEFAULT 0,
    refunded_minor bigint NOT NULL DEFAULT 0,
    failure_code text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS payment_status_merchant_idx ON payment_status (merchant_id, created_at, payment_id);

-- analytics ------------------------------------------------------------------------------
-- Sessions are counted in the funnel of the day (UTC) and platform they were opened on.
CREATE TABLE IF NOT EXISTS analytics_session_cohorts (
    session_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    day date NOT NULL,
    voice_platform text NOT NULL
);

CREATE TABLE IF NOT EXISTS funnel_daily (
    merchant_id uuid NOT NULL,
    day date NOT NULL,
    voice_platform text NOT NULL,
    opened bigint NOT NULL DEFAULT 0,
    link_sent bigint NOT NULL DEFAULT 0,
    link_opened bigint NOT NULL DEFAULT 0,
    code_verified bigint NOT NULL DEFAULT 0,
    identity_verified bigint NOT NULL DEFAULT 0,
    paid bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    expired bigint NOT NULL DEFAULT 0,
    cancelled bigint NOT NULL DEFAULT 0,
    locked bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, day, voice_platform)
);

-- Money is counted on the day (UTC) it moved.
CREATE TABLE IF NOT EXISTS volume_daily (
    merchant_id uuid NOT NULL,
    day date NOT NULL,
    currency text NOT NULL,
    authorized_count bigint NOT NULL DEFAULT 0,
    declined_count bigint NOT NULL DEFAULT 0,
    captured_count bigint NOT NULL DEFAULT 0,
    gross_captured_minor bigint NOT NULL DEFAULT 0,
    refunded_minor bigint NOT NULL DEFAULT 0,
    fees_minor bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, day, currency)
);

-- audit ----------------------------------------------------------------------------------
-- One row per event, personal data masked, chained in position order: each hash covers the
-- previous row's hash and this row's content. Rows arrive in any order; the chain is extended
-- over the gap-free prefix (hash stays NULL until then).
CREATE TABLE IF NOT EXISTS audit_log (
    position bigint PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    aggregate_id uuid NOT NULL,
    aggregate_type text NOT NULL,
    version bigint NOT NULL,
    merchant_id uuid,
    event_type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    data jsonb NOT NULL,
    prev_hash text,
    hash text
);
CREATE INDEX IF NOT EXISTS audit_log_aggregate_idx ON audit_log (aggregate_id, version);
CREATE INDEX IF NOT EXISTS audit_log_merchant_idx ON audit_log (merchant_id, position);
CREATE INDEX IF NOT EXISTS audit_log_unchained_idx ON audit_log (position) WHERE hash IS NULL;

-- balances -------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS ledger_balances (
    account text NOT NULL,
    currency text NOT NULL,
    -- Debits positive, credits negative: per currency the balances sum to zero.
    balance_minor bigint NOT NULL,
    -- Set for a merchant's own accounts (merchant:<id>:...), NULL for the platform's.
    merchant_id uuid,
    PRIMARY KEY (account, currency)
);
CREATE INDEX IF NOT EXISTS ledger_balances_merchant_idx ON ledger_balances (merchant_id);

-- The currency of each payment, for volumes of events that do not repeat it.
CREATE TABLE IF NOT EXISTS analytics_payments (
    payment_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    currency text NOT NULL
);
