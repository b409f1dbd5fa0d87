--
-- window_alert: spool.window_alert called directly from SQL, with its
-- settings in the state ('{"config": {...}}').  Every expected output and
-- state is computed by hand in the comment above its case.
--
-- Times: 2000-01-01 00:00:00 UTC is 946684800 s after the Unix epoch, a
-- multiple of 60 and 3600, so tumbling windows of a minute or an hour start
-- at whole minutes (hours) of that day.  In the state, a key's window
-- contents are "ts" and "vals" (parallel arrays): ts is the cursor for count
-- windows and the event time for sliding windows; event times ("mark", ts)
-- are microseconds since 2000-01-01 00:00:00 UTC.  Tumbling windows keep no
-- contents, only their aggregates.
--

-- wa_entry(cursor, value, kafka_ts): a spool entry of source 'src', topic
-- 't', partition 0, offset 1000 + cursor.
CREATE FUNCTION wa_entry(c bigint, v jsonb, ts timestamptz DEFAULT NULL) RETURNS spool.entries
LANGUAGE sql IMMUTABLE AS $$
	SELECT ROW(c, 'src', 't', 0, 1000 + c, NULL, v, NULL, NULL, ts,
			   '2000-01-01 00:00:00+00')::spool.entries
$$;

-- One case: settings and entries; wa_step runs it on a fresh state.
CREATE TABLE wa_case (name text PRIMARY KEY, config jsonb NOT NULL,
					  entries spool.entries[] NOT NULL);
CREATE FUNCTION wa_step(case_name text) RETURNS spool.step
LANGUAGE sql STABLE AS $$
	SELECT spool.window_alert(jsonb_build_object('config', config), entries)
	  FROM wa_case WHERE name = case_name
$$;
-- The outputs of a case, in order.
CREATE FUNCTION wa_outputs(case_name text)
RETURNS TABLE (key text, value numeric, count int, sum numeric, min numeric, max numeric,
			   cursor bigint, "window" jsonb)
LANGUAGE sql STABLE AS $$
	SELECT o.key, (o.payload->'value')::numeric, (o.payload->'count')::int,
		   (o.payload->'sum')::numeric, (o.payload->'min')::numeric,
		   (o.payload->'max')::numeric, (o.payload->'cursor')::bigint, o.payload->'window'
	  FROM unnest((wa_step(case_name)).outputs) WITH ORDINALITY o(target, key, payload, i)
	 ORDER BY o.i
$$;
-- The state after a case, without the settings.
CREATE FUNCTION wa_state(case_name text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
	SELECT (wa_step(case_name)).state - 'config'
$$;

--
-- Bad calls (SP001).  The settings are checked like create_processor does.
--
SELECT try($$SELECT spool.window_alert(NULL, NULL)$$);
SELECT try($$SELECT spool.window_alert('{}', NULL)$$);
SELECT try($$SELECT spool.window_alert('[]', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": 1}', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": [1]}', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": {}}', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "window": {"type": "count", "size": 0},
	"threshold": 1, "target": "t", "aggregate": "count"}}', NULL)$$);
-- A malformed state.
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "window": {"type": "count", "size": 2},
	"threshold": 1, "target": "t", "aggregate": "count"}, "keys": {"a": 1}}', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "window": {"type": "count", "size": 2},
	"threshold": 1, "target": "t", "aggregate": "count"}, "keys": {"a": {"ts": [1, 2], "vals": [1]}}}', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "window": {"type": "count", "size": 2},
	"threshold": 1, "target": "t", "aggregate": "count"}, "keys": {"a": {"ts": [1], "vals": ["x"]}}}', NULL)$$);

-- No entries (NULL or an empty array): a fresh state that keeps the
-- settings, and no outputs.
SELECT s.state, s.outputs FROM spool.window_alert('{"config": {"key": "k", "aggregate": "count",
	"window": {"type": "count", "size": 2}, "threshold": 1, "target": "t"}}', NULL) s;
SELECT s.state - 'config' AS state, s.outputs FROM spool.window_alert('{"config": {"key": "k",
	"aggregate": "count", "window": {"type": "count", "size": 2}, "threshold": 1, "target": "t"}}',
	'{}') s;

