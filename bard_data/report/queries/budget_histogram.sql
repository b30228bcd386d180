-- title: Budget histogram of the budget-aware SFT rows, before and after balancing
-- requires: balance, sft, compressions
-- before/after/target come from the balance report the sft stage wrote (sft/_SUCCESS);
-- sft_rows recounts the budget rows of the sft table per bin (equals `after`), and
-- compressions counts every compression (before the answer/tolerance/judge filters) per bin.
WITH bins AS (
    SELECT *, max(bin_index) OVER () AS last_bin FROM balance
),
sft_bins AS (
    SELECT budget_bin AS bin, count(*) AS sft_rows
    FROM sft
    WHERE kind = 'budget'
    GROUP BY budget_bin
),
comp_bins AS (
    SELECT b.bin, count(c.budget) AS compressions
    FROM bins b
    LEFT JOIN compressions c
        ON c.budget >= b.lo AND (c.budget < b.hi OR (b.bin_index = b.last_bin AND c.budget <= b.hi))
    GROUP BY b.bin
)
SELECT
    b.bin_index,
    b.bin,
    b.lo,
    b.hi,
    coalesce(cb.compressions, 0) AS compressions,
    b.before,
    b.after,
    coalesce(s.sft_rows, 0) AS sft_rows,
    b.target,
    b.before / nullif(sum(b.before) OVER (), 0) AS share_before,
    b.after / nullif(sum(b.after) OVER (), 0) AS share_after
FROM bins b
LEFT JOIN sft_bins s ON s.bin = b.bin
LEFT JOIN comp_bins cb ON cb.bin = b.bin
ORDER BY b.bin_index
