-- Randomizations lock only the slot they take (`FOR UPDATE SKIP LOCKED`), no longer the list's
-- row: the list's used-slot counter is gone (count the slots with a subject instead), and free
-- slots are found through a partial index that holds them only.
ALTER TABLE randomization_list DROP COLUMN slots_used;
CREATE INDEX free_slot ON randomization_slot (study_id, stratum, sequence) WHERE subject_id IS NULL;
