-- billing.customers: every version of every customer record (the topic is compacted and
-- keeps only the latest; the warehouse keeps the history). A repeated delivery of one
-- record replaces itself (same partition and offset).
CREATE TABLE IF NOT EXISTS customers
(
    account_id     String,
    timestamp      DateTime64(6, 'UTC'),
    name           Nullable(String),
    email          Nullable(String),
    address        Nullable(String),
    country        LowCardinality(Nullable(String)),
    tax_exempt     Bool,
    grace_hours    Int32,
    payment_method Nullable(String),
    _partition     UInt16,
    _offset        UInt64,
    _landed_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (account_id, _partition, _offset);

-- each account's customer as it is now: its latest record
CREATE VIEW IF NOT EXISTS customers_current AS
SELECT account_id, timestamp AS updated_at, name, email, address, country, tax_exempt,
       grace_hours, payment_method
FROM customers FINAL
ORDER BY account_id, timestamp DESC, _partition DESC, _offset DESC
LIMIT 1 BY account_id;

-- the card an attempt charged: the customer's payment method at the time of the attempt
-- (NULL for attempts landed before it was carried)
ALTER TABLE payment_attempts ADD COLUMN IF NOT EXISTS payment_method Nullable(String) AFTER gateway_reference;
