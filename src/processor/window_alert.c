/*-------------------------------------------------------------------------
 *
 * window_alert.c
 *	  spool.window_alert, the built-in handler: per key (a JSON path into the
 *	  entry's value) aggregate a numeric path (sum, count, min, max) over a
 *	  count window or an event-time tumbling or sliding window, and emit one
 *	  output each time the aggregate crosses a threshold.  The alert re-arms
 *	  when the condition stops holding (and, for tumbling windows, when a new
 *	  window starts).  Semantics are documented in docs/processors.md.
 *
 *	  Called from SQL, the state travels as jsonb.  The processor worker
 *	  keeps the native state (a hash table of keys) across batches instead and
 *	  serialises it only for snapshots and state hashes; both paths run the
 *	  same spool_wa_apply, so they cannot disagree.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/shortest_dec.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "pgtime.h"
#include "utils/datetime.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "processor/processor.h"
#include "processor/handler.h"

PG_FUNCTION_INFO_V1(spool_window_alert);

#define WA_MAX_PATH		16
#define WA_MAX_COUNT	100000
#define WA_DEFAULT_MAX_KEYS 1000000
#define WA_MAX_MAX_KEYS 100000000
#define WA_STATE_VERSION 1
#define WA_EXAMPLE "For example {\"handler\": {\"key\": \"addr\", \"value\": \"amount\", \"window\": {\"type\": \"count\", \"size\": 10}, \"threshold\": 100, \"target\": \"alerts\"}}."

typedef enum WAAgg
{
	WA_SUM,
	WA_COUNT,
	WA_MIN,
	WA_MAX
} WAAgg;

typedef enum WAKind
{
	WA_WINDOW_COUNT,
	WA_WINDOW_TUMBLING,
	WA_WINDOW_SLIDING
} WAKind;

typedef enum WAOp
{
	WA_GT,
	WA_GE,
	WA_LT,
	WA_LE
} WAOp;

/* In the order of WAAgg, WAKind and WAOp. */
static const char *const agg_names[] = {"sum", "count", "min", "max", NULL};
static const char *const kind_names[] = {"count", "tumbling", "sliding", NULL};
static const char *const op_names[] = {">", ">=", "<", "<=", NULL};

typedef struct WAConfig WAConfig;
typedef struct WAState WAState;

struct WAConfig
{
	char	   *key_path[WA_MAX_PATH];
	int			key_depth;
	char	   *value_path[WA_MAX_PATH];
	int			value_depth;	/* 0: none (count) */
	char	   *time_path[WA_MAX_PATH];
	int			time_depth;		/* 0: kafka_ts */
	WAAgg		agg;
	WAKind		kind;
	int64		size;			/* entries, or microseconds */
	double		threshold;
	WAOp		op;
	char	   *target;
	int64		max_keys;		/* more live keys: the least recently seen go */
};

/* One value in a window: ts is the event time (us) or, for count windows, the cursor. */
typedef struct WAItem
{
	int64		ts;
	double		val;
} WAItem;

typedef struct WAKey
{
	char	   *key;			/* hash key: points at a copy in the state context */
	bool		armed;
	bool		open;			/* a window has started */
	int64		last;			/* cursor of the key's latest entry */
	int64		mark;			/* tumbling: window start; sliding: watermark */
	int64		n;
	double		sum;
	double		min;
	double		max;
	WAItem	   *items;			/* count and sliding windows, sorted by ts */
	int			off;
	int			nitems;
	int			cap;
} WAKey;

struct WAState
{
	MemoryContext cxt;
	WAConfig   *cfg;
	HTAB	   *keys;
	int64		skipped;		/* entries without a usable key, value or time */
	int64		late;			/* entries older than their key's window */
	int64		evicted;		/* keys forgotten to stay within max_keys */
	StringInfoData buf;			/* scratch */
};

static void wa_error(const char *msg, const char *detail) pg_attribute_noreturn();
static void *wa_configure(Jsonb *settings);
static const char *wa_target(void *config);
static void *wa_create(void *config, Jsonb *state, MemoryContext parent);
static void wa_destroy(void *state);
static Jsonb *wa_snapshot(void *state, Jsonb *config);
static uint64 wa_hash(void *state);
static void wa_apply(void *state, const SpoolEntry *e, SpoolOutputs *out);
static void path_setting(const SpoolOptionTable *table, const SpoolOption *opt,
						 JsonbValue *v, void *result);
static void time_setting(const SpoolOptionTable *table, const SpoolOption *opt,
						 JsonbValue *v, void *result);
static void threshold_setting(const SpoolOptionTable *table, const SpoolOption *opt,
							  JsonbValue *v, void *result);
static void window_setting(const SpoolOptionTable *table, const SpoolOption *opt,
						   JsonbValue *v, void *result);
static int64 window_duration(const SpoolOptionTable *table, const SpoolOption *opt,
							 JsonbValue *v);
static JsonbValue *lookup_path(Jsonb *doc, char *const *path, int depth, JsonbValue *res);
static bool jsonb_number(JsonbValue *v, double *out);
static bool entry_time(WAState *st, const SpoolEntry *e, int64 *ts);
static void key_text(JsonbValue *v, StringInfo buf);
static WAKey *key_enter(WAState *st, const char *key);
static void window_add(WAState *st, WAKey *k, int64 ts, double val);
static void window_recompute(WAKey *k);
static double key_aggregate(WAState *st, WAKey *k);
static bool condition_holds(WAConfig *cfg, double agg);
static Jsonb *alert_payload(WAState *st, WAKey *k, double agg, const SpoolEntry *e);
static void append_double(StringInfo buf, double d);
static void append_time(StringInfo buf, int64 ts);
static void load_key(WAState *st, const char *key, JsonbContainer *obj);
static void push_int_field(JsonbParseState **ps, const char *key, int64 n);
static void push_double_field(JsonbParseState **ps, const char *key, double d);

