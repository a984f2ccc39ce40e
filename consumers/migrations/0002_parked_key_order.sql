-- Per-key order across parking: while a key has a parked message, later messages of that key on
-- that partition park behind it, and a parked message is retried only when no earlier message of
-- its key is parked. A hash index, because keys come from producers and may be of any size
-- (a B-tree refuses index rows over ~2.7 kB).
CREATE INDEX parked_key ON parked USING hash (key);