--
-- count window, sum, op >= (the default): key "addr", value "amt", the last
-- 3 entries of the key, threshold 10.
--   c1 a 4   a:[4]      sum 4
--   c2 a 5   a:[4,5]    sum 9
--   c3 b 20  b:[20]     sum 20 >= 10, b armed    -> alert b, value 20 (count 1, min 20, max 20)
--   c4 a 1   a:[4,5,1]  sum 10 >= 10, a armed    -> alert a, value 10 (count 3, min 1, max 5)
--   c5 a 6   a:[5,1,6]  sum 12: still above, a disarmed: nothing
--   c6 a 0   a:[1,6,0]  sum 7: below, a re-armed
--   c7 a 2   a:[6,0,2]  sum 8
--   c8 a 9   a:[0,2,9]  sum 11 >= 10, a armed    -> alert a, value 11 (count 3, min 0, max 9)
--   c9 b 3   b:[20,3]   sum 23: still above, b disarmed: nothing
-- State: a disarmed, n 3, sum 11, min 0, max 9, ts [6,7,8], vals [0,2,9];
--        b disarmed, n 2, sum 23, min 3, max 20, ts [3,9], vals [20,3].
--
INSERT INTO wa_case VALUES ('count_sum',
	'{"key": "addr", "value": "amt", "window": {"type": "count", "size": 3},
	  "threshold": 10, "target": "alerts"}',
	ARRAY[wa_entry(1, '{"addr": "a", "amt": 4}'), wa_entry(2, '{"addr": "a", "amt": 5}'),
		  wa_entry(3, '{"addr": "b", "amt": 20}'), wa_entry(4, '{"addr": "a", "amt": 1}'),
		  wa_entry(5, '{"addr": "a", "amt": 6}'), wa_entry(6, '{"addr": "a", "amt": 0}'),
		  wa_entry(7, '{"addr": "a", "amt": 2}'), wa_entry(8, '{"addr": "a", "amt": 9}'),
		  wa_entry(9, '{"addr": "b", "amt": 3}')]);
SELECT * FROM wa_outputs('count_sum');
SELECT wa_state('count_sum');
-- The whole first output: target = settings.target, key = the key, and the
-- payload (cursor 3 was spooled from src, partition 0, offset 1003).
SELECT o.target, o.key, o.payload FROM unnest((wa_step('count_sum')).outputs) o LIMIT 1;

--
-- count window, aggregate count, op >: key is an array path ["tx", "from"],
-- no value, threshold 2 (so the 3rd entry of a key alerts), size 100.
--   c1 x        x n 1
--   c2 x        x n 2 (2 > 2 is false)
--   c3 y        y n 1
--   c4 x        x n 3 > 2          -> alert x, value 3 (count 3; each entry counts as value 1: sum 3, min 1, max 1)
--   c5 {"tx": {}}              no key: skipped
--   c6 {"tx": {"from": null}}  null key: skipped
--   c7 value NULL (a row without a JSON value): skipped
--   c8 {"tx": "x"}             "tx" is not an object: skipped
--   c9 x        x n 4: still above, disarmed: nothing
--   c10 y       y n 2
--   c11 y       y n 3 > 2          -> alert y, value 3
--   c12 "x" (the value is a JSON string, not an object): skipped
-- State: skipped 5; x disarmed, n 4, sum 4, min 1, max 1, ts [1,2,4,9], vals [1,1,1,1];
--        y disarmed, n 3, sum 3, min 1, max 1, ts [3,10,11], vals [1,1,1].
--
INSERT INTO wa_case VALUES ('count_count',
	'{"key": ["tx", "from"], "aggregate": "count", "op": ">", "threshold": 2,
	  "window": {"type": "count", "size": 100}, "target": "busy"}',
	ARRAY[wa_entry(1, '{"tx": {"from": "x"}}'), wa_entry(2, '{"tx": {"from": "x"}}'),
		  wa_entry(3, '{"tx": {"from": "y"}}'), wa_entry(4, '{"tx": {"from": "x"}}'),
		  wa_entry(5, '{"tx": {}}'), wa_entry(6, '{"tx": {"from": null}}'),
		  wa_entry(7, NULL), wa_entry(8, '{"tx": "x"}'),
		  wa_entry(9, '{"tx": {"from": "x"}}'), wa_entry(10, '{"tx": {"from": "y"}}'),
		  wa_entry(11, '{"tx": {"from": "y"}}'), wa_entry(12, '"x"')]);
SELECT * FROM wa_outputs('count_count');
SELECT wa_state('count_count');

