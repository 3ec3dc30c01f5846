-- Indexes for data retention (adapters/postgres/retention.py): each rule finds its oldest rows by index
-- instead of scanning the table. idempotency_records (expires_at), risk_attempts (at) and dead
-- webhook deliveries (dead_at) have theirs already.
--
-- Plain CREATE INDEX (the runner applies a file in one transaction): on a large existing table it
-- blocks writes to that table while it builds. Where that matters, create them beforehand with
-- CREATE INDEX CONCURRENTLY under the same names; IF NOT EXISTS then makes this file a no-op.

CREATE INDEX IF NOT EXISTS webhook_attempts_attempted_at_idx ON webhook_attempts (attempted_at);

CREATE INDEX IF NOT EXISTS webhook_deliveries_delivered_idx
    ON webhook_deliveries (delivered_at) WHERE status = 'delivered';

CREATE INDEX IF NOT EXISTS outbox_messages_finished_idx
    ON outbox_messages (created_at) WHERE state IN ('sent', 'failed');

CREATE INDEX IF NOT EXISTS dev_sms_inbox_received_idx ON dev_sms_inbox (received_at);
