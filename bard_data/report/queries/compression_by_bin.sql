-- title: Compression ratio and budget deviation per budget bin
-- requires: compressions, balance
-- ratio = compressed_tokens / reasoning_tokens (of the gold chain); deviation = (compressed_tokens - budget) / budget.
-- Bins are the balancing bins (powers of two when the run has no balance report yet);
-- compressions outside them are grouped as 'outside'. Percentiles are linear-interpolated.
WITH pow2 AS (
    SELECT DISTINCT CAST(floor(log2(budget)) AS BIGINT) AS k
    FROM compressions
    WHERE budget > 0 AND NOT EXISTS (SELECT 1 FROM balance)
),
all_bins AS (
    SELECT bin_index, bin, lo, hi FROM balance
    UNION ALL
    SELECT
        CAST(row_number() OVER (ORDER BY k) - 1 AS INTEGER) AS bin_index,
        printf('[%d,%d)', CAST(pow(2, k) AS BIGINT), CAST(pow(2, k + 1) AS BIGINT)) AS bin,
        CAST(pow(2, k) AS BIGINT) AS lo,
        CAST(pow(2, k + 1) AS BIGINT) AS hi
    FROM pow2
),
bins AS (
    SELECT *, max(bin_index) OVER () AS last_bin FROM all_bins
),
c AS (
    SELECT c.*, b.bin_index, coalesce(b.bin, 'outside') AS bin, b.lo, b.hi
    FROM compressions c
    LEFT JOIN bins b
        ON c.budget >= b.lo AND (c.budget < b.hi OR (b.bin_index = b.last_bin AND c.budget <= b.hi))
)
SELECT
    bin,
    min(lo) AS lo,
    min(hi) AS hi,
    count(*) AS n,
    avg(ratio) AS ratio_mean,
    quantile_cont(ratio, 0.5) AS ratio_p50,
    quantile_cont(ratio, 0.9) AS ratio_p90,
    avg(deviation) AS deviation_mean,
    quantile_cont(deviation, 0.5) AS deviation_p50,
    quantile_cont(deviation, 0.9) AS deviation_p90,
    avg(CAST(within_tolerance AS DOUBLE)) AS within_tolerance_rate,
    avg(CAST(answer_preserved AS DOUBLE)) AS answer_preserved_rate
FROM c
GROUP BY bin, bin_index
ORDER BY bin_index NULLS LAST
