-- The marks become append-only queues. A worker inserts a mark and never conflicts with another
-- row, so it never waits for the evaluator, which used to hold a subject's or a study's mark
-- locked (taken, not yet committed) while it ran the checks: under load, most of the consumer's
-- time went to that wait. The evaluator deletes the marks it read; a mark committed after its
-- read is taken at the next pass, with the changes it stands for, so none is lost.
ALTER TABLE check_due DROP CONSTRAINT check_due_pkey;
ALTER TABLE check_due ADD COLUMN mark_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;

ALTER TABLE dirty DROP COLUMN partition;
ALTER TABLE dirty ADD COLUMN mark_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
