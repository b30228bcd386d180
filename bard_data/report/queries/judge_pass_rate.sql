-- title: Judge (logical completeness): pass rate
-- requires: judgments
SELECT
    count(*) AS judged,
    count(*) FILTER (WHERE passed) AS passed,
    avg(CAST(passed AS DOUBLE)) AS pass_rate,
    count(*) FILTER (WHERE complete = false) AS incomplete,
    count(*) FILTER (WHERE parse_error IS NOT NULL) AS unparsable,
    avg(score) AS score_mean,
    quantile_cont(score, 0.5) AS score_p50
FROM judgments
HAVING count(*) > 0
