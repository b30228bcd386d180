-- title: Balancing: rows and total variation distance to the target, before and after
-- requires: balance
-- TV = 0.5 * sum over bins of |share - target|.
WITH s AS (
    SELECT
        *,
        before / nullif(sum(before) OVER (), 0) AS p_before,
        after / nullif(sum(after) OVER (), 0) AS p_after
    FROM balance
)
SELECT
    count(*) AS bins,
    CAST(sum(before) AS BIGINT) AS rows_before,
    CAST(sum(after) AS BIGINT) AS rows_after,
    0.5 * sum(abs(p_before - target)) AS tv_before,
    0.5 * sum(abs(p_after - target)) AS tv_after
FROM s
HAVING count(*) > 0
