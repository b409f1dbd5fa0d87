-- docs/prometheus: every query of queries.yaml runs, as spool_client, and
-- returns the columns it declares with types the exporter can read (labels
-- text; gauges and counters numbers; a histogram <x> its bounds as float8[]
-- with <x>_bucket bigint[], <x>_sum and <x>_count).  The metric names the
-- alert rules of alerts.yaml use are all produced.  A renamed column or view
-- fails here.
\set prom `perl test/prometheus_check.pl docs/prometheus/queries.yaml docs/prometheus/alerts.yaml`
CREATE TEMP TABLE prom AS
	SELECT * FROM jsonb_to_recordset((:'prom'::jsonb)->'queries')
		AS q(name text, query text, columns text[], usages text[]);
GRANT SELECT ON prom TO spool_client;

SELECT jsonb_array_length((:'prom'::jsonb)->'unknown') AS alert_metrics_not_produced,
	   (:'prom'::jsonb)->'unknown' AS which;
-- (the check names an alert's metric that no query produces)
\set bad `echo '        expr: rate(spool_nope_total[5m]) > 0 and spool_source_lag > 0' | perl test/prometheus_check.pl docs/prometheus/queries.yaml /dev/stdin`
SELECT (:'bad'::jsonb)->'unknown' AS unknown_in_bad_rules;

-- What is wrong with one query's result ('ok' when nothing).
CREATE FUNCTION pg_temp.prom_check(name text, query text, columns text[], usages text[])
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	problems text[] := '{}';
	t regclass;
	want text;
	have text;
	i int;
	extra text;
BEGIN
	EXECUTE 'CREATE TEMP TABLE prom_out AS ' || query;
	t := 'pg_temp.prom_out'::regclass;
	FOR i IN 1 .. cardinality(columns) LOOP
		FOR want, extra IN
			SELECT x.c, x.t FROM (VALUES
				(columns[i], CASE usages[i] WHEN 'LABEL' THEN 'text'
											WHEN 'HISTOGRAM' THEN 'double precision[]'
											ELSE 'number' END),
				(columns[i] || '_bucket', CASE WHEN usages[i] = 'HISTOGRAM' THEN 'bigint[]' END),
				(columns[i] || '_sum', CASE WHEN usages[i] = 'HISTOGRAM' THEN 'number' END),
				(columns[i] || '_count', CASE WHEN usages[i] = 'HISTOGRAM' THEN 'number' END)) x(c, t)
			 WHERE x.t IS NOT NULL
		LOOP
			SELECT format_type(a.atttypid, a.atttypmod) INTO have
			  FROM pg_attribute a WHERE a.attrelid = t AND a.attname = want AND NOT a.attisdropped;
			IF have IS NULL THEN
				problems := problems || ('no column ' || want);
			ELSIF NOT (have = extra OR (extra = 'number' AND have IN
						('bigint', 'integer', 'double precision', 'numeric'))) THEN
				problems := problems || (want || ' is ' || have || ', not ' || extra);
			END IF;
		END LOOP;
	END LOOP;
	EXECUTE 'DROP TABLE pg_temp.prom_out';
	RETURN CASE WHEN cardinality(problems) = 0 THEN 'ok' ELSE array_to_string(problems, '; ') END;
END $$;

SET ROLE spool_client;
SELECT name, cardinality(columns) AS metrics, pg_temp.prom_check(name, query, columns, usages) AS check
  FROM prom ORDER BY name;
RESET ROLE;

-- The check fails when a column is missing or of the wrong type.
SELECT pg_temp.prom_check('bad', 'SELECT 1::text AS lag, ARRAY[1]::int[] AS h, 1 AS h_sum',
	ARRAY['lag', 'h', 'missing'], ARRAY['GAUGE', 'HISTOGRAM', 'COUNTER']);
