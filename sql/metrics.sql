-- spool.metrics(): the Prometheus text exposition format.
-- Values depend on what the workers did, so this checks the format, the
-- metric names and types, one value that is known, and label escaping.

-- Every line is a HELP or TYPE comment or a sample: name{labels} value.
SELECT count(*) AS malformed_lines
  FROM regexp_split_to_table(spool.metrics(), E'\n') l
 WHERE l <> ''
   AND l !~ '^(# (HELP|TYPE) [a-z_]+ .+|[a-z_]+(\{[a-z_]+="([^"\\]|\\.)*"(,[a-z_]+="([^"\\]|\\.)*")*\})? (-?[0-9]+(\.[0-9]+)?|NaN))$';

-- The text ends with a newline, as the format requires.
SELECT right(spool.metrics(), 1) = E'\n' AS ends_with_newline;

-- Each metric has a HELP and a TYPE line, in this order.
SELECT substring(l FROM '^# TYPE ([a-z_]+) ') AS metric, substring(l FROM ' ([a-z]+)$') AS type
  FROM regexp_split_to_table(spool.metrics(), E'\n') WITH ORDINALITY AS t(l, n)
 WHERE l LIKE '# TYPE %'
 ORDER BY n;
SELECT count(*) FILTER (WHERE l LIKE '# HELP %') = count(*) FILTER (WHERE l LIKE '# TYPE %') AS help_for_each_type
  FROM regexp_split_to_table(spool.metrics(), E'\n') l;

-- Every sample belongs to a declared metric (a histogram's samples are
-- named <name>_bucket, <name>_sum and <name>_count).
WITH lines AS (SELECT l FROM regexp_split_to_table(spool.metrics(), E'\n') l),
	 declared AS (SELECT substring(l FROM '^# TYPE ([a-z_]+) ') AS name,
						 substring(l FROM ' ([a-z]+)$') AS type
					FROM lines WHERE l LIKE '# TYPE %')
SELECT count(*) AS undeclared_samples
  FROM lines
 WHERE l <> '' AND l NOT LIKE '#%'
   AND NOT EXISTS (SELECT FROM declared d
					WHERE substring(l FROM '^([a-z_]+)') = d.name
					   OR (d.type = 'histogram' AND substring(l FROM '^([a-z_]+)')
							IN (d.name || '_bucket', d.name || '_sum', d.name || '_count')));

-- A known value: the spool cursor.
SELECT (SELECT substring(l FROM ' (\d+)$')::bigint
		  FROM regexp_split_to_table(spool.metrics(), E'\n') l WHERE l LIKE 'spool_cursor %')
	   = (SELECT next_cursor - 1 FROM spool.spool_state) AS cursor_matches;

-- Label values are escaped: backslash, double quote, newline.
SELECT spool._metric('m', ARRAY['a', 'back\slash "quoted"' || E'\n' || 'next', 'b', ''], 1.5);
SELECT spool._metric('m', '{}', NULL);

-- Clients may read the metrics.
SET ROLE spool_client;
SELECT length(spool.metrics()) > 0 AS client_can_read;
RESET ROLE;

-- Stage numbers (docs/operations.md, observability): the views' columns.
SELECT c.relname AS view, string_agg(a.attname, ', ' ORDER BY a.attnum) AS columns
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
 WHERE c.relnamespace = 'spool'::regnamespace
   AND c.relname IN ('stage_histograms', 'ingest_stats', 'promoter_status', 'processor_stats')
 GROUP BY c.relname ORDER BY c.relname;

-- The promoter always has its three histograms, each with 20 bounds and 21
-- counts that add up to its count; cumulative counts never go down.
SELECT histogram, unit, cardinality(bounds) AS bounds, cardinality(counts) AS counts,
	   bounds[1] AS first_bound, bounds[2] / bounds[1] AS factor,
	   (SELECT sum(c) FROM unnest(counts) c) = count AS counts_add_up,
	   cardinality(cumulative) = cardinality(bounds) AS cumulative_per_bound,
	   cumulative = ARRAY(SELECT sum(c) OVER (ORDER BY i) FROM unnest(counts) WITH ORDINALITY u(c, i)
						   ORDER BY i LIMIT 20)::bigint[] AS cumulative_ok,
	   base_bounds[1] = CASE unit WHEN 'ms' THEN bounds[1] / 1000 ELSE bounds[1] END AS base_ok
  FROM spool.stage_histograms WHERE stage = 'promoter' ORDER BY histogram;
SELECT count(*) AS promoter_rows FROM spool.promoter_status;

-- Quantiles are bucket bounds: the bound of the bucket holding the
-- quantile, capped at the maximum seen; NULL for an empty histogram.
SELECT spool._hist_le('{1,2,4,8}', '{10,0,0,0,0}', 0.5, 1) AS all_in_first,
	   spool._hist_le('{1,2,4,8}', '{1,1,1,1,0}', 0.5, 7) AS half_le_2,
	   spool._hist_le('{1,2,4,8}', '{1,1,1,1,0}', 0.99, 7) AS p99_capped_at_max,
	   spool._hist_le('{1,2,4,8}', '{0,0,0,0,3}', 0.5, 100) AS above_last_bound_is_max,
	   spool._hist_le('{1,2,4,8}', '{0,0,0,0,0}', 0.5, NULL) AS empty;

-- Clients may read the stage views.
SET ROLE spool_client;
SELECT count(*) >= 3 AS client_reads_histograms FROM spool.stage_histograms;
SELECT count(*) >= 0 AS client_reads_stats
  FROM spool.ingest_stats, spool.promoter_status, spool.processor_stats;
RESET ROLE;
