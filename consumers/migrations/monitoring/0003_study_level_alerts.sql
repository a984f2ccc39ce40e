-- Study-level alerts (a quality tolerance limit breached) have neither subject nor site: one open
-- episode per study and rule as well. The episode key becomes the subject, else `site:<site>`,
-- else `site:` (the study).
DROP INDEX alert_one_open_episode;
CREATE UNIQUE INDEX alert_one_open_episode
    ON alert (study_id, (coalesce(subject_id, 'site:' || coalesce(site_id, ''))), rule_id)
    WHERE status <> 'resolved';
