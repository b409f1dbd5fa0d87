/*-------------------------------------------------------------------------
 *
 * options.c
 *	  One way to read the jsonb options objects given to the SQL functions:
 *	  a static table of option specs (options.h) says each key's type,
 *	  default, bounds and the member of the caller's struct that receives
 *	  it; spool_parse_options walks an object against the table (unknown keys,
 *	  wrong types and out-of-range values are SP001, in the wording of the
 *	  table's family), and spool_options_jsonb writes the struct back as the
 *	  stored options.  Also the duration rule shared by every option:
 *	  intervals with units, bare numbers in milliseconds.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>

#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "core/core.h"

static bool in_scope(const SpoolOption *opt, int scope);
static void unknown_option(const SpoolOptionTable *table, int scope,
						   const char *key) pg_attribute_noreturn();
static void set_default(const SpoolOption *opt, void *result);
static void store_int(void *member, size_t size, int64 v);
static int64 load_int(const void *member, size_t size);
static char *option_string(const SpoolOptionTable *table, const SpoolOption *opt,
						   JsonbValue *v);
static void option_list(const SpoolOptionTable *table, const SpoolOption *opt,
						JsonbValue *v, void *result);
static bool bare_number(JsonbValue *v, JsonbValue *num);
static bool skip_digits(const char **p);
static bool render_value(const SpoolOption *opt, const void *result, StringInfo buf);

/* The member opt stores into, in the caller's struct result. */
#define MEMBER(opt, result) ((void *) ((char *) (result) + (opt)->offset))

/*
 * Check options against table and return the struct they are stored into
 * (palloc'd): defaults first, then each key, then the required keys.  scope
 * picks the options that apply (a target kind), -1 when the table has no
 * scopes.
 */
void *
spool_parse_options(const SpoolOptionTable *table, int scope, Jsonb *options)
{
	void	   *result = palloc0(table->size);
	bool	   *seen = palloc0(sizeof(bool) * table->noptions);
	JsonbIterator *it;
	JsonbValue	v;
	char	   *key;
	int			i;

	if (options == NULL || !JB_ROOT_IS_OBJECT(options))
		spool_option_error(table, table->not_object,
						   table->hint ? table->hint : "Pass '{}' for the defaults.");
	for (i = 0; i < table->noptions; i++)
		if (in_scope(&table->options[i], scope))
			set_default(&table->options[i], result);

	it = JsonbIteratorInit(&options->root);
	while (spool_object_next(&it, &key, &v))
	{
		const SpoolOption *opt = NULL;

		for (i = 0; i < table->noptions && opt == NULL; i++)
			if (strcmp(key, table->options[i].name) == 0 &&
				in_scope(&table->options[i], scope))
				opt = &table->options[i];
		if (opt == NULL)
			unknown_option(table, scope, key);
		if (opt->parse)
			opt->parse(table, opt, &v, result);
		else
			spool_option_value(table, opt, &v, result);
		seen[opt - table->options] = true;
	}

	for (i = 0; i < table->noptions; i++)
		if ((table->options[i].flags & SPOOL_OPT_REQUIRED) && !seen[i] &&
			in_scope(&table->options[i], scope))
			spool_option_bad(table, &table->options[i], NULL, "is missing");
	return result;
}

/*
 * The options in result as jsonb, every default filled in: what is stored,
 * and what spool_parse_options reads back to the same struct.
 */
