-- The durable record of HTTP idempotency keys (Redis holds a fast copy of completed ones).
-- A command's own idempotency is the command log's; this table makes the HTTP response the
-- same on a retry and tells a concurrent duplicate that the first is still running.

CREATE TABLE IF NOT EXISTS idempotency_records (
    scope text NOT NULL,            -- the merchant, or the key for non-merchant roles
    idempotency_key text NOT NULL,
    request_hash text NOT NULL,
    state text NOT NULL CHECK (state IN ('in_progress', 'completed')),
    response_status integer,
    response_body text,
    locked_until timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);

CREATE INDEX IF NOT EXISTS idempotency_records_expires_idx ON idempotency_records (expires_at);
