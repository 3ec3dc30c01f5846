-- Which vaulted cards were attached to a payment, written in the same transaction as the
-- payment_session.payment_method_attached event (adapters/postgres/event_store.py), so retention can
-- delete cards a customer typed but never paid with (adapters/postgres/retention.py) and keep the rest.
ALTER TABLE card_vault ADD COLUMN IF NOT EXISTS attached_at timestamptz;
ALTER TABLE card_vault ADD COLUMN IF NOT EXISTS payment_id uuid;
-- Cards vaulted before this migration cannot be matched to payments cheaply (tokens live in
-- encrypted events): count them as attached, so none is deleted.
UPDATE card_vault SET attached_at = created_at WHERE attached_at IS NULL;
CREATE INDEX IF NOT EXISTS card_vault_unattached_idx ON card_vault (created_at) WHERE attached_at IS NULL;