Jsonb *
spool_options_jsonb(const SpoolOptionTable *table, int scope, const void *result)
{
	StringInfoData buf;
	StringInfoData val;
	bool		first = true;
	int			i;

	initStringInfo(&buf);
	initStringInfo(&val);
	appendStringInfoChar(&buf, '{');
	for (i = 0; i < table->noptions; i++)
	{
		const SpoolOption *opt = &table->options[i];

		if (!in_scope(opt, scope) || (opt->flags & SPOOL_OPT_INPUT))
			continue;
		resetStringInfo(&val);
		if (!(opt->render ? opt->render(opt, result, &val) : render_value(opt, result, &val)))
			continue;
		if (!first)
			appendStringInfoString(&buf, ", ");
		first = false;
		escape_json(&buf, opt->name);
		appendStringInfo(&buf, ": %s", val.data);
	}
	appendStringInfoChar(&buf, '}');
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

static bool
in_scope(const SpoolOption *opt, int scope)
{
	return opt->scopes == 0 || (scope >= 0 && (opt->scopes & SPOOL_OPT_SCOPE(scope)));
}

/* key is no option of table (in scope): name the ones there are. */
static void
unknown_option(const SpoolOptionTable *table, int scope, const char *key)
{
	StringInfoData msg;
	StringInfoData list;
	int			n = 0;
	int			k = 0;
	int			i;

	initStringInfo(&msg);
	appendStringInfo(&msg, "%sunknown %s \"%s\"", table->prefix, table->noun, key);
	if (scope >= 0)
		appendStringInfo(&msg, " for a %s %s", table->scopes[scope], table->scope_noun);

	for (i = 0; i < table->noptions; i++)
		n += in_scope(&table->options[i], scope);
	initStringInfo(&list);
	appendStringInfo(&list, "%s ", table->listing);
	for (i = 0; i < table->noptions; i++)
	{
		if (!in_scope(&table->options[i], scope))
			continue;
		if (k > 0)
			appendStringInfoString(&list, k == n - 1 ? " and " : ", ");
		appendStringInfoString(&list, table->options[i].name);
		k++;
	}
	appendStringInfoChar(&list, '.');

	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("%s", msg.data),
			 table->hint ? errdetail("%s", list.data) : errhint("%s", list.data),
			 table->hint ? errhint("%s", table->hint) : 0));
}

static void
set_default(const SpoolOption *opt, void *result)
{
	switch (opt->type)
	{
		case SPOOL_OPT_INT:
		case SPOOL_OPT_CHOICE:
		case SPOOL_OPT_DURATION:
			store_int(MEMBER(opt, result), opt->size, opt->dflt);
			break;
		case SPOOL_OPT_STRING:
			if (opt->dflt_text)
				*(char **) MEMBER(opt, result) = pstrdup(opt->dflt_text);
			break;
		case SPOOL_OPT_OBJECT:
			if (opt->dflt_text)
				*(Jsonb **) MEMBER(opt, result) =
					DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
													   CStringGetDatum(opt->dflt_text)));
			break;
		case SPOOL_OPT_LIST:
		case SPOOL_OPT_CUSTOM:
			break;
	}
}

/* Integer members are bools (1 byte), int or enum (4), or int64 (8). */
static void
store_int(void *member, size_t size, int64 v)
{
	switch (size)
	{
		case sizeof(bool):
			*(bool *) member = (v != 0);
			break;
		case sizeof(int32):
			*(int32 *) member = (int32) v;
			break;
		case sizeof(int64):
			*(int64 *) member = v;
			break;
		default:
			elog(ERROR, "option member of %zu bytes", size);
	}
}

static int64
load_int(const void *member, size_t size)
{
	switch (size)
	{
		case sizeof(bool):
			return *(const bool *) member ? 1 : 0;
		case sizeof(int32):
			return *(const int32 *) member;
		case sizeof(int64):
			return *(const int64 *) member;
		default:
			elog(ERROR, "option member of %zu bytes", size);
	}
	return 0;					/* not reached */
}

