-- title: Funnel: rows in and out of every stage, and rows dropped by reason
-- requires: funnel
-- One row per (stage, drop reason); a stage that dropped nothing has one row with no reason.
-- Invariant: rows_in + added = rows_out + sum(dropped) per stage.
SELECT
    step,
    stage,
    rows_in,
    added,
    rows_out,
    reason,
    dropped
FROM funnel
WHERE reason IS NULL OR reason NOT LIKE 'note:%'
ORDER BY step, stage, reason NULLS FIRST