static void
wa_error(const char *msg, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("window_alert: %s", msg),
			 detail ? errdetail("%s", detail) : 0,
			 errhint("See docs/processors.md for the window_alert settings.")));
}

/* ---------------------------------------------------------------------
 * Settings
 * ---------------------------------------------------------------------
 */

#define WA(member)	SPOOL_OPT_MEMBER(WAConfig, member)
#define WA_PATH(path, depth) WA(path), .count_offset = offsetof(WAConfig, depth)

static const SpoolOption wa_setting_specs[] = {
	{.name = "key", .type = SPOOL_OPT_CUSTOM, .flags = SPOOL_OPT_REQUIRED,
		WA_PATH(key_path, key_depth), .parse = path_setting,
		.doc = "It is the path of the grouping key in the entry's value: dot-separated keys such as \"from.address\", or an array of keys."},
	{.name = "value", .type = SPOOL_OPT_CUSTOM, WA_PATH(value_path, value_depth),
		.parse = path_setting,
		.doc = "It is the path of the number to aggregate: dot-separated keys such as \"tx.amount\", or an array of keys."},
	{.name = "aggregate", .type = SPOOL_OPT_CHOICE, WA(agg), .dflt = WA_SUM, .choices = agg_names},
	{.name = "window", .type = SPOOL_OPT_CUSTOM, .flags = SPOOL_OPT_REQUIRED,
		.parse = window_setting,
		.doc = "Use {\"type\": \"count\", \"size\": N} for the last N entries, or type \"tumbling\" or \"sliding\" with an interval such as \"5 minutes\" as size."},
	{.name = "time", .type = SPOOL_OPT_CUSTOM, WA_PATH(time_path, time_depth),
		.parse = time_setting, .doc = "It is \"kafka_ts\", or the path of the event time in the entry's value."},
	{.name = "threshold", .type = SPOOL_OPT_CUSTOM, .flags = SPOOL_OPT_REQUIRED,
		.parse = threshold_setting},
	{.name = "op", .type = SPOOL_OPT_CHOICE, WA(op), .dflt = WA_GE, .choices = op_names},
	{.name = "target", .type = SPOOL_OPT_STRING, .flags = SPOOL_OPT_REQUIRED, WA(target),
		.hi = SPOOL_NAME_MAX, .doc = "It names the outbox target of the alerts."},
	{.name = "max_keys", .type = SPOOL_OPT_INT, WA(max_keys), .dflt = WA_DEFAULT_MAX_KEYS,
		.lo = 1, .hi = WA_MAX_MAX_KEYS},
};

static const SpoolOptionTable wa_settings = {
	SPOOL_OPT_TABLE(wa_setting_specs, WAConfig),
	.prefix = "window_alert: ", .noun = "setting", .subject = "", .listing = "Settings are",
	.not_object = "settings must be a JSON object",
	.hint = "See docs/processors.md for the window_alert settings.",
};

/*
 * A path is "a.b.c" or ["a", "b", "c"]: its keys go to opt's array member,
 * their number to its count member.
 */
static void
path_setting(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			 void *result)
{
	char	  **path = (char **) ((char *) result + opt->offset);
	int		   *depth = (int *) ((char *) result + opt->count_offset);

	*depth = 0;
	if (v->type == jbvString)
	{
		char	   *s = pnstrdup(v->val.string.val, v->val.string.len);
		char	   *save = NULL;
		char	   *part;

		if (*s == '\0')
			spool_option_bad(table, opt, NULL, "must not be empty");
		if (s[0] == '.' || s[strlen(s) - 1] == '.' || strstr(s, "..") != NULL)
			spool_option_bad(table, opt, NULL, psprintf("is not a valid path: \"%s\"", s));
		for (part = strtok_r(s, ".", &save); part; part = strtok_r(NULL, ".", &save))
		{
			if (*depth == WA_MAX_PATH)
				spool_option_bad(table, opt, NULL, "is nested too deeply");
			path[(*depth)++] = part;
		}
		return;
	}
	if (v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data))
	{
		JsonbIterator *it = JsonbIteratorInit(v->val.binary.data);
		JsonbValue	elem;
		JsonbIteratorToken tok;

		while ((tok = JsonbIteratorNext(&it, &elem, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM)
				continue;
			if (elem.type != jbvString || elem.val.string.len == 0)
				spool_option_bad(table, opt, NULL, "must be an array of non-empty strings");
			if (*depth == WA_MAX_PATH)
				spool_option_bad(table, opt, NULL, "is nested too deeply");
			path[(*depth)++] = pnstrdup(elem.val.string.val, elem.val.string.len);
		}
		if (*depth == 0)
			spool_option_bad(table, opt, NULL, "must not be empty");
		return;
	}
	spool_option_bad(table, opt, NULL,
					 "must be a path: a string such as \"a.b\" or an array of keys");
}

/* time: "kafka_ts" (depth 0) or a path. */
static void
time_setting(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			 void *result)
{
	if (v->type == jbvString && v->val.string.len == 8 &&
		strncmp(v->val.string.val, "kafka_ts", 8) == 0)
		((WAConfig *) result)->time_depth = 0;
	else
		path_setting(table, opt, v, result);
}

static void
threshold_setting(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
				  void *result)
{
	if (v->type != jbvNumeric || !jsonb_number(v, &((WAConfig *) result)->threshold))
		spool_option_bad(table, opt, NULL, "must be a finite number");
}