/* Parse v by opt's type into its member of result. */
void
spool_option_value(const SpoolOptionTable *table, const SpoolOption *opt,
				   JsonbValue *v, void *result)
{
	void	   *member = MEMBER(opt, result);
	int64		us;

	switch (opt->type)
	{
		case SPOOL_OPT_INT:
			store_int(member, opt->size, spool_option_integer(table, opt, v, opt->lo, opt->hi));
			break;
		case SPOOL_OPT_STRING:
			*(char **) member = option_string(table, opt, v);
			break;
		case SPOOL_OPT_CHOICE:
			store_int(member, opt->size,
					  spool_option_choice(table, opt, NULL, v, opt->choices));
			break;
		case SPOOL_OPT_DURATION:
			us = spool_option_duration_us(table, opt, v);
			if (us < opt->lo * opt->unit || us > opt->hi * opt->unit)
				spool_option_bad(table, opt, NULL,
								 psprintf("must be between %s and %s",
										  spool_format_duration(opt->lo * opt->unit),
										  spool_format_duration(opt->hi * opt->unit)));
			store_int(member, opt->size, us / opt->unit);
			break;
		case SPOOL_OPT_LIST:
			option_list(table, opt, v, result);
			break;
		case SPOOL_OPT_OBJECT:
			(void) spool_option_object(table, opt, v);
			*(Jsonb **) member = JsonbValueToJsonb(v);
			break;
		case SPOOL_OPT_CUSTOM:
			elog(ERROR, "option \"%s\" has no parser", opt->name);
	}
}

/* A JSON number that is an integer in [lo, hi]; 2 and 2.0 are the same. */
int64
spool_option_integer(const SpoolOptionTable *table, const SpoolOption *opt,
					 JsonbValue *v, int64 lo, int64 hi)
{
	char	   *s;
	char	   *end;
	int64		n;

	if (v->type != jbvNumeric)
		spool_option_bad(table, opt, NULL, "must be a number");
	s = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	if ((end = strchr(s, '.')) != NULL && strspn(end + 1, "0") == strlen(end + 1))
		*end = '\0';
	errno = 0;
	n = strtoll(s, &end, 10);
	if (*end != '\0' || errno != 0 || n < lo || n > hi)
		spool_option_bad(table, opt, NULL,
						 psprintf("must be an integer from " INT64_FORMAT " to " INT64_FORMAT,
								  lo, hi));
	return n;
}

/* The index of v in choices (NULL-terminated); key names it, if not opt. */
int
spool_option_choice(const SpoolOptionTable *table, const SpoolOption *opt,
					const char *key, JsonbValue *v, const char *const *choices)
{
	StringInfoData allowed;
	int			i;

	if (v->type == jbvString)
		for (i = 0; choices[i]; i++)
			if (strlen(choices[i]) == v->val.string.len &&
				strncmp(choices[i], v->val.string.val, v->val.string.len) == 0)
				return i;
	initStringInfo(&allowed);
	appendStringInfoString(&allowed, "must be one of ");
	for (i = 0; choices[i]; i++)
		appendStringInfo(&allowed, "%s\"%s\"", i ? ", " : "", choices[i]);
	spool_option_bad(table, opt, key, allowed.data);
}

static char *
option_string(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v)
{
	if (v->type != jbvString || v->val.string.len == 0 ||
		(opt->hi > 0 && v->val.string.len > opt->hi))
	{
		if (opt->what)
			spool_option_bad(table, opt, NULL, psprintf("must be %s", opt->what));
		if (opt->hi > 0)
			spool_option_bad(table, opt, NULL,
							 psprintf("must be a non-empty string of at most " INT64_FORMAT " bytes",
									  opt->hi));
		spool_option_bad(table, opt, NULL, "must be a non-empty string");
	}
	return pnstrdup(v->val.string.val, v->val.string.len);
}

static void
option_list(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			void *result)
{
	char	  **items;
	int			n = 0;
	JsonbIterator *it;
	JsonbValue	e;
	JsonbIteratorToken tok;

	if (v->type == jbvNull)
		return;
	if (v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data) ||
		JsonContainerSize(v->val.binary.data) == 0)
		spool_option_bad(table, opt, NULL, psprintf("must be a non-empty array of %s", opt->what));
	items = palloc(sizeof(char *) * JsonContainerSize(v->val.binary.data));
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
	{
		if (tok != WJB_ELEM)
			continue;
		if (e.type != jbvString || e.val.string.len == 0)
			spool_option_bad(table, opt, NULL, psprintf("must contain %s (strings)", opt->what));
		items[n++] = pnstrdup(e.val.string.val, e.val.string.len);
	}
	*(char ***) MEMBER(opt, result) = items;
	*(int *) ((char *) result + opt->count_offset) = n;
}

