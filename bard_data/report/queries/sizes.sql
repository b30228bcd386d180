-- title: Table sizes (rows)
-- requires: tables
SELECT
    name AS "table",
    rows
FROM tables
WHERE name NOT IN ('tables', 'manifest', 'tokens', 'balance')
ORDER BY name
