-- title: LLM cost and throughput per stage
-- requires: llm_usage
-- Requests the stage sent and took from the completion cache, tokens, the seconds spent inside
-- the backends' generate calls (summed over Ray workers), completion tokens per second of them,
-- and the cost where the recipe prices the backend (price: input_per_mtok, output_per_mtok).
SELECT
    coalesce(stage, 'total') AS stage,
    string_agg(DISTINCT model, ', ') AS models,
    CAST(sum(requests_sent) AS BIGINT) AS requests_sent,
    CAST(sum(cache_hits) AS BIGINT) AS cache_hits,
    CAST(sum(prompt_tokens) AS BIGINT) AS prompt_tokens,
    CAST(sum(completion_tokens) AS BIGINT) AS completion_tokens,
    round(sum(generate_seconds), 1) AS generate_seconds,
    round(sum(completion_tokens) / nullif(sum(generate_seconds), 0), 1) AS completion_tok_per_s,
    round(sum(cost_usd), 4) AS cost_usd
FROM llm_usage
GROUP BY ROLLUP (stage)
HAVING count(*) > 0
ORDER BY stage IS NULL, min(CASE stage WHEN 'teacher_samples' THEN 0 WHEN 'compressions' THEN 1
                                        WHEN 'judgments' THEN 2 ELSE 3 END), stage
