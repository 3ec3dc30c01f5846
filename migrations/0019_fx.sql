-- Merchants that settle in another currency: a payment's money is paid out in the currency its
-- settlement converted it to (NULL: its own currency).
ALTER TABLE payment_status ADD COLUMN IF NOT EXISTS payout_currency text;
DROP INDEX IF EXISTS payment_status_payout_due_idx;
CREATE INDEX IF NOT EXISTS payment_status_payout_due_idx
    ON payment_status (merchant_id, (COALESCE(payout_currency, currency))) WHERE payout_due_minor <> 0;
