-- title: Judge (logical completeness): pass rate
-- requires: judgments
SELECT
    count(*) AS judged,
    sum(CAST(passed AS INTEGER)) AS passed,
    avg(CAST(passed AS DOUBLE)) AS pass_rate,
    sum(CAST(complete = false AS INTEGER)) AS incomplete,
    sum(CAST(parse_error IS NOT NULL AS INTEGER)) AS unparsable,
    avg(score) AS score_mean,
    quantile_cont(score, 0.5) AS score_p50
FROM judgments
HAVING count(*) > 0
