-- Evidence for disputes: a payment's card as a per-merchant hash of the vault's fingerprint, so
-- a merchant's evidence pack can find earlier payments with the same card without any reader
-- being able to link cards across merchants (the fingerprint itself stays masked everywhere).
ALTER TABLE payment_status ADD COLUMN IF NOT EXISTS card_fingerprint_hash text;
CREATE INDEX IF NOT EXISTS payment_status_card_idx ON payment_status (merchant_id, card_fingerprint_hash)
    WHERE card_fingerprint_hash IS NOT NULL;