/* window: exactly {"type": ..., "size": ...}; what size is depends on the type. */
static void
window_setting(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			   void *result)
{
	WAConfig   *cfg = result;
	JsonbValue	wt;
	JsonbValue	ws;

	if (v->type != jbvBinary || !JsonContainerIsObject(v->val.binary.data))
		spool_option_bad(table, opt, NULL,
						 "must be an object such as {\"type\": \"count\", \"size\": 10}");
	if (getKeyJsonValueFromContainer(v->val.binary.data, "type", 4, &wt) == NULL)
		spool_option_bad(table, opt, "window.type", "is missing");
	cfg->kind = spool_option_choice(table, opt, "window.type", &wt, kind_names);
	if (getKeyJsonValueFromContainer(v->val.binary.data, "size", 4, &ws) == NULL)
		spool_option_bad(table, opt, "window.size", "is missing");
	if (cfg->kind == WA_WINDOW_COUNT)
	{
		double		n;

		if (ws.type != jbvNumeric || !jsonb_number(&ws, &n) ||
			n != floor(n) || n < 1 || n > WA_MAX_COUNT)
			spool_option_bad(table, opt, "window.size",
							 psprintf("of a count window must be an integer from 1 to %d",
									  WA_MAX_COUNT));
		cfg->size = (int64) n;
	}
	else
		cfg->size = window_duration(table, opt, &ws);
	if (JsonContainerSize(v->val.binary.data) != 2)
		spool_option_bad(table, opt, NULL, "takes exactly \"type\" and \"size\"");
}

/*
 * The size of a time window: an interval up to 366 days without months,
 * or (deprecated, kept for existing settings) a bare number of seconds,
 * where every other duration takes milliseconds.
 */
static int64
window_duration(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v)
{
	Interval   *iv;
	double		s;
	int64		us;

	if (jsonb_number(v, &s))
	{
		if (s <= 0 || s > 366.0 * 86400)
			spool_option_bad(table, opt, "window.size",
							 "must be a positive number of seconds, at most a year");
		return (int64) (s * USECS_PER_SEC);
	}
	if (v->type != jbvString)
		spool_option_bad(table, opt, "window.size",
						 "of a time window must be an interval such as '5 minutes', or seconds");
	iv = spool_option_interval(table, opt, "window.size", v);
	if (iv->month != 0)
		spool_option_bad(table, opt, "window.size", "must not use months or years");
	us = iv->time + (int64) iv->day * USECS_PER_DAY;
	if (us <= 0 || us > (int64) 366 * USECS_PER_DAY)
		spool_option_bad(table, opt, "window.size", "must be positive and at most 366 days");
	return us;
}

/*
 * Parse and check window_alert settings (an object).  Raises SP001 with the
 * reason on any problem; used at create_processor time and at run time.
 */
static void *
wa_configure(Jsonb *settings)
{
	WAConfig   *cfg = spool_parse_options(&wa_settings, -1, settings);

	if (cfg->value_depth == 0 && cfg->agg != WA_COUNT)
		spool_option_bad(&wa_settings, NULL, "value",
						 psprintf("is missing; aggregate \"%s\" needs it", agg_names[cfg->agg]));
	if (cfg->time_depth > 0 && cfg->kind == WA_WINDOW_COUNT)
		spool_option_bad(&wa_settings, NULL, "time", "applies to time windows only");
	return cfg;
}

static const char *
wa_target(void *config)
{
	return ((WAConfig *) config)->target;
}

/* ---------------------------------------------------------------------
 * Reading entries
 * ---------------------------------------------------------------------
 */

static JsonbValue *
lookup_path(Jsonb *doc, char *const *path, int depth, JsonbValue *res)
{
	JsonbContainer *c = &doc->root;
	int			i;

	if (JB_ROOT_IS_SCALAR(doc))
		return NULL;
	for (i = 0; i < depth; i++)
	{
		if (!JsonContainerIsObject(c))
			return NULL;
		if (getKeyJsonValueFromContainer(c, path[i], strlen(path[i]), res) == NULL)
			return NULL;
		if (i + 1 < depth)
		{
			if (res->type != jbvBinary)
				return NULL;
			c = res->val.binary.data;
		}
	}
	return res;
}

/* A JSON number, or a string holding one; false unless finite. */
static bool
jsonb_number(JsonbValue *v, double *out)
{
	char	   *s;
	char	   *end;
	double		d;

	if (v->type == jbvNumeric)
	{
		if (numeric_is_nan(v->val.numeric) || numeric_is_inf(v->val.numeric))
			return false;
		s = DatumGetCString(DirectFunctionCall1(numeric_out,
												NumericGetDatum(v->val.numeric)));
	}
	else if (v->type == jbvString && v->val.string.len > 0 && v->val.string.len < 64)
	{
		s = pnstrdup(v->val.string.val, v->val.string.len);
		if (!spool_json_number_syntax(s))
			return false;
	}
	else
		return false;
	errno = 0;
	d = strtod(s, &end);
	if (end == s || *end != '\0' || !isfinite(d))
		return false;
	*out = d == 0 ? 0.0 : d;	/* no -0: it would not survive a snapshot */
	return true;
}

/* Unix epoch in PostgreSQL timestamps (microseconds). */
#define UNIX_EPOCH_US ((int64) (UNIX_EPOCH_JDATE - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY)

