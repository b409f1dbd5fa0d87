/*-------------------------------------------------------------------------
 *
 * consumer_json.c
 *	  The ingest worker's JSON text to jsonb for plain documents, without
 *	  jsonb_in's lexer.
 *
 * PostgreSQL 15's JSON lexer copies every character of every string into a
 * buffer one call at a time (appendStringInfoChar); for the ingest worker
 * that was a fifth of its time.  Here a string without escapes is handed to
 * jsonb as it lies in the document, numbers go through numeric_in as in
 * jsonb_in, and the in-memory tree is the one pushJsonbValue builds
 * (objects sorted by jsonb's key order, the last of repeated keys kept; a
 * small insertion sort, where pushJsonbValue's qsort_arg was a tenth of
 * the worker's time), turned into jsonb by the same JsonbValueToJsonb.
 *
 * Only a subset is taken: an object or an array at the top, strings without
 * backslash escapes, numbers, true, false, null, nesting up to
 * MAX_DEPTH.  Anything else, and anything not well formed, returns NULL
 * and the caller uses jsonb_in, which then builds the value or raises its
 * usual error: this file never decides that a document is invalid, so it
 * can only accept documents jsonb_in accepts (the grammar below is
 * jsonb_in's: the same whitespace, number syntax and token ends).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "ingest/consumer.h"

#define MAX_DEPTH		64

/* What PostgreSQL's JSON lexer counts as part of a word (JSON_ALPHANUMERIC_CHAR). */
#define WORD_CHAR(c) \
	(((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z') || \
	 ((c) >= '0' && (c) <= '9') || (c) == '_' || IS_HIGHBIT_SET(c))

#define MAX_MEMBERS		65536	/* pairs or elements of one container */

typedef struct Parser
{
	const char *p;
	const char *end;
} Parser;

static bool parse_value(Parser *ps, JsonbValue *v, int depth);

static inline void
skip_space(Parser *ps)
{
	while (ps->p < ps->end &&
		   (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
		ps->p++;
}

/* A string without escapes at p (on its opening quote) into v. */
static bool
parse_string(Parser *ps, JsonbValue *v)
{
	const char *s = ++ps->p;

	while (ps->p < ps->end && *ps->p != '"')
	{
		unsigned char c = (unsigned char) *ps->p;

		if (c == '\\' || c < 32)
			return false;
		ps->p++;
	}
	if (ps->p >= ps->end || ps->p - s > JENTRY_OFFLENMASK)
		return false;
	v->type = jbvString;
	v->val.string.val = (char *) s;
	v->val.string.len = ps->p - s;
	ps->p++;
	return true;
}

/* A number (jsonb_in's syntax, then numeric_in on its text) into v. */
static bool
parse_number(Parser *ps, JsonbValue *v)
{
	const char *s = ps->p;
	const char *e = ps->end;
	const char *p = s;
	char		buf[64];

	if (p < e && *p == '-')
		p++;
	if (p < e && *p == '0')
		p++;
	else if (p < e && *p >= '1' && *p <= '9')
		while (p < e && *p >= '0' && *p <= '9')
			p++;
	else
		return false;
	if (p < e && *p == '.')
	{
		p++;
		if (!(p < e && *p >= '0' && *p <= '9'))
			return false;
		while (p < e && *p >= '0' && *p <= '9')
			p++;
	}
	if (p < e && (*p == 'e' || *p == 'E'))
	{
		p++;
		if (p < e && (*p == '+' || *p == '-'))
			p++;
		if (!(p < e && *p >= '0' && *p <= '9'))
			return false;
		while (p < e && *p >= '0' && *p <= '9')
			p++;
	}
	if ((p < e && WORD_CHAR((unsigned char) *p)) || p - s >= (long) sizeof(buf))
		return false;
	memcpy(buf, s, p - s);
	buf[p - s] = '\0';
	v->type = jbvNumeric;
	v->val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(buf),
														 ObjectIdGetDatum(InvalidOid),
														 Int32GetDatum(-1)));
	ps->p = p;
	return true;
}

/* true, false or null, ending where jsonb_in's word ends. */
static bool
parse_word(Parser *ps, JsonbValue *v)
{
	const char *s = ps->p;
	const char *p = s;
	size_t		len;

	while (p < ps->end && WORD_CHAR((unsigned char) *p))
		p++;
	len = p - s;
	if (len == 4 && memcmp(s, "true", 4) == 0)
	{
		v->type = jbvBool;
		v->val.boolean = true;
	}
	else if (len == 5 && memcmp(s, "false", 5) == 0)
	{
		v->type = jbvBool;
		v->val.boolean = false;
	}
	else if (len == 4 && memcmp(s, "null", 4) == 0)
		v->type = jbvNull;
	else
		return false;
	ps->p = p;
	return true;
}

/*
 * jsonb's key order (lengthCompareJsonbPair): shorter keys first, equal
 * lengths by bytes, and of equal keys the later one first, so that keeping
 * the first of each run keeps the last value given, as jsonb_in does.
 */
static inline int
pair_cmp(const JsonbPair *a, const JsonbPair *b)
{
	if (a->key.val.string.len != b->key.val.string.len)
		return a->key.val.string.len > b->key.val.string.len ? 1 : -1;
	if (a->key.val.string.len > 0)
	{
		int			r = memcmp(a->key.val.string.val, b->key.val.string.val,
							   a->key.val.string.len);

		if (r != 0)
			return r;
	}
	return a->order > b->order ? -1 : 1;
}

/* Sort the pairs (insertion sort: objects are small) and drop repeated keys. */
static void
sort_pairs(JsonbValue *object)
{
	JsonbPair  *pairs = object->val.object.pairs;
	int			n = object->val.object.nPairs;
	int			i;
	int			k;

	for (i = 1; i < n; i++)
	{
		JsonbPair	x = pairs[i];
		int			j = i - 1;

		while (j >= 0 && pair_cmp(&pairs[j], &x) > 0)
		{
			pairs[j + 1] = pairs[j];
			j--;
		}
		pairs[j + 1] = x;
	}
	for (i = 1, k = 0; i < n; i++)
	{
		if (pairs[i].key.val.string.len != pairs[k].key.val.string.len ||
			memcmp(pairs[i].key.val.string.val, pairs[k].key.val.string.val,
				   pairs[i].key.val.string.len) != 0)
			pairs[++k] = pairs[i];
	}
	if (n > 0)
		object->val.object.nPairs = k + 1;
}

/*
 * An object or array at p into v: the in-memory tree pushJsonbValue would
 * build, objects with their keys in jsonb's order.
 */
static bool
parse_container(Parser *ps, JsonbValue *v, int depth)
{
	bool		object = (*ps->p == '{');
	char		close = object ? '}' : ']';
	int			cap = 8;
	int			n = 0;
	JsonbPair  *pairs = NULL;
	JsonbValue *elems = NULL;

	if (depth >= MAX_DEPTH)
		return false;
	if (object)
		pairs = palloc(sizeof(JsonbPair) * cap);
	else
		elems = palloc(sizeof(JsonbValue) * cap);
	ps->p++;
	skip_space(ps);
	if (ps->p < ps->end && *ps->p == close)
		ps->p++;
	else
	{
		for (;;)
		{
			if (n == cap)
			{
				if (cap >= MAX_MEMBERS)
					return false;
				cap *= 2;
				if (object)
					pairs = repalloc(pairs, sizeof(JsonbPair) * cap);
				else
					elems = repalloc(elems, sizeof(JsonbValue) * cap);
			}
			if (object)
			{
				if (!(ps->p < ps->end && *ps->p == '"') || !parse_string(ps, &pairs[n].key))
					return false;
				pairs[n].order = n;
				skip_space(ps);
				if (!(ps->p < ps->end && *ps->p == ':'))
					return false;
				ps->p++;
				skip_space(ps);
			}
			if (!parse_value(ps, object ? &pairs[n].value : &elems[n], depth + 1))
				return false;
			n++;
			skip_space(ps);
			if (ps->p >= ps->end)
				return false;
			if (*ps->p == close)
				break;
			if (*ps->p != ',')
				return false;
			ps->p++;
			skip_space(ps);
		}
		ps->p++;
	}
	if (object)
	{
		v->type = jbvObject;
		v->val.object.nPairs = n;
		v->val.object.pairs = pairs;
		sort_pairs(v);
	}
	else
	{
		v->type = jbvArray;
		v->val.array.nElems = n;
		v->val.array.elems = elems;
		v->val.array.rawScalar = false;
	}
	return true;
}

/* A value at p (no leading space) into v. */
static bool
parse_value(Parser *ps, JsonbValue *v, int depth)
{
	char		c;

	if (ps->p >= ps->end)
		return false;
	c = *ps->p;
	if (c == '{' || c == '[')
		return parse_container(ps, v, depth);
	if (c == '"')
		return parse_string(ps, v);
	if (c == '-' || (c >= '0' && c <= '9'))
		return parse_number(ps, v);
	return parse_word(ps, v);
}

/*
 * The jsonb of json[0..len) (no NUL inside, server encoding), or NULL when
 * the document is not one this file takes: the caller then uses jsonb_in.
 * Allocates in the current memory context, which the caller resets.
 */
Jsonb *
plain_json_to_jsonb(const char *json, size_t len)
{
	Parser		ps;
	JsonbValue	v;

	ps.p = json;
	ps.end = json + len;
	skip_space(&ps);
	if (ps.p >= ps.end || (*ps.p != '{' && *ps.p != '['))
		return NULL;			/* a scalar, or nothing: jsonb_in's job */
	if (!parse_container(&ps, &v, 0))
		return NULL;
	skip_space(&ps);
	if (ps.p != ps.end)
		return NULL;
	return JsonbValueToJsonb(&v);
}
