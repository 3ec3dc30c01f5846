-- Messages to the outside world that are not events (an SMS carrying a one-time code),
-- written in the same transaction as the event that causes them (adapters/postgres/event_store.py) and
-- sent by the dispatcher (adapters/notifications/sms.py). The payload is encrypted like the events.

CREATE TABLE IF NOT EXISTS outbox_messages (
    message_id uuid PRIMARY KEY,          -- also the provider's idempotency key
    kind text NOT NULL,                   -- 'sms'
    aggregate_id uuid NOT NULL,           -- the payment session it belongs to
    payload bytea NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    provider_reference text,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_messages_due_idx ON outbox_messages (next_attempt_at) WHERE state = 'pending';

-- The development SMS provider's mailbox: what a developer's phone would have received.
CREATE TABLE IF NOT EXISTS dev_sms_inbox (
    message_id uuid PRIMARY KEY,
    to_phone text NOT NULL,
    body text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
