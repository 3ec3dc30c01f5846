-- The card vault (adapters/postgres/vault.py): card numbers and expiry dates, AES-GCM encrypted under the
-- vault's own key (ECHOTRANSACT_VAULT_KEY, not the event store's), referred to elsewhere only by
-- token, brand and last four digits. The CVV is never stored anywhere.

CREATE TABLE IF NOT EXISTS card_vault (
    token text PRIMARY KEY CHECK (token ~ '^card_[a-z]{30}$'),
    -- AES-GCM of {number, exp_month, exp_year} with the token as authenticated data; the
    -- 16-byte tag is appended.
    ciphertext bytea NOT NULL,
    nonce bytea NOT NULL CHECK (octet_length(nonce) = 12),
    brand text NOT NULL CHECK (brand IN ('visa', 'mastercard', 'amex', 'discover', 'jcb', 'diners',
                                         'unionpay', 'unknown')),
    last4 text NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Readers of the read models (echotransact_reader, migration 0004) never see the vault.
REVOKE ALL ON card_vault FROM PUBLIC;