--
-- count window, min, op <: value is the nested path "p.v", numbers also as
-- strings; the last 2 entries; threshold 5.
--   c1 "10"    [10]         min 10
--   c2 4       [10,4]       min 4 < 5         -> alert, value 4 (count 2, sum 14, min 4, max 10)
--   c3 "3.5"   [4,3.5]      min 3.5: still below, disarmed
--   c4 8       [3.5,8]      min 3.5: still below
--   c5 9       [8,9]        min 8: not below, re-armed
--   c6 "abc"   not a number: skipped
--   c7 no v    skipped
--   c8 true    not a number: skipped
--   c9 "2e0"   [9,2]        min 2 < 5         -> alert, value 2 (count 2, sum 11, min 2, max 9)
--   c10 "-1.25" [2,-1.25]   min -1.25: still below, disarmed
--   c11 ""     empty string: skipped
-- State: skipped 4; k1 disarmed, n 2, sum 0.75, min -1.25, max 2, ts [9,10], vals [2,-1.25].
--
INSERT INTO wa_case VALUES ('count_min',
	'{"key": "k", "value": "p.v", "aggregate": "min", "op": "<", "threshold": 5,
	  "window": {"type": "count", "size": 2}, "target": "low"}',
	ARRAY[wa_entry(1, '{"k": "k1", "p": {"v": "10"}}'), wa_entry(2, '{"k": "k1", "p": {"v": 4}}'),
		  wa_entry(3, '{"k": "k1", "p": {"v": "3.5"}}'), wa_entry(4, '{"k": "k1", "p": {"v": 8}}'),
		  wa_entry(5, '{"k": "k1", "p": {"v": 9}}'), wa_entry(6, '{"k": "k1", "p": {"v": "abc"}}'),
		  wa_entry(7, '{"k": "k1", "p": {}}'), wa_entry(8, '{"k": "k1", "p": {"v": true}}'),
		  wa_entry(9, '{"k": "k1", "p": {"v": "2e0"}}'), wa_entry(10, '{"k": "k1", "p": {"v": "-1.25"}}'),
		  wa_entry(11, '{"k": "k1", "p": {"v": ""}}')]);
SELECT * FROM wa_outputs('count_min');
SELECT wa_state('count_min');

--
-- count window, max, op <=: the last 3 entries, threshold 1 ("quiet").
--   c1 5    [5]         max 5
--   c2 0    [5,0]       max 5
--   c3 1    [5,0,1]     max 5
--   c4 1    [0,1,1]     max 1 <= 1       -> alert, value 1 (count 3, sum 2, min 0, max 1)
--   c5 0.5  [1,1,0.5]   max 1: still, disarmed
--   c6 7    [1,0.5,7]   max 7: re-armed
--   c7 0    [0.5,7,0]   max 7
--   c8 0    [7,0,0]     max 7
--   c9 -3   [0,0,-3]    max 0 <= 1       -> alert, value 0 (count 3, sum -3, min -3, max 0)
-- State: q disarmed, n 3, sum -3, min -3, max 0, ts [7,8,9], vals [0,0,-3].
--
INSERT INTO wa_case VALUES ('count_max',
	'{"key": "k", "value": "v", "aggregate": "max", "op": "<=", "threshold": 1,
	  "window": {"type": "count", "size": 3}, "target": "quiet"}',
	ARRAY[wa_entry(1, '{"k": "q", "v": 5}'), wa_entry(2, '{"k": "q", "v": 0}'),
		  wa_entry(3, '{"k": "q", "v": 1}'), wa_entry(4, '{"k": "q", "v": 1}'),
		  wa_entry(5, '{"k": "q", "v": 0.5}'), wa_entry(6, '{"k": "q", "v": 7}'),
		  wa_entry(7, '{"k": "q", "v": 0}'), wa_entry(8, '{"k": "q", "v": 0}'),
		  wa_entry(9, '{"k": "q", "v": -3}')]);
SELECT * FROM wa_outputs('count_max');
SELECT wa_state('count_max');

--
-- Keys that are not strings are their JSON text: count of the last entry
-- >= 1, so each new key alerts once.
--   c1 42 -> "42"; c2 1.50 -> "1.50"; c3 true -> "true";
--   c4 {"b": 1, "a": [2]} -> '{"a": [2], "b": 1}' (jsonb's key order);
--   c5 "42" is the key "42" again: still above, disarmed: nothing;
--   c6 false -> "false".
-- Outputs: 42, 1.50, true, {"a": [2], "b": 1}, false, each value 1.
--
INSERT INTO wa_case VALUES ('key_text',
	'{"key": "k", "aggregate": "count", "window": {"type": "count", "size": 1},
	  "threshold": 1, "target": "t"}',
	ARRAY[wa_entry(1, '{"k": 42}'), wa_entry(2, '{"k": 1.50}'), wa_entry(3, '{"k": true}'),
		  wa_entry(4, '{"k": {"b": 1, "a": [2]}}'), wa_entry(5, '{"k": "42"}'),
		  wa_entry(6, '{"k": false}')]);
