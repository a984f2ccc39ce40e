-- Each subject's readings and adverse-event reports counted by how late they were recorded, kept
-- as they are stored: the KRIs that count inputs (data-entry lag, query rate) sum a few rows per
-- subject instead of reading every stored input at each evaluation.
-- dated: the input's clinical date is known to the day; lag: its UTC recording day minus that
-- day (0 when not dated).
CREATE TABLE input_count (
    study_id   text NOT NULL,
    subject_id text NOT NULL,
    dated      boolean NOT NULL,
    lag        integer NOT NULL,
    n          bigint NOT NULL,
    PRIMARY KEY (study_id, subject_id, dated, lag)
);

INSERT INTO input_count (study_id, subject_id, dated, lag, n)
SELECT study_id, subject_id, on_day IS NOT NULL, coalesce((recorded_at AT TIME ZONE 'UTC')::date - on_day, 0),
       count(*)
FROM (
    SELECT study_id, subject_id, effective_on AS on_day, recorded_at FROM reading
    UNION ALL
    SELECT study_id, subject_id, onset_on, recorded_at FROM ae_report
) AS i
GROUP BY 1, 2, 3, 4;
