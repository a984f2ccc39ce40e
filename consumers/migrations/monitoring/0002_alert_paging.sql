-- Keyset pages of the alert API's list (GET /v1/alerts): newest first by (raised_at, alert_id),
-- the next page being the rows after the previous page's last key. Both columns never change
-- once an alert is raised, so a page never shifts when alerts are raised meanwhile.

-- Any list without a subject: the index gives the order, the other filters (study, site, rule,
-- severity, status) are checked on the rows it yields until a page is full.
CREATE INDEX alert_page ON alert (raised_at DESC, alert_id DESC);

-- One subject's alerts: too few among all for the index above to find a page quickly.
CREATE INDEX alert_page_by_subject ON alert (subject_id, raised_at DESC, alert_id DESC)
    WHERE subject_id IS NOT NULL;
