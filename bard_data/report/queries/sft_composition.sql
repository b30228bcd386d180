-- title: SFT rows by kind (budget-aware or standard chain) and source
-- requires: sft
SELECT
    kind,
    source,
    count(*) AS rows,
    count(DISTINCT problem_id) AS problems,
    min(budget) AS budget_min,
    max(budget) AS budget_max
FROM sft
GROUP BY kind, source
ORDER BY kind, source
