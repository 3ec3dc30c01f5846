-- Risk rules before authorization (domain/risk.py, Ledger._start_processing).

-- Payment attempts per velocity key (a keyed hash of the customer's phone, or of the card's
-- fingerprint), so "attempts by this phone / card in the last N minutes" survives restarts and
-- is shared by every process. Written by adapters/postgres/velocity.py, idempotent per attempt.
CREATE TABLE IF NOT EXISTS risk_attempts (
    kind text NOT NULL CHECK (kind IN ('phone', 'card')),
    key text NOT NULL,
    attempt_id text NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (kind, key, attempt_id)
);
CREATE INDEX IF NOT EXISTS risk_attempts_window_idx ON risk_attempts (kind, key, at);
CREATE INDEX IF NOT EXISTS risk_attempts_at_idx ON risk_attempts (at);
REVOKE ALL ON risk_attempts FROM PUBLIC;

-- The risk verdicts in the read side: per payment, and counted per merchant, day and currency.
ALTER TABLE payment_status ADD COLUMN IF NOT EXISTS risk_score integer;
ALTER TABLE payment_status ADD COLUMN IF NOT EXISTS risk_decision text;
ALTER TABLE volume_daily ADD COLUMN IF NOT EXISTS risk_approved_count bigint NOT NULL DEFAULT 0;
ALTER TABLE volume_daily ADD COLUMN IF NOT EXISTS risk_review_count bigint NOT NULL DEFAULT 0;
ALTER TABLE volume_daily ADD COLUMN IF NOT EXISTS risk_declined_count bigint NOT NULL DEFAULT 0;
ALTER TABLE volume_daily ADD COLUMN IF NOT EXISTS risk_score_total bigint NOT NULL DEFAULT 0;
