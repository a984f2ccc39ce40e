-- The edit checks judge what is new, not a subject's whole history at every mark.
--
-- A mark names the data point it stands for (a reading or an adverse-event report stored with
-- it); the evaluator checks it and what the checks compare it with: the readings of its time
-- point, the days around it in a day-to-day series. A mark without one (a consent, a withdrawal,
-- or a mark made before this migration) has all of the subject's data checked again.
ALTER TABLE check_due ADD COLUMN event_id uuid;

-- A subject's readings of a code by effective time: the readings of one time point (diastolic vs
-- systolic at one instant), and a series by day (the weight change between consecutive days of
-- data; effective_on is effective_at's UTC day).
CREATE INDEX reading_code_time ON reading (study_id, subject_id, code, effective_at);
