-- The transactional outbox and the command log, both written in the same transaction as the
-- events they belong to (adapters/postgres/event_store.py).

CREATE TABLE IF NOT EXISTS outbox (
    outbox_id bigserial PRIMARY KEY,
    -- The event's position in the ledger's notification log. The foreign key makes an outbox
    -- row without its event impossible, whatever the code does.
    position bigint NOT NULL UNIQUE REFERENCES ledger_events (notification_id),
    event_id uuid NOT NULL UNIQUE,
    topic text NOT NULL,
    message_key text NOT NULL,
    -- msgspec JSON envelope; encrypted with the application's cipher when CIPHER_KEY is set,
    -- because it carries the same personal data as the event.
    envelope bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    publish_attempts integer NOT NULL DEFAULT 0,
    last_error text
);

CREATE INDEX IF NOT EXISTS outbox_unpublished_idx
    ON outbox (outbox_id) WHERE published_at IS NULL;

CREATE TABLE IF NOT EXISTS command_log (
    command_id text PRIMARY KEY,
    command_name text NOT NULL,
    request_hash text NOT NULL,
    aggregate_id uuid,
    -- The command's JSON result (ids, status, position). Never personal data.
    result jsonb NOT NULL,
    position bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS command_log_created_at_idx ON command_log (created_at);