/* v is a JSON object: its container. */
JsonbContainer *
spool_option_object(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v)
{
	if (v->type != jbvBinary || !JsonContainerIsObject(v->val.binary.data))
		spool_option_bad(table, opt, NULL, psprintf("must be an object of %s", opt->what));
	return v->val.binary.data;
}

/*
 * A duration in microseconds, unchecked but for a bare number: a whole
 * number of milliseconds from 0 (1 if opt's lower bound is above 0) to opt's
 * upper bound.  Months count 30 days.
 */
int64
spool_option_duration_us(const SpoolOptionTable *table, const SpoolOption *opt,
						 JsonbValue *v)
{
	JsonbValue	num;
	Interval   *iv;
	int128		us;

	if (bare_number(v, &num))
		return spool_option_integer(table, opt, &num, opt->lo > 0 ? 1 : 0,
									opt->hi * opt->unit / 1000) * 1000;
	if (v->type != jbvString)
		spool_option_bad(table, opt, NULL,
						 psprintf("must be an interval such as %s, or milliseconds",
								  opt->what ? opt->what : "'10 ms'"));
	iv = spool_option_interval(table, opt, NULL, v);
	us = (int128) iv->time + (int128) iv->day * USECS_PER_DAY +
		(int128) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;
	return (int64) Max(Min(us, PG_INT64_MAX), PG_INT64_MIN);
}

/*
 * v (a JSON string) as a PostgreSQL interval: '250ms', '5 s', '2 minutes',
 * '1h', 'P1D', '00:00:05' ...; key names it in the error, if not opt.
 */
Interval *
spool_option_interval(const SpoolOptionTable *table, const SpoolOption *opt,
					  const char *key, JsonbValue *v)
{
	char	   *s = pnstrdup(v->val.string.val, v->val.string.len);
	Interval   *volatile iv = NULL;
	MemoryContext cxt = CurrentMemoryContext;

	Assert(v->type == jbvString);
	PG_TRY();
	{
		iv = DatumGetIntervalP(DirectFunctionCall3(interval_in, CStringGetDatum(s),
												   ObjectIdGetDatum(InvalidOid),
												   Int32GetDatum(-1)));
	}
	PG_CATCH();
	{
		/* interval_in holds no resources; its error is replaced by ours. */
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	if (iv == NULL)
		spool_option_bad(table, opt, key,
						 psprintf("must be an interval such as '5 s' or '2 minutes', not \"%s\"", s));
	return iv;
}

/*
 * Is v a bare number: a JSON number, or a string holding only one (blanks
 * around it aside)?  Then num is that number.
 */
static bool
bare_number(JsonbValue *v, JsonbValue *num)
{
	char	   *s;
	char	   *end;

	if (v->type == jbvNumeric)
	{
		*num = *v;
		return true;
	}
	if (v->type != jbvString)
		return false;
	s = pnstrdup(v->val.string.val, v->val.string.len);
	while (*s == ' ')
		s++;
	for (end = s + strlen(s); end > s && end[-1] == ' '; end--)
		end[-1] = '\0';
	if (!spool_json_number_syntax(s))
		return false;
	num->type = jbvNumeric;
	num->val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
														   ObjectIdGetDatum(InvalidOid),
														   Int32GetDatum(-1)));
	return true;
}

/* Skip the digits at *p; false if there are none. */
static bool
skip_digits(const char **p)
{
	const char *start = *p;

	while (isdigit((unsigned char) **p))
		(*p)++;
	return *p > start;
}

