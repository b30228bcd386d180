-- title: RL prompts by split and source
-- requires: rl
SELECT
    coalesce(split, 'train') AS split,
    source,
    count(*) AS rows,
    avg(difficulty) AS difficulty_mean,
    min(budget) AS budget_min,
    max(budget) AS budget_max
FROM rl
GROUP BY coalesce(split, 'train'), source
ORDER BY split, source