/* The entry's event time: kafka_ts, or a path holding epoch seconds or a timestamp string. */
static bool
entry_time(WAState *st, const SpoolEntry *e, int64 *ts)
{
	WAConfig   *cfg = st->cfg;
	JsonbValue	v;
	double		secs;

	if (cfg->time_depth == 0)
	{
		if (!e->has_ts)
			return false;
		*ts = e->kafka_ts;
		return true;
	}
	if (e->value == NULL || lookup_path(e->value, cfg->time_path, cfg->time_depth, &v) == NULL)
		return false;
	if (v.type == jbvNumeric)
	{
		if (!jsonb_number(&v, &secs) || fabs(secs) > 1e11)
			return false;
		*ts = (int64) llround(secs * USECS_PER_SEC) + UNIX_EPOCH_US;
		return true;
	}
	if (v.type == jbvString && v.val.string.len < MAXDATELEN)
	{
		char		workbuf[MAXDATELEN + 1];
		char	   *field[MAXDATEFIELDS];
		int			ftype[MAXDATEFIELDS];
		int			nf;
		int			dtype;
		struct pg_tm tt;
		fsec_t		fsec;
		int			tz;
		char	   *s = pnstrdup(v.val.string.val, v.val.string.len);
		pg_tz	   *session = session_timezone;
		bool		ok;

		/*
		 * Parse without raising: a bad timestamp skips the entry.  Only
		 * literal dates (no 'now', 'today', ...), and a timestamp without a
		 * zone is UTC, whatever the session's TimeZone: replicas must agree.
		 */
		if (!isdigit((unsigned char) s[0]))
			return false;
		session_timezone = pg_tzset("UTC");
		ok = ParseDateTime(s, workbuf, sizeof(workbuf), field, ftype,
						   MAXDATEFIELDS, &nf) == 0 &&
			DecodeDateTime(field, ftype, nf, &dtype, &tt, &fsec, &tz) == 0 &&
			dtype == DTK_DATE &&
			tm2timestamp(&tt, fsec, &tz, ts) == 0;
		session_timezone = session;
		return ok;
	}
	return false;
}

/* The grouping key as text: strings as they are, other values as JSON. */
static void
key_text(JsonbValue *v, StringInfo buf)
{
	resetStringInfo(buf);
	switch (v->type)
	{
		case jbvString:
			appendBinaryStringInfo(buf, v->val.string.val, v->val.string.len);
			break;
		case jbvNumeric:
			appendStringInfoString(buf, DatumGetCString(DirectFunctionCall1(numeric_out,
																			NumericGetDatum(v->val.numeric))));
			break;
		case jbvBool:
			appendStringInfoString(buf, v->val.boolean ? "true" : "false");
			break;
		case jbvBinary:
			appendStringInfoString(buf, JsonbToCString(NULL, v->val.binary.data, v->val.binary.len));
			break;
		default:
			break;
	}
}

/* ---------------------------------------------------------------------
 * State
 * ---------------------------------------------------------------------
 */

static uint32
key_hash(const void *key, Size keysize)
{
	const char *s = *(char *const *) key;

	return hash_bytes((const unsigned char *) s, strlen(s));
}

static int
key_match(const void *a, const void *b, Size keysize)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

static WAKey *
key_enter(WAState *st, const char *key)
{
	bool		found;
	WAKey	   *k = hash_search(st->keys, &key, HASH_ENTER, &found);

	if (!found)
	{
		char	   *copy = MemoryContextStrdup(st->cxt, key);

		memset(k, 0, sizeof(WAKey));
		k->key = copy;
		k->armed = true;
	}
	return k;
}

/*
 * A state for cfg, loaded from a jsonb state (NULL or {} for a fresh one),
 * in its own memory context under parent.
 */
