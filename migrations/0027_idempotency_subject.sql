-- The aggregate a completed HTTP idempotency record answered about (a payment session's id for
-- the session commands): the recorded response may hold the customer's masked phone for the key's
-- 24 hours, and a customer's erasure (adapters/postgres/customer_keys.py scrub_customer) deletes
-- the records of their sessions. A retry after that runs again, and the command log answers it.
ALTER TABLE idempotency_records ADD COLUMN IF NOT EXISTS subject_id uuid;
CREATE INDEX IF NOT EXISTS idempotency_records_subject_idx ON idempotency_records (subject_id)
    WHERE subject_id IS NOT NULL;
