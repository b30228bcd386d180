-- title: Stage counters (e.g. compressions that needed a retry)
-- requires: funnel
SELECT
    step,
    stage,
    substr(reason, 6) AS counter,
    count AS value
FROM funnel
WHERE reason LIKE 'note:%'
ORDER BY step, counter
