-- Raw records: what a dead letter carries is whatever a broken or hostile producer sent, so it is
-- kept as bytes end to end. A row with `raw_header_names` set is published with exactly its raw key
-- and raw headers (the `key`, `headers`, `event_type`, `content_type` and `traceparent` columns of
-- such a row are a printable summary for sharding and operators only). Text and jsonb columns
-- cannot hold NUL or invalid UTF-8; bytea can.
ALTER TABLE outbox
    ADD COLUMN key_bytes         bytea,
    ADD COLUMN raw_header_names  bytea[],
    ADD COLUMN raw_header_values bytea[],
    ADD CONSTRAINT outbox_raw_headers_paired CHECK (
        (raw_header_names IS NULL) = (raw_header_values IS NULL)
        AND coalesce(cardinality(raw_header_names) = cardinality(raw_header_values), true)
    );
