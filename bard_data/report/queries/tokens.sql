-- title: LLM tokens and requests per model (cache hits cost nothing)
-- requires: tokens
SELECT
    coalesce(model, 'total') AS model,
    CAST(sum(prompt_tokens) AS BIGINT) AS prompt_tokens,
    CAST(sum(completion_tokens) AS BIGINT) AS completion_tokens,
    CAST(sum(prompt_tokens + completion_tokens) AS BIGINT) AS total_tokens,
    CAST(sum(requests_sent) AS BIGINT) AS requests_sent,
    CAST(sum(cache_hits) AS BIGINT) AS cache_hits
FROM tokens
GROUP BY ROLLUP (model)
HAVING count(*) > 0
ORDER BY model IS NULL, model