static void *
wa_create(void *config, Jsonb *state, MemoryContext parent)
{
	WAConfig   *cfg = config;
	MemoryContext cxt = AllocSetContextCreate(parent, "window_alert state",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	WAState    *st = palloc0(sizeof(WAState));
	HASHCTL		ctl;
	JsonbValue	v;

	st->cxt = cxt;
	st->cfg = cfg;
	initStringInfo(&st->buf);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(char *);
	ctl.entrysize = sizeof(WAKey);
	ctl.hash = key_hash;
	ctl.match = key_match;
	ctl.hcxt = cxt;
	st->keys = hash_create("window_alert keys", 1024, &ctl,
						   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);

	if (state != NULL && JB_ROOT_IS_OBJECT(state) && !JB_ROOT_IS_SCALAR(state))
	{
		double		d;

		if (getKeyJsonValueFromContainer(&state->root, "skipped", 7, &v) &&
			jsonb_number(&v, &d))
			st->skipped = (int64) d;
		if (getKeyJsonValueFromContainer(&state->root, "late", 4, &v) &&
			jsonb_number(&v, &d))
			st->late = (int64) d;
		if (getKeyJsonValueFromContainer(&state->root, "evicted", 7, &v) &&
			jsonb_number(&v, &d))
			st->evicted = (int64) d;
		if (getKeyJsonValueFromContainer(&state->root, "keys", 4, &v) &&
			v.type == jbvBinary && JsonContainerIsObject(v.val.binary.data))
		{
			JsonbIterator *it = JsonbIteratorInit(v.val.binary.data);
			JsonbValue	val;
			char	   *key;

			while (spool_object_next(&it, &key, &val))
			{
				if (val.type != jbvBinary || !JsonContainerIsObject(val.val.binary.data))
					wa_error(psprintf("state for key \"%s\" is not an object", key), NULL);
				load_key(st, key, val.val.binary.data);
			}
		}
	}
	MemoryContextSwitchTo(old);
	return st;
}

static double
field_number(JsonbContainer *obj, const char *name, double dflt)
{
	JsonbValue	v;
	double		d;

	if (getKeyJsonValueFromContainer(obj, name, strlen(name), &v) && jsonb_number(&v, &d))
		return d;
	return dflt;
}

static void
load_key(WAState *st, const char *key, JsonbContainer *obj)
{
	WAKey	   *k = key_enter(st, key);
	JsonbValue	v;

	if (getKeyJsonValueFromContainer(obj, "armed", 5, &v) && v.type == jbvBool)
		k->armed = v.val.boolean;
	k->open = getKeyJsonValueFromContainer(obj, "mark", 4, &v) != NULL;
	k->mark = (int64) field_number(obj, "mark", 0);
	k->last = (int64) field_number(obj, "last", 0);
	k->n = (int64) field_number(obj, "n", 0);
	k->sum = field_number(obj, "sum", 0);
	k->min = field_number(obj, "min", 0);
	k->max = field_number(obj, "max", 0);
	if (getKeyJsonValueFromContainer(obj, "ts", 2, &v) &&
		v.type == jbvBinary && JsonContainerIsArray(v.val.binary.data))
	{
		JsonbValue	vals;
		int			n = JsonContainerSize(v.val.binary.data);
		int			i;

		if (!getKeyJsonValueFromContainer(obj, "vals", 4, &vals) ||
			vals.type != jbvBinary || !JsonContainerIsArray(vals.val.binary.data) ||
			JsonContainerSize(vals.val.binary.data) != n)
			wa_error(psprintf("state for key \"%s\" has \"ts\" and \"vals\" of different lengths", key), NULL);
		k->cap = Max(n, 4);
		k->items = MemoryContextAlloc(st->cxt, sizeof(WAItem) * k->cap);
		for (i = 0; i < n; i++)
		{
			JsonbValue *a = getIthJsonbValueFromContainer(v.val.binary.data, i);
			JsonbValue *b = getIthJsonbValueFromContainer(vals.val.binary.data, i);
			double		ts;
			double		val;

			if (a == NULL || b == NULL || !jsonb_number(a, &ts) || !jsonb_number(b, &val))
				wa_error(psprintf("state for key \"%s\" has a malformed item", key), NULL);
			k->items[i].ts = (int64) ts;
			k->items[i].val = val;
		}
		k->nitems = n;
	}
}

static void
wa_destroy(void *state)
{
	MemoryContextDelete(((WAState *) state)->cxt);
}

/* Doubles as the shortest text that reads back exactly (null if not finite). */
static void
append_double(StringInfo buf, double d)
{
	char		tmp[DOUBLE_SHORTEST_DECIMAL_LEN];

	if (!isfinite(d))
	{
		appendStringInfoString(buf, "null");
		return;
	}
	double_to_shortest_decimal_buf(d, tmp);
	appendStringInfoString(buf, tmp);
}

/* An event time as an ISO 8601 UTC string. */
static void
append_time(StringInfo buf, int64 ts)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
	{
		appendStringInfoString(buf, "null");
		return;
	}
	appendStringInfo(buf, "\"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ\"",
					 tm.tm_year, tm.tm_mon, tm.tm_mday,
					 tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
}

/* JSON building blocks for the state (pushJsonbValue: no text to parse). */
static void
push_key(JsonbParseState **ps, const char *key)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	(void) pushJsonbValue(ps, WJB_KEY, &v);
}

static void
push_int(JsonbParseState **ps, JsonbIteratorToken tok, int64 n)
{
	JsonbValue	v;

	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(n);
	(void) pushJsonbValue(ps, tok, &v);
}

/* A double as a numeric that reads back exactly; null if not finite. */
static void
push_double(JsonbParseState **ps, JsonbIteratorToken tok, double d)
{
	JsonbValue	v;

	if (!isfinite(d))
		v.type = jbvNull;
	else if (d == floor(d) && fabs(d) < 9007199254740992.0)
	{
		v.type = jbvNumeric;
		v.val.numeric = int64_to_numeric((int64) d);
	}
	else
	{
		char		tmp[DOUBLE_SHORTEST_DECIMAL_LEN];

		double_to_shortest_decimal_buf(d, tmp);
		v.type = jbvNumeric;
		v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(tmp),
															ObjectIdGetDatum(InvalidOid),
															Int32GetDatum(-1)));
	}
	(void) pushJsonbValue(ps, tok, &v);
}

/* A key and its value, in an object. */
static void
push_int_field(JsonbParseState **ps, const char *key, int64 n)
{
	push_key(ps, key);
	push_int(ps, WJB_VALUE, n);
}

static void
push_double_field(JsonbParseState **ps, const char *key, double d)
{
	push_key(ps, key);
	push_double(ps, WJB_VALUE, d);
}

/*
 * The state as jsonb.  config, when given, is kept under "config" (the SQL
 * entry point carries its settings there).  Object keys are sorted by jsonb,
 * so equal states give equal jsonb whatever the hash table order.  A key's
 * window items are two parallel arrays, "ts" and "vals" (smaller than pairs).
 */