SELECT key, value, cursor FROM wa_outputs('key_text');

--
-- An array path can name a key with a dot in it: ["tx.from"] is the key
-- "tx.from", "tx.from" is "from" inside "tx".
--   c1 {"tx.from": "dotted", "tx": {"from": "nested"}}
--      ["tx.from"] -> alert "dotted";  "tx.from" -> alert "nested".
--
INSERT INTO wa_case VALUES ('path_array',
	'{"key": ["tx.from"], "aggregate": "count", "window": {"type": "count", "size": 1},
	  "threshold": 1, "target": "t"}',
	ARRAY[wa_entry(1, '{"tx.from": "dotted", "tx": {"from": "nested"}}')]);
INSERT INTO wa_case VALUES ('path_dotted',
	'{"key": "tx.from", "aggregate": "count", "window": {"type": "count", "size": 1},
	  "threshold": 1, "target": "t"}',
	ARRAY[wa_entry(1, '{"tx.from": "dotted", "tx": {"from": "nested"}}')]);
SELECT key, value, cursor FROM wa_outputs('path_array');
SELECT key, value, cursor FROM wa_outputs('path_dotted');

--
-- tumbling window of 1 minute, sum >= 100, event time = kafka_ts.
-- Times are 2000-01-01 00:mm:ss UTC; window W0 = [00:00, 00:01), W1 =
-- [00:01, 00:02), W2 = [00:02, 00:03).
--   c1  x 60  00:00:10      x: W0 sum 60
--   c2  x 50  00:00:50      x: W0 sum 110           -> alert x, value 110 (count 2, min 50, max 60), W0
--   c3  x 10  00:00:55      x: W0 sum 120: still above, disarmed
--   c4  y 1   00:00:30      y: W0 sum 1
--   c5  x 100 00:01:05      x: W1 starts (reset, re-armed) sum 100
--                                                   -> alert x, value 100 (count 1, min 100, max 100), W1
--   c6  x 500 00:00:59      x: W0 is before W1: late, ignored
--   c7  x 1   00:01:59.999  x: W1 sum 101: still above
--   c8  x 5   00:02:00      x: W2 starts, sum 5
--   c9  x 5   no kafka_ts   skipped
--   c10 x 95  00:02:30      x: W2 sum 100           -> alert x, value 100 (count 2, min 5, max 95), W2
--   c11 y 99  00:00:40      y: W0 (windows are per key, not late) sum 100
--                                                   -> alert y, value 100 (count 2, min 1, max 99), W0
--   c12 x -50 00:02:45      x: W2 sum 50: below, re-armed
--   c13 x 60  00:02:50      x: W2 sum 110           -> alert x, value 110 (count 4, min -50, max 95), W2
-- State: late 1, skipped 1; x disarmed, mark 120000000 (00:02), n 4, sum 110,
-- min -50, max 95; y disarmed, mark 0 (00:00), n 2, sum 100, min 1, max 99.
--
INSERT INTO wa_case VALUES ('tumbling',
	'{"key": "a", "value": "v", "window": {"type": "tumbling", "size": "1 minute"},
	  "threshold": 100, "target": "t"}',
	ARRAY[wa_entry(1, '{"a": "x", "v": 60}', '2000-01-01 00:00:10+00'),
		  wa_entry(2, '{"a": "x", "v": 50}', '2000-01-01 00:00:50+00'),
		  wa_entry(3, '{"a": "x", "v": 10}', '2000-01-01 00:00:55+00'),
		  wa_entry(4, '{"a": "y", "v": 1}', '2000-01-01 00:00:30+00'),
		  wa_entry(5, '{"a": "x", "v": 100}', '2000-01-01 00:01:05+00'),
		  wa_entry(6, '{"a": "x", "v": 500}', '2000-01-01 00:00:59+00'),
		  wa_entry(7, '{"a": "x", "v": 1}', '2000-01-01 00:01:59.999+00'),
		  wa_entry(8, '{"a": "x", "v": 5}', '2000-01-01 00:02:00+00'),
		  wa_entry(9, '{"a": "x", "v": 5}', NULL),
		  wa_entry(10, '{"a": "x", "v": 95}', '2000-01-01 00:02:30+00'),
		  wa_entry(11, '{"a": "y", "v": 99}', '2000-01-01 00:00:40+00'),
		  wa_entry(12, '{"a": "x", "v": -50}', '2000-01-01 00:02:45+00'),
		  wa_entry(13, '{"a": "x", "v": 60}', '2000-01-01 00:02:50+00')]);
