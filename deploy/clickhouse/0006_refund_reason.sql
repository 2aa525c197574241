-- refunds: the reason given with the request (`reason` is why a refund was rejected);
-- NULL for refunds landed before it was carried
ALTER TABLE refunds ADD COLUMN IF NOT EXISTS refund_reason Nullable(String) AFTER gateway_reference;
