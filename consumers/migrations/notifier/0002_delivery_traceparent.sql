-- The W3C trace context of the consumer transaction that created the delivery (the notifier's
-- `process` span of the alert event), so each attempt's webhook request continues the alert's
-- trace. NULL when the notifier does not export spans.
ALTER TABLE delivery ADD COLUMN traceparent text;