SELECT * FROM wa_outputs('tumbling');
SELECT wa_state('tumbling');

--
-- sliding window of 1 minute, sum >= 100, event time = kafka_ts.  The
-- key's window is (watermark - 1 min, watermark]; t = seconds after
-- 2000-01-01 00:00:00 UTC.
--   c1  50  t=0   wm 0    items {0:50}                        sum 50
--   c2  40  t=30  wm 30   items {0:50, 30:40}                 sum 90
--   c3  20  t=50  wm 50   items {0:50, 30:40, 50:20}          sum 110
--                   -> alert, value 110 (count 3, min 20, max 50), window (-10 s, 50 s]
--                      = 1999-12-31T23:59:50 .. 2000-01-01T00:00:50
--   c4  10  t=60  wm 60   0 <= 60-60 drops out: {30:40, 50:20, 60:10}  sum 70: below, re-armed
--   c5  5   t=20  wm 60   20 > 0, inside the window: {20:5, 30:40, 50:20, 60:10}  sum 75
--   c6  999 t=0   0 <= 60-60: late, ignored
--   c7  30  t=70  wm 70   {20:5, 30:40, 50:20, 60:10, 70:30}  sum 105
--                   -> alert, value 105 (count 5, min 5, max 40), window 00:00:10 .. 00:01:10
--   c8  0   t=85  wm 85   20 drops out: {30:40, 50:20, 60:10, 70:30, 85:0}  sum 100: still above, disarmed
--   c9  0   t=91  wm 91   30 drops out: {50:20, 60:10, 70:30, 85:0, 91:0}  sum 60: below, re-armed
--   c10 no kafka_ts: skipped
--   c11 45  t=91  wm 91   {50:20, 60:10, 70:30, 85:0, 91:0, 91:45}  sum 105
--                   -> alert, value 105 (count 6, min 0, max 45), window 00:00:31 .. 00:01:31
-- State: late 1, skipped 1; s disarmed, mark 91000000, n 6, sum 105, min 0,
-- max 45, ts [50000000,60000000,70000000,85000000,91000000,91000000],
-- vals [20,10,30,0,0,45].
--
INSERT INTO wa_case VALUES ('sliding',
	'{"key": "a", "value": "v", "window": {"type": "sliding", "size": "1 minute"},
	  "threshold": 100, "target": "t"}',
	ARRAY[wa_entry(1, '{"a": "s", "v": 50}', '2000-01-01 00:00:00+00'),
		  wa_entry(2, '{"a": "s", "v": 40}', '2000-01-01 00:00:30+00'),
		  wa_entry(3, '{"a": "s", "v": 20}', '2000-01-01 00:00:50+00'),
		  wa_entry(4, '{"a": "s", "v": 10}', '2000-01-01 00:01:00+00'),
		  wa_entry(5, '{"a": "s", "v": 5}', '2000-01-01 00:00:20+00'),
		  wa_entry(6, '{"a": "s", "v": 999}', '2000-01-01 00:00:00+00'),
		  wa_entry(7, '{"a": "s", "v": 30}', '2000-01-01 00:01:10+00'),
		  wa_entry(8, '{"a": "s", "v": 0}', '2000-01-01 00:01:25+00'),
		  wa_entry(9, '{"a": "s", "v": 0}', '2000-01-01 00:01:31+00'),
		  wa_entry(10, '{"a": "s", "v": 1000}', NULL),
		  wa_entry(11, '{"a": "s", "v": 45}', '2000-01-01 00:01:31+00')]);
SELECT * FROM wa_outputs('sliding');
SELECT wa_state('sliding');

