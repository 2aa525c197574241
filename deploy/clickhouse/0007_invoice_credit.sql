-- The invoice's finalization and credit (the rating contract, version 2): when it was
-- finalized, the credit balance it took and what payments collects. Rows landed before
-- take what those records meant: finalized when issued, no credit, the total when positive.
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS finalized_at DateTime64(6, 'UTC') DEFAULT issued_at AFTER payment_method;
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS credit_applied Decimal(38, 9) DEFAULT 0 AFTER finalized_at;
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS amount_due Decimal(38, 9) DEFAULT greatest(total, toDecimal128(0, 9)) AFTER credit_applied;

-- the bulk landing (0003) reads the new schema: its Null table and views again
DROP VIEW IF EXISTS invoices_from_avro;
DROP VIEW IF EXISTS invoice_lines_from_avro;
DROP TABLE IF EXISTS invoices_avro;

CREATE TABLE IF NOT EXISTS invoices_avro
(
    _partition Int32,
    _offset    Int64,
    value Tuple(
        invoice_id String,
        account_id String,
        subscription_id String,
        plan_id String,
        currency String,
        issued_at DateTime64(6, 'UTC'),
        reason String,
        lines Array(Tuple(
            charge_id String,
            kind String,
            period_start DateTime64(6, 'UTC'),
            period_end DateTime64(6, 'UTC'),
            quantity Decimal(38, 9),
            amount Decimal(38, 9))),
        total Decimal(38, 9),
        payment_method Nullable(String),
        finalized_at Nullable(DateTime64(6, 'UTC')),
        credit_applied Nullable(Decimal(38, 9)),
        amount_due Nullable(Decimal(38, 9)))
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS invoice_lines_from_avro TO invoice_lines AS
SELECT
    value.invoice_id AS invoice_id,
    toUInt16(n - 1) AS line_no,
    value.account_id AS account_id,
    value.subscription_id AS subscription_id,
    value.currency AS currency,
    value.issued_at AS issued_at,
    tupleElement(line, 'charge_id') AS charge_id,
    tupleElement(line, 'kind') AS kind,
    tupleElement(line, 'period_start') AS period_start,
    tupleElement(line, 'period_end') AS period_end,
    tupleElement(line, 'quantity') AS quantity,
    tupleElement(line, 'amount') AS amount
FROM invoices_avro
ARRAY JOIN value.lines AS line, arrayEnumerate(value.lines) AS n;

CREATE MATERIALIZED VIEW IF NOT EXISTS invoices_from_avro TO invoices AS
SELECT
    value.invoice_id AS invoice_id,
    value.account_id AS account_id,
    value.subscription_id AS subscription_id,
    value.plan_id AS plan_id,
    value.currency AS currency,
    value.issued_at AS issued_at,
    value.reason AS reason,
    value.total AS total,
    arraySum(arrayMap(
        l -> if(tupleElement(l, 'kind') IN ('flat', 'proration_credit', 'proration_charge'),
                tupleElement(l, 'amount'), toDecimal128(0, 9)),
        value.lines)) AS recurring_total,
    arraySum(arrayMap(
        l -> if(tupleElement(l, 'kind') IN ('flat', 'proration_credit', 'proration_charge'),
                toDecimal128(0, 9), tupleElement(l, 'amount')),
        value.lines)) AS usage_total,
    toUInt16(length(value.lines)) AS line_count,
    value.payment_method AS payment_method,
    ifNull(value.finalized_at, value.issued_at) AS finalized_at,
    ifNull(value.credit_applied, toDecimal128(0, 9)) AS credit_applied,
    ifNull(value.amount_due, greatest(value.total, toDecimal128(0, 9))) AS amount_due,
    toUInt16(_partition) AS _partition,
    toUInt64(_offset) AS _offset
FROM invoices_avro;