/* s is a JSON number: -?digits[.digits][(e|E)[+-]digits], nothing else. */
bool
spool_json_number_syntax(const char *s)
{
	const char *p = s;

	if (*p == '-')
		p++;
	if (!skip_digits(&p))
		return false;
	if (*p == '.')
	{
		p++;
		if (!skip_digits(&p))
			return false;
	}
	if (*p == 'e' || *p == 'E')
	{
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!skip_digits(&p))
			return false;
	}
	return *p == '\0';
}

/*
 * A bad value: "<subject>"key" <requirement>", or "invalid value for <noun>
 * "key"" with the requirement as detail (see SpoolOptionTable).  key is the
 * name in the message when it is not opt's (a nested key, a cross-field
 * check without an opt).
 */
void
spool_option_bad(const SpoolOptionTable *table, const SpoolOption *opt,
				 const char *key, const char *requirement)
{
	const char *name = key ? key : opt->name;

	if (table->subject == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%sinvalid value for %s \"%s\"", table->prefix, table->noun, name),
				 errdetail("It %s.", requirement),
				 table->hint ? errhint("%s", table->hint) : 0));
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("%s%s\"%s\" %s", table->prefix, table->subject, name, requirement),
			 opt && opt->doc ? errdetail("%s", opt->doc) : 0,
			 table->hint ? errhint("%s", table->hint) : 0));
	pg_unreachable();
}

/* An error about the options as a whole (a missing option, two that clash). */
void
spool_option_error(const SpoolOptionTable *table, const char *msg, const char *hint)
{
	if (hint == NULL)
		hint = table->hint;
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("%s%s", table->prefix, msg),
			 hint ? errhint("%s", hint) : 0));
	pg_unreachable();
}

/* One option's value as JSON text; false to leave it out (NULL, no value). */
static bool
render_value(const SpoolOption *opt, const void *result, StringInfo buf)
{
	const void *member = (const char *) result + opt->offset;
	int64		n;
	int			i;

	switch (opt->type)
	{
		case SPOOL_OPT_INT:
			appendStringInfo(buf, INT64_FORMAT, load_int(member, opt->size));
			return true;
		case SPOOL_OPT_CHOICE:
			escape_json(buf, opt->choices[load_int(member, opt->size)]);
			return true;
		case SPOOL_OPT_DURATION:
			n = load_int(member, opt->size) * opt->unit;
			if (opt->flags & SPOOL_OPT_TEXT)
				escape_json(buf, spool_format_duration(n));
			else
				appendStringInfo(buf, INT64_FORMAT, n / 1000);
			return true;
		case SPOOL_OPT_STRING:
			if (*(char *const *) member == NULL)
				return false;
			escape_json(buf, *(char *const *) member);
			return true;
		case SPOOL_OPT_LIST:
			n = *(const int *) ((const char *) result + opt->count_offset);
			if (n == 0)
			{
				appendStringInfoString(buf, "null");
				return true;
			}
			appendStringInfoChar(buf, '[');
			for (i = 0; i < n; i++)
			{
				if (i > 0)
					appendStringInfoString(buf, ", ");
				escape_json(buf, (*(char **const *) member)[i]);
			}
			appendStringInfoChar(buf, ']');
			return true;
		case SPOOL_OPT_OBJECT:
			if (*(Jsonb *const *) member == NULL)
				return false;
			appendStringInfoString(buf, JsonbToCString(NULL, &(*(Jsonb *const *) member)->root,
													   VARSIZE(*(Jsonb *const *) member)));
			return true;
		case SPOOL_OPT_CUSTOM:
			return false;
	}
	return false;
}

/* "250 ms", "30 s", "1 min": for messages and stored durations. */
char *
spool_format_duration(int64 us)
{
	if (us % USECS_PER_MINUTE == 0 && us >= USECS_PER_MINUTE)
		return psprintf(INT64_FORMAT " min", us / USECS_PER_MINUTE);
	if (us % USECS_PER_SEC == 0 && us >= USECS_PER_SEC)
		return psprintf(INT64_FORMAT " s", us / USECS_PER_SEC);
	return psprintf(INT64_FORMAT " ms", us / 1000);
}
