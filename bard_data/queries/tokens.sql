-- title: LLM tokens and requests per model (cache hits cost nothing)
-- requires: tokens
SELECT
    coalesce(model, 'total') AS model,
    sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens,
    sum(prompt_tokens + completion_tokens) AS total_tokens,
    sum(requests_sent) AS requests_sent,
    sum(cache_hits) AS cache_hits
FROM tokens
GROUP BY ROLLUP (model)
HAVING count(*) > 0
ORDER BY model IS NULL, model
