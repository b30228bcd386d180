-- title: Teacher pass rate per source (sampled and imported traces)
-- requires: teacher_samples
-- pass_rate: correct samples / samples; solved_rate: problems with at least one correct sample.
WITH per_problem AS (
    SELECT source, origin, problem_id,
           count(*) AS samples,
           count(*) FILTER (WHERE is_correct) AS correct
    FROM teacher_samples
    GROUP BY source, origin, problem_id
)
SELECT
    source,
    origin,
    count(*) AS problems,
    CAST(sum(samples) AS BIGINT) AS samples,
    CAST(sum(correct) AS BIGINT) AS correct,
    sum(correct) / sum(samples) AS pass_rate,
    avg(CAST(correct > 0 AS DOUBLE)) AS solved_rate
FROM per_problem
GROUP BY source, origin
ORDER BY source, origin