--
-- sliding window of 30 (seconds), max > 10.  t = seconds after 00:00:00.
--   c1 12  t=0   wm 0    {0:12}                 max 12 > 10
--                   -> alert, value 12 (count 1, sum 12, min 12), window 1999-12-31T23:59:30 .. 2000-01-01T00:00:00
--   c2 3   t=20  wm 20   {0:12, 20:3}           max 12: still above, disarmed
--   c3 4   t=30  wm 30   0 drops out: {20:3, 30:4}   max 4: re-armed
--   c4 11  t=10  wm 30   10 > 0: {10:11, 20:3, 30:4}  max 11 > 10
--                   -> alert, value 11 (count 3, sum 18, min 3), window 00:00:00 .. 00:00:30
--   c5 1   t=41  wm 41   10 drops out: {20:3, 30:4, 41:1}  max 4: re-armed
--   c6 2   t=11  11 <= 41-30: late
-- State: late 1; m armed, mark 41000000, n 3, sum 8, min 1, max 4,
-- ts [20000000,30000000,41000000], vals [3,4,1].
--
INSERT INTO wa_case VALUES ('sliding_max',
	'{"key": "k", "value": "v", "aggregate": "max", "op": ">", "threshold": 10,
	  "window": {"type": "sliding", "size": 30}, "target": "t"}',
	ARRAY[wa_entry(1, '{"k": "m", "v": 12}', '2000-01-01 00:00:00+00'),
		  wa_entry(2, '{"k": "m", "v": 3}', '2000-01-01 00:00:20+00'),
		  wa_entry(3, '{"k": "m", "v": 4}', '2000-01-01 00:00:30+00'),
		  wa_entry(4, '{"k": "m", "v": 11}', '2000-01-01 00:00:10+00'),
		  wa_entry(5, '{"k": "m", "v": 1}', '2000-01-01 00:00:41+00'),
		  wa_entry(6, '{"k": "m", "v": 2}', '2000-01-01 00:00:11+00')]);
SELECT * FROM wa_outputs('sliding_max');
SELECT wa_state('sliding_max');

--
-- max_keys: with more live keys than max_keys, the least recently seen
-- tenth of max_keys (at least one) are forgotten, by the cursor of their
-- latest entry.  max_keys 3, count windows, no alerts:
--   c1 k1, c2 k2, c3 k3    keys k1 k2 k3
--   c4 k4                  4 keys: k1 (last 1) goes; k2 k3 k4
--   c5 k2                  k2 seen again (last 5)
--   c6 k5                  k3 (last 3) goes; k2 k4 k5
--   c7 k6                  k4 (last 4) goes; k2 k5 k6
-- State: evicted 3, keys k2 (last 5), k5 (last 6), k6 (last 7).
INSERT INTO wa_case VALUES ('max_keys',
	'{"key": "k", "aggregate": "count", "window": {"type": "count", "size": 2},
	  "threshold": 100, "target": "t", "max_keys": 3}',
	ARRAY[wa_entry(1, '{"k": "k1"}'), wa_entry(2, '{"k": "k2"}'), wa_entry(3, '{"k": "k3"}'),
		  wa_entry(4, '{"k": "k4"}'), wa_entry(5, '{"k": "k2"}'), wa_entry(6, '{"k": "k5"}'),
		  wa_entry(7, '{"k": "k6"}')]);
SELECT s->'evicted' AS evicted,
	   (SELECT jsonb_object_agg(k, s->'keys'->k->'last') FROM jsonb_object_keys(s->'keys') k) AS last
  FROM wa_state('max_keys') s;
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "aggregate": "count",
	"window": {"type": "count", "size": 2}, "threshold": 1, "target": "t", "max_keys": 0}}', NULL)$$);
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "aggregate": "count",
	"window": {"type": "count", "size": 2}, "threshold": 1, "target": "t", "max_keys": 1.5}}', NULL)$$);

