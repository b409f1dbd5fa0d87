--
-- runbook: every statement in the SQL blocks of docs/operations.md's Runbook
-- section is planned (EXPLAIN: nothing runs), so that a renamed view, column
-- or function signature fails this test instead of an operator mid-incident.
--
\set rb `perl test/runbook_sql.pl docs/operations.md`
-- The checks after planned work use amcheck, as the runbook says.
CREATE EXTENSION IF NOT EXISTS amcheck;
CREATE TEMP TABLE rb AS
	SELECT ord, stmt FROM jsonb_array_elements_text(:'rb'::jsonb) WITH ORDINALITY AS x(stmt, ord);
SELECT count(*) >= 15 AS enough_statements FROM rb;

-- The error planning a statement raises, or NULL when it plans.
CREATE FUNCTION pg_temp.plan_error(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE 'EXPLAIN ' || stmt;
	RETURN NULL;
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

SELECT ord, left(stmt, 60) AS statement, e.error
  FROM rb, LATERAL (SELECT pg_temp.plan_error(stmt) AS error) e
 WHERE e.error IS NOT NULL ORDER BY ord;

-- The check catches a wrong column and a wrong signature.
SELECT pg_temp.plan_error('SELECT nope FROM spool.source_status') AS bad_column,
       pg_temp.plan_error('SELECT spool.alter_source(''x'', brokerz => ''y'')') AS bad_argument;
