-- title: Compression fidelity overall: budget adherence and answer preservation
-- requires: compressions
SELECT
    count(*) AS compressions,
    count(DISTINCT sample_id) AS chains,
    avg(CAST(within_tolerance AS DOUBLE)) AS within_tolerance_rate,
    avg(CAST(answer_preserved AS DOUBLE)) AS answer_preserved_rate,
    avg(CAST(within_tolerance AND answer_preserved AS DOUBLE)) AS both_rate,
    avg(ratio) AS ratio_mean,
    avg(deviation) AS deviation_mean,
    quantile_cont(abs(deviation), 0.5) AS abs_deviation_p50,
    avg(CAST(attempts > 1 AS DOUBLE)) AS retried_rate
FROM compressions
HAVING count(*) > 0