--
-- Event time from the value: "time" is the path "meta.ts", holding epoch
-- seconds or an ISO 8601 string; kafka_ts is not used.  Tumbling windows of
-- 3600 (seconds), count >= 2.  1700000000 is 2023-11-14 22:13:20 UTC, in
-- the hour H22 = [22:00, 23:00) of 2023-11-14.
--   c1  1700000000                   H22 n 1
--   c2  1700000100.5                 H22 n 2   -> alert, value 2, window 2023-11-14T22:00 .. 23:00
--   c3  "2023-11-14T23:00:00Z"       H23 starts, n 1
--   c4  "2023-11-15T00:30:00+01:00"  = 23:30 UTC, H23 n 2
--                                              -> alert, value 2, window 2023-11-14T23:00 .. 2023-11-15T00:00
--   c5  "2023-11-14T23:30:00+01:00"  = 22:30 UTC, H22 is before H23: late
--   c6  "not a time"                 skipped
--   c7  no meta.ts                   skipped (its kafka_ts is not used either)
--   c8  true                         skipped
--   c9  "2023-11-14 23:59:59.5+00"   H23 n 3: still above, disarmed
--   c10 1700006400                   = 2023-11-15 00:00:00 UTC: H00 starts, n 1
--   c11 "2023-11-15T00:00:01.000001Z" H00 n 2  -> alert, value 2, window 2023-11-15T00:00 .. 01:00
-- State: late 1, skipped 3; k disarmed, mark = (1700006400 - 946684800) s =
-- 753321600000000, n 2, sum 2, min 1, max 1.
--
INSERT INTO wa_case VALUES ('time_path',
	'{"key": "k", "aggregate": "count", "window": {"type": "tumbling", "size": 3600},
	  "time": "meta.ts", "threshold": 2, "target": "t"}',
	ARRAY[wa_entry(1, '{"k": "k", "meta": {"ts": 1700000000}}', '1999-01-01 00:00:00+00'),
		  wa_entry(2, '{"k": "k", "meta": {"ts": 1700000100.5}}'),
		  wa_entry(3, '{"k": "k", "meta": {"ts": "2023-11-14T23:00:00Z"}}'),
		  wa_entry(4, '{"k": "k", "meta": {"ts": "2023-11-15T00:30:00+01:00"}}'),
		  wa_entry(5, '{"k": "k", "meta": {"ts": "2023-11-14T23:30:00+01:00"}}'),
		  wa_entry(6, '{"k": "k", "meta": {"ts": "not a time"}}'),
		  wa_entry(7, '{"k": "k", "meta": {}}', '2023-11-14 23:10:00+00'),
		  wa_entry(8, '{"k": "k", "meta": {"ts": true}}'),
		  wa_entry(9, '{"k": "k", "meta": {"ts": "2023-11-14 23:59:59.5+00"}}'),
		  wa_entry(10, '{"k": "k", "meta": {"ts": 1700006400}}'),
		  wa_entry(11, '{"k": "k", "meta": {"ts": "2023-11-15T00:00:01.000001Z"}}')]);
SELECT * FROM wa_outputs('time_path');
SELECT wa_state('time_path');

-- Strings that name no fixed time are not event times: "now", "today",
-- "tomorrow" and "yesterday" depend on when the entry is processed, and
-- "epoch" and "infinity" are not ISO timestamps.  Every entry is skipped
-- (a handler must be deterministic).
INSERT INTO wa_case VALUES ('time_words',
	'{"key": "k", "aggregate": "count", "window": {"type": "tumbling", "size": "1 hour"},
	  "time": "ts", "threshold": 1, "target": "t"}',
	ARRAY[wa_entry(1, '{"k": "n", "ts": "now"}'), wa_entry(2, '{"k": "n", "ts": "today"}'),
		  wa_entry(3, '{"k": "n", "ts": "tomorrow"}'), wa_entry(4, '{"k": "n", "ts": "yesterday"}'),
		  wa_entry(5, '{"k": "n", "ts": "epoch"}'), wa_entry(6, '{"k": "n", "ts": "infinity"}')]);
SELECT cardinality(s.outputs) AS outputs, s.state->'skipped' AS skipped,
	   s.state->'late' AS late, s.state->'keys' AS keys
  FROM wa_step('time_words') s;

--
-- The payload's spool fields come from the entry that made the alert.  Rows
-- built by hand, with a sliding window of 5 minutes and numeric strings.
--   c75 0xab 100000   10:00:30  wm 10:00:30  sum 100000
--   c76 0xcd 5        10:01:00  (another key)
--   c77 0xab "1100000" 10:05:00 wm 10:05:00  10:00:30 > 10:00:00 stays: sum 1200000
--                   -> alert 0xab, value 1200000 (count 2, min 100000, max 1100000),
--                      window 10:00:00 .. 10:05:00, cursor 77, source chain,
--                      partition 3, offset 99120
--
INSERT INTO wa_case VALUES ('payload',
	'{"key": "from", "value": "amount", "window": {"type": "sliding", "size": "5 minutes"},
	  "threshold": 1000000, "target": "alerts"}',
	ARRAY[ROW(75, 'chain', 'txs', 3, 99118, NULL, '{"from": "0xab", "amount": 100000}', NULL,
			  NULL, '2026-11-22 10:00:30+00', '2026-11-22 10:00:31+00')::spool.entries,
		  ROW(76, 'chain', 'txs', 1, 5, NULL, '{"from": "0xcd", "amount": 5}', NULL,
			  NULL, '2026-11-22 10:01:00+00', '2026-11-22 10:01:01+00')::spool.entries,
		  ROW(77, 'chain', 'txs', 3, 99120, '\x6b', '{"from": "0xab", "amount": "1100000"}', NULL,
			  '{"h": "1"}', '2026-11-22 10:05:00+00', '2026-11-22 10:05:01+00')::spool.entries]);
