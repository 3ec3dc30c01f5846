-- Webhooks and commerce orders (adapters/notifications/webhooks.py, adapters/notifications/commerce.py).
--
-- The planner reads the outbox past its checkpoint and writes, in one transaction with the
-- checkpoint, what it must remember (merchant endpoints, sessions' orders, payments' sessions)
-- and one delivery per event and endpoint. The dispatcher sends due deliveries and logs every
-- attempt. Bodies hold masked event data only (like audit_log): no full phone, no card data.

CREATE TABLE IF NOT EXISTS webhook_checkpoint (
    name text PRIMARY KEY,
    -- Every outbox row at or below this position has been planned.
    position bigint NOT NULL,
    -- Events at or below this position update the planner's memory but are not delivered: a
    -- database that already had history when webhooks arrived does not send all of it.
    deliver_after bigint NOT NULL
);

INSERT INTO webhook_checkpoint (name, position, deliver_after)
SELECT 'webhooks', 0, COALESCE(max(position), 0) FROM outbox
ON CONFLICT (name) DO NOTHING;

-- The planner's memory, from earlier events (never from the aggregates: replayable from the feed).
CREATE TABLE IF NOT EXISTS webhook_merchants (
    merchant_id uuid PRIMARY KEY,
    webhook_url text,
    commerce_backend_uri text
);

CREATE TABLE IF NOT EXISTS webhook_sessions (
    session_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    callback_url text,
    order_reference text NOT NULL,
    line_items jsonb NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL
);

CREATE TABLE IF NOT EXISTS webhook_payments (
    payment_id uuid PRIMARY KEY,
    merchant_id uuid NOT NULL,
    session_id uuid
);

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id bigserial PRIMARY KEY,
    -- The event's id, sent as EchoTransact-Event-Id on every attempt and redelivery: the
    -- receiver drops a duplicate by it.
    event_id uuid NOT NULL,
    event_type text NOT NULL,
    position bigint NOT NULL,
    merchant_id uuid NOT NULL,
    kind text NOT NULL CHECK (kind IN ('merchant_webhook', 'session_callback', 'commerce_order')),
    endpoint_url text NOT NULL,
    -- The exact bytes sent (and signed) on every attempt.
    body bytea NOT NULL,
    idempotency_key text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    -- The retry horizon counts from here; a redelivery starts a new one.
    first_attempt_at timestamptz,
    last_attempt_at timestamptz,
    last_status_code integer,
    last_error text,
    delivered_at timestamptz,
    dead_at timestamptz,
    redeliveries integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    UNIQUE (event_id, endpoint_url, kind),
    -- An order without its idempotency key could be created twice by a retry.
    CONSTRAINT commerce_order_has_idempotency_key
        CHECK (kind <> 'commerce_order' OR coalesce(idempotency_key, '') <> '')
);

CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx
    ON webhook_deliveries (next_attempt_at, delivery_id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_url, delivery_id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_dead_idx ON webhook_deliveries (dead_at) WHERE status = 'dead';
CREATE INDEX IF NOT EXISTS webhook_deliveries_merchant_idx ON webhook_deliveries (merchant_id, delivery_id);

-- The delivery log: one row per attempt.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    attempt_id bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (delivery_id) ON DELETE CASCADE,
    merchant_id uuid NOT NULL,
    endpoint_url text NOT NULL,
    attempt integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    status_code integer,
    error text,
    duration_ms integer NOT NULL
);

CREATE INDEX IF NOT EXISTS webhook_attempts_endpoint_idx ON webhook_attempts (endpoint_url, attempted_at);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, attempt_id);

-- No grant to echotransact_reader: read views cannot see these tables. A merchant-facing
-- delivery log needs a later migration with the 0004 policies (merchant_id is on both tables).
