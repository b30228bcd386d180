-- title: Judge score distribution (buckets of 0.1; no score = unparsable verdict)
-- requires: judgments
WITH j AS (
    SELECT
        CASE WHEN score IS NULL THEN NULL ELSE least(greatest(floor(score * 10), 0), 9) END AS bucket,
        passed
    FROM judgments
)
SELECT
    CASE WHEN bucket IS NULL THEN 'none'
         ELSE printf('[%.1f,%.1f%s', bucket / 10, (bucket + 1) / 10, CASE WHEN bucket = 9 THEN ']' ELSE ')' END)
    END AS score,
    count(*) AS n,
    count(*) / sum(count(*)) OVER () AS share,
    count(*) FILTER (WHERE passed) AS passed
FROM j
GROUP BY bucket
ORDER BY bucket NULLS LAST