SELECT o.target, o.key, o.payload FROM unnest((wa_step('payload')).outputs) o;

--
-- The fold property: for every case above, calling window_alert on all its
-- entries gives the same state and outputs as calling it on entries[1:i],
-- then on entries[i+1:j] with the returned state, then on the rest, for
-- every 0 <= i <= j <= n.
--
SELECT c.name, count(*) AS splits,
	   bool_and(one.state = s3.state) AS same_state,
	   bool_and(one.outputs = s1.outputs || s2.outputs || s3.outputs) AS same_outputs
  FROM wa_case c
 CROSS JOIN LATERAL wa_step(c.name) one
 CROSS JOIN LATERAL generate_series(0, cardinality(c.entries)) i
 CROSS JOIN LATERAL generate_series(i, cardinality(c.entries)) j
 CROSS JOIN LATERAL spool.window_alert(jsonb_build_object('config', c.config), c.entries[1:i]) s1
 CROSS JOIN LATERAL spool.window_alert(s1.state, c.entries[i + 1:j]) s2
 CROSS JOIN LATERAL spool.window_alert(s2.state, c.entries[j + 1:cardinality(c.entries)]) s3
 GROUP BY c.name ORDER BY c.name COLLATE "C";
-- One split spelled out: entries [c1, c2, c3, c4] of count_sum at once, and
-- [c1, c2] then [c3, c4].  The second call alerts b at c3 and, from the state
-- the first call left (a: [4,5]), a at c4 (a: [4,5,1], sum 10).  Final state:
-- a disarmed, n 3, sum 10, min 1, max 5, ts [1,2,4], vals [4,5,1];
-- b disarmed, n 1, sum 20, min 20, max 20, ts [3], vals [20].
WITH c AS (SELECT jsonb_build_object('config', config) AS s0, entries FROM wa_case WHERE name = 'count_sum')
SELECT abcd.state = cd.state AS same_state,
	   abcd.outputs = ab.outputs || cd.outputs AS same_outputs,
	   cardinality(ab.outputs) AS outputs_ab, cardinality(cd.outputs) AS outputs_cd,
	   cd.state - 'config' AS state
  FROM c, spool.window_alert(c.s0, c.entries[1:4]) abcd,
	   spool.window_alert(c.s0, c.entries[1:2]) ab,
	   spool.window_alert(ab.state, c.entries[3:4]) cd;


-- Durations (docs/sql-reference.md#durations): the size of a time window is
-- an interval with any unit.  A bare number there is still seconds
-- (deprecated), where every other duration takes milliseconds.  The window
-- of 'sliding_max' (30 s) written six ways gives the same outputs and state.
SELECT v.size, s.outputs = (wa_step('sliding_max')).outputs AS same_outputs,
	   s.state - 'config' = wa_state('sliding_max') AS same_state
  FROM wa_case c,
	   LATERAL (VALUES ('"30s"'), ('"30000ms"'), ('"0.5 min"'), ('"00:00:30"'), ('30'), ('"30"')) v(size),
	   LATERAL spool.window_alert(jsonb_build_object('config', c.config ||
			jsonb_build_object('window', jsonb_build_object('type', 'sliding', 'size', v.size::jsonb))),
			c.entries) s
 WHERE c.name = 'sliding_max';
SELECT try($$SELECT spool.window_alert('{"config": {"key": "k", "aggregate": "count",
	"window": {"type": "sliding", "size": "30 parsecs"}, "threshold": 1, "target": "t"}}', NULL)$$);
DROP TABLE wa_case;
DROP FUNCTION wa_state(text);
DROP FUNCTION wa_outputs(text);
DROP FUNCTION wa_step(text);
DROP FUNCTION wa_entry(bigint, jsonb, timestamptz);
