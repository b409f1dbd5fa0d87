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