static Jsonb *
wa_snapshot(void *state, Jsonb *config)
{
	WAState    *st = state;
	JsonbParseState *ps = NULL;
	HASH_SEQ_STATUS seq;
	WAKey	   *k;
	JsonbValue *res;
	JsonbValue	v;

	(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
	push_int_field(&ps, "v", WA_STATE_VERSION);
	push_int_field(&ps, "skipped", st->skipped);
	push_int_field(&ps, "late", st->late);
	push_int_field(&ps, "evicted", st->evicted);
	if (config)
	{
		push_key(&ps, "config");
		v.type = jbvBinary;
		v.val.binary.data = &config->root;
		v.val.binary.len = VARSIZE(config) - VARHDRSZ;
		(void) pushJsonbValue(&ps, WJB_VALUE, &v);
	}
	push_key(&ps, "keys");
	(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
	hash_seq_init(&seq, st->keys);
	while ((k = hash_seq_search(&seq)) != NULL)
	{
		int			i;

		push_key(&ps, k->key);
		(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
		push_key(&ps, "armed");
		v.type = jbvBool;
		v.val.boolean = k->armed;
		(void) pushJsonbValue(&ps, WJB_VALUE, &v);
		if (k->open)
		{
			push_int_field(&ps, "mark", k->mark);
		}
		push_int_field(&ps, "last", k->last);
		push_int_field(&ps, "n", k->n);
		push_double_field(&ps, "sum", k->sum);
		push_double_field(&ps, "min", k->min);
		push_double_field(&ps, "max", k->max);
		if (st->cfg->kind != WA_WINDOW_TUMBLING)
		{
			push_key(&ps, "ts");
			(void) pushJsonbValue(&ps, WJB_BEGIN_ARRAY, NULL);
			for (i = 0; i < k->nitems; i++)
				push_int(&ps, WJB_ELEM, k->items[k->off + i].ts);
			(void) pushJsonbValue(&ps, WJB_END_ARRAY, NULL);
			push_key(&ps, "vals");
			(void) pushJsonbValue(&ps, WJB_BEGIN_ARRAY, NULL);
			for (i = 0; i < k->nitems; i++)
				push_double(&ps, WJB_ELEM, k->items[k->off + i].val);
			(void) pushJsonbValue(&ps, WJB_END_ARRAY, NULL);
		}
		(void) pushJsonbValue(&ps, WJB_END_OBJECT, NULL);
	}
	(void) pushJsonbValue(&ps, WJB_END_OBJECT, NULL);
	res = pushJsonbValue(&ps, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/* Fold 8 bytes into a running 64-bit hash. */
static inline uint64
mix(uint64 h, uint64 v)
{
	return hash_combine64(h, hash_bytes_uint32_extended((uint32) v, v >> 32));
}

static inline uint64
double_bits(double d)
{
	uint64		u;

	memcpy(&u, &d, sizeof(u));
	return u;
}

/*
 * A hash of the state that does not depend on the hash table's layout (keys
 * are combined by addition), so replicas that built their tables in
 * different orders (one loaded a snapshot) agree when their states do.
 * Cheaper than hashing the jsonb form, which it replaces inside processors.
 */
static uint64
wa_hash(void *state)
{
	WAState    *st = state;
	HASH_SEQ_STATUS seq;
	WAKey	   *k;
	uint64		total = mix(mix(mix(0, st->skipped), st->late), st->evicted);

	hash_seq_init(&seq, st->keys);
	while ((k = hash_seq_search(&seq)) != NULL)
	{
		uint64		h = hash_bytes_extended((const unsigned char *) k->key, strlen(k->key), 0);
		int			i;

		h = mix(h, (uint64) k->armed | ((uint64) k->open << 1));
		h = mix(h, k->mark);
		h = mix(h, k->last);
		h = mix(h, k->n);
		h = mix(h, double_bits(k->sum));
		h = mix(h, double_bits(k->min));
		h = mix(h, double_bits(k->max));
		for (i = 0; i < k->nitems; i++)
		{
			h = mix(h, k->items[k->off + i].ts);
			h = mix(h, double_bits(k->items[k->off + i].val));
		}
		total += h;
	}
	return total;
}

/* ---------------------------------------------------------------------
 * Windows
 * ---------------------------------------------------------------------
 */

/* n, sum, min and max from the items (count and sliding windows). */
static void
window_recompute(WAKey *k)
{
	int			i;

	k->n = k->nitems;
	k->sum = 0;
	for (i = 0; i < k->nitems; i++)
	{
		double		v = k->items[k->off + i].val;

		k->sum += v;
		if (i == 0 || v < k->min)
			k->min = v;
		if (i == 0 || v > k->max)
			k->max = v;
	}
	if (k->nitems == 0)
		k->min = k->max = 0;
}

/* Insert (ts, val) keeping items sorted by ts (stable: after equal ts). */
static void
items_insert(WAState *st, WAKey *k, int64 ts, double val)
{
	int			pos;

	if (k->off + k->nitems == k->cap)
	{
		if (k->off > 0)
		{
			memmove(k->items, k->items + k->off, sizeof(WAItem) * k->nitems);
			k->off = 0;
		}
		else
		{
			k->cap = Max(k->cap * 2, 8);
			k->items = k->items
				? repalloc(k->items, sizeof(WAItem) * k->cap)
				: MemoryContextAlloc(st->cxt, sizeof(WAItem) * k->cap);
		}
	}
	pos = k->off + k->nitems;
	while (pos > k->off && k->items[pos - 1].ts > ts)
	{
		k->items[pos] = k->items[pos - 1];
		pos--;
	}
	k->items[pos].ts = ts;
	k->items[pos].val = val;
	k->nitems++;
}

static void
window_add(WAState *st, WAKey *k, int64 ts, double val)
{
	WAConfig   *cfg = st->cfg;
	bool		evicted = false;

	switch (cfg->kind)
	{
		case WA_WINDOW_COUNT:
			items_insert(st, k, ts, val);
			while (k->nitems > cfg->size)
			{
				k->off++;
				k->nitems--;
				evicted = true;
			}
			break;
		case WA_WINDOW_SLIDING:
			items_insert(st, k, ts, val);
			if (!k->open || ts > k->mark)
				k->mark = ts;
			k->open = true;
			/* The window is (mark - size, mark]. */
			while (k->nitems > 0 && k->items[k->off].ts <= k->mark - cfg->size)
			{
				k->off++;
				k->nitems--;
				evicted = true;
			}
			break;
		case WA_WINDOW_TUMBLING:
			k->n++;
			k->sum += val;
			if (k->n == 1 || val < k->min)
				k->min = val;
			if (k->n == 1 || val > k->max)
				k->max = val;
			return;
	}
	if (evicted)
		window_recompute(k);
	else
	{
		k->n = k->nitems;
		k->sum += val;
		if (k->n == 1 || val < k->min)
			k->min = val;
		if (k->n == 1 || val > k->max)
			k->max = val;
	}
}

static double
key_aggregate(WAState *st, WAKey *k)
{
	switch (st->cfg->agg)
	{
		case WA_SUM:
			return k->sum;
		case WA_COUNT:
			return (double) k->n;
		case WA_MIN:
			return k->min;
		case WA_MAX:
			return k->max;
	}
	return 0;
}

static bool
condition_holds(WAConfig *cfg, double agg)
{
	switch (cfg->op)
	{
		case WA_GT:
			return agg > cfg->threshold;
		case WA_GE:
			return agg >= cfg->threshold;
		case WA_LT:
			return agg < cfg->threshold;
		case WA_LE:
			return agg <= cfg->threshold;
	}
	return false;
}

static Jsonb *
alert_payload(WAState *st, WAKey *k, double agg, const SpoolEntry *e)
{
	WAConfig   *cfg = st->cfg;
	StringInfo	buf = &st->buf;

	resetStringInfo(buf);
	appendStringInfoString(buf, "{\"key\": ");
	escape_json(buf, k->key);
	appendStringInfo(buf, ", \"aggregate\": \"%s\", \"value\": ", agg_names[cfg->agg]);
	append_double(buf, agg);
	appendStringInfo(buf, ", \"op\": \"%s\", \"threshold\": ", op_names[cfg->op]);
	append_double(buf, cfg->threshold);
	appendStringInfo(buf, ", \"count\": " INT64_FORMAT ", \"sum\": ", k->n);
	append_double(buf, k->sum);
	appendStringInfoString(buf, ", \"min\": ");
	append_double(buf, k->min);
	appendStringInfoString(buf, ", \"max\": ");
	append_double(buf, k->max);
	appendStringInfo(buf, ", \"window\": {\"type\": \"%s\"", kind_names[cfg->kind]);
	if (cfg->kind == WA_WINDOW_COUNT)
		appendStringInfo(buf, ", \"size\": " INT64_FORMAT "}", cfg->size);
	else
	{
		int64		start = cfg->kind == WA_WINDOW_TUMBLING ? k->mark : k->mark - cfg->size;

		appendStringInfoString(buf, ", \"start\": ");
		append_time(buf, start);
		appendStringInfoString(buf, ", \"end\": ");
		append_time(buf, start + cfg->size);
		appendStringInfoChar(buf, '}');
	}
	appendStringInfo(buf, ", \"cursor\": " INT64_FORMAT, e->cursor);
	if (e->source)
	{
		appendStringInfoString(buf, ", \"source\": ");
		escape_json(buf, e->source);
	}
	appendStringInfo(buf, ", \"kafka_partition\": %d, \"kafka_offset\": " INT64_FORMAT "}",
					 e->kafka_partition, e->kafka_offset);
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf->data)));
}

static int
key_age_cmp(const void *a, const void *b)
{
	const WAKey *x = *(WAKey *const *) a;
	const WAKey *y = *(WAKey *const *) b;

	if (x->last != y->last)
		return x->last < y->last ? -1 : 1;
	return strcmp(x->key, y->key);
}

/*
 * More than max_keys keys: forget the least recently seen tenth of them (by
 * the cursor of their latest entry, then by key), so that keys that are
 * never seen again cannot grow the state without bound.  Which keys go
 * depends only on the entries applied, so every replica forgets the same.
 */
static void
evict_keys(WAState *st)
{
	long		n = hash_get_num_entries(st->keys);
	long		drop = Max(st->cfg->max_keys / 10, 1) + (n - st->cfg->max_keys - 1);
	WAKey	  **all = palloc(sizeof(WAKey *) * n);
	HASH_SEQ_STATUS seq;
	WAKey	   *k;
	long		i = 0;

	hash_seq_init(&seq, st->keys);
	while ((k = hash_seq_search(&seq)) != NULL)
		all[i++] = k;
	qsort(all, n, sizeof(WAKey *), key_age_cmp);
	for (i = 0; i < drop && i < n; i++)
	{
		char	   *key = all[i]->key;

		if (all[i]->items)
			pfree(all[i]->items);
		(void) hash_search(st->keys, &key, HASH_REMOVE, NULL);
		pfree(key);
		st->evicted++;
	}
	pfree(all);
}

/*
 * Apply one entry; append an output to out when its key's aggregate crosses
 * the threshold.  Entries without a usable key, value or time are counted as
 * skipped; entries older than their key's current window as late.
 */
static void
wa_apply(void *state, const SpoolEntry *e, SpoolOutputs *out)
{
	WAState    *st = state;
	WAConfig   *cfg = st->cfg;
	JsonbValue	kv;
	JsonbValue	vv;
	double		val = 1;
	int64		ts = e->cursor;
	WAKey	   *k;
	double		agg;
	bool		holds;

	if (e->value == NULL ||
		lookup_path(e->value, cfg->key_path, cfg->key_depth, &kv) == NULL ||
		kv.type == jbvNull)
	{
		st->skipped++;
		return;
	}
	if (cfg->value_depth > 0 && cfg->agg != WA_COUNT &&
		(lookup_path(e->value, cfg->value_path, cfg->value_depth, &vv) == NULL ||
		 !jsonb_number(&vv, &val)))
	{
		st->skipped++;
		return;
	}
	if (cfg->kind != WA_WINDOW_COUNT && !entry_time(st, e, &ts))
	{
		st->skipped++;
		return;
	}
	key_text(&kv, &st->buf);
	k = key_enter(st, st->buf.data);
	k->last = e->cursor;
	if (hash_get_num_entries(st->keys) > st->cfg->max_keys)
	{
		evict_keys(st);
		k = key_enter(st, st->buf.data);	/* recreated if it went too */
		k->last = e->cursor;
	}

	if (cfg->kind == WA_WINDOW_TUMBLING)
	{
		/* Windows are aligned to the Unix epoch. */
		int64		u = ts - UNIX_EPOCH_US;
		int64		start = (u >= 0 ? u / cfg->size : -((-u + cfg->size - 1) / cfg->size)) * cfg->size
			+ UNIX_EPOCH_US;

		if (k->open && start < k->mark)
		{
			st->late++;
			return;
		}
		if (!k->open || start > k->mark)
		{
			k->open = true;
			k->mark = start;
			k->n = 0;
			k->sum = k->min = k->max = 0;
			k->armed = true;
		}
	}
	else if (cfg->kind == WA_WINDOW_SLIDING && k->open && ts <= k->mark - cfg->size)
	{
		st->late++;
		return;
	}
	window_add(st, k, ts, val);

	agg = key_aggregate(st, k);
	holds = condition_holds(cfg, agg);
	if (holds && k->armed)
	{
		if (out->n == out->cap)
		{
			out->cap = Max(out->cap * 2, 16);
			out->keys = out->keys ? repalloc(out->keys, sizeof(char *) * out->cap)
				: palloc(sizeof(char *) * out->cap);
			out->payloads = out->payloads ? repalloc(out->payloads, sizeof(Jsonb *) * out->cap)
				: palloc(sizeof(Jsonb *) * out->cap);
		}
		out->keys[out->n] = pstrdup(k->key);
		out->payloads[out->n] = alert_payload(st, k, agg, e);
		out->n++;
		k->armed = false;
	}
	else if (!holds)
		k->armed = true;
}

/* ---------------------------------------------------------------------
 * Outputs and the SQL entry point
 * ---------------------------------------------------------------------
 */

/*
 * SQL: spool.window_alert(state jsonb, entries spool.entries[]) RETURNS spool.step
 *
 * Settings come from state->'config' when present (and are kept there in the
 * returned state), else from the running processor's handler options.
 */
Datum
spool_window_alert(PG_FUNCTION_ARGS)
{
	Jsonb	   *state = PG_ARGISNULL(0) ? NULL : PG_GETARG_JSONB_P(0);
	Jsonb	   *config = NULL;
	Jsonb	   *settings;
	WAConfig   *cfg;
	WAState    *st;
	SpoolOutputs	out = {0};
	TupleDesc	desc;
	Datum		result[2];
	bool		nulls[2] = {false, false};
	const char **targets;
	int			i;

	if (state != NULL && JB_ROOT_IS_OBJECT(state) && !JB_ROOT_IS_SCALAR(state))
	{
		JsonbValue	v;

		if (getKeyJsonValueFromContainer(&state->root, "config", 6, &v))
		{
			if (v.type != jbvBinary)
				wa_error("state->'config' must be an object", NULL);
			config = JsonbValueToJsonb(&v);
		}
	}
	else if (state != NULL)
		wa_error("state must be a JSON object", NULL);
	settings = config ? config : spool_handler_current_settings();
	if (settings == NULL)
		wa_error("no settings",
				 "Outside a processor, pass them in the state: '{\"config\": {...}}'.");
	cfg = wa_configure(settings);
	st = wa_create(cfg, state, CurrentMemoryContext);

	if (!PG_ARGISNULL(1))
	{
		ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(1);
		Datum	   *elems;
		bool	   *enulls;
		int			n;

		deconstruct_array(arr, ARR_ELEMTYPE(arr), -1, false, TYPALIGN_DOUBLE,
						  &elems, &enulls, &n);
		for (i = 0; i < n; i++)
		{
			HeapTupleHeader th;
			SpoolEntry		e = {0};
			bool		isnull;
			Datum		d;

			if (enulls[i])
			{
				st->skipped++;
				continue;
			}
			th = DatumGetHeapTupleHeader(elems[i]);
			d = GetAttributeByName(th, "cursor", &isnull);
			e.cursor = isnull ? 0 : DatumGetInt64(d);
			d = GetAttributeByName(th, "value", &isnull);
			e.value = isnull ? NULL : DatumGetJsonbP(d);
			d = GetAttributeByName(th, "kafka_ts", &isnull);
			e.has_ts = !isnull;
			e.kafka_ts = isnull ? 0 : DatumGetTimestampTz(d);
			d = GetAttributeByName(th, "source", &isnull);
			e.source = isnull ? NULL : TextDatumGetCString(d);
			d = GetAttributeByName(th, "kafka_partition", &isnull);
			e.kafka_partition = isnull ? 0 : DatumGetInt32(d);
			d = GetAttributeByName(th, "kafka_offset", &isnull);
			e.kafka_offset = isnull ? 0 : DatumGetInt64(d);
			wa_apply(st, &e, &out);
		}
	}

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "window_alert must return spool.step");
	targets = palloc(sizeof(char *) * Max(out.n, 1));
	for (i = 0; i < out.n; i++)
		targets[i] = cfg->target;
	result[0] = JsonbPGetDatum(wa_snapshot(st, config));
	result[1] = spool_make_outputs(out.n, targets, out.keys, out.payloads);
	wa_destroy(st);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), result, nulls)));
}

/* window_alert as a native handler (handler.h), in the order of its fields. */
const SpoolNativeHandler spool_window_alert_handler = {
	"window_alert", WA_EXAMPLE,
	wa_configure, wa_create, wa_destroy, wa_apply, wa_target, wa_snapshot, wa_hash
};
