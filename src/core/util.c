/*-------------------------------------------------------------------------
 *
 * util.c
 *	  Argument checks shared by the SQL entry points (options objects are
 *	  options.c's), and the cache of prepared SPI plans used on hot paths.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "core/core.h"

static char *arg_text(FunctionCallInfo fcinfo, int argno, const char *what,
					  int maxlen);
static void arg_not_null(FunctionCallInfo fcinfo, int argno, const char *what);

/*
 * Return argument argno as a C string, raising SP001 when it is NULL, empty
 * or longer than SPOOL_NAME_MAX bytes.
 */
char *
spool_arg_name(FunctionCallInfo fcinfo, int argno, const char *what)
{
	return arg_text(fcinfo, argno, what, SPOOL_NAME_MAX);
}

/*
 * A signer name: short enough that its lease name 'signer:' || signer fits
 * in SPOOL_NAME_MAX bytes.
 */
char *
spool_arg_signer(FunctionCallInfo fcinfo, int argno)
{
	return arg_text(fcinfo, argno, "signer", SPOOL_SIGNER_NAME_MAX);
}

static char *
arg_text(FunctionCallInfo fcinfo, int argno, const char *what, int maxlen)
{
	text	   *t;
	int			len;

	arg_not_null(fcinfo, argno, what);
	t = PG_GETARG_TEXT_PP(argno);
	len = VARSIZE_ANY_EXHDR(t);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s must not be empty", what)));
	if (len > maxlen)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s is too long", what),
				 errdetail("It has %d bytes; at most %d are allowed.", len, maxlen)));
	return text_to_cstring(t);
}

/* Raise SP001 when argument argno is NULL. */
static void
arg_not_null(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s must not be null", what)));
}

/*
 * A jsonb argument (options, a payload), raising SP001 with message and hint
 * when it is NULL.
 */
Jsonb *
spool_arg_jsonb(FunctionCallInfo fcinfo, int argno, const char *message,
				const char *hint)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s", message),
				 errhint("%s", hint)));
	return PG_GETARG_JSONB_P(argno);
}

/* Like spool_arg_name, but NULL is allowed and returned as NULL. */
char *
spool_arg_name_opt(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		return NULL;
	return spool_arg_name(fcinfo, argno, what);
}

/* Return a bigint argument, raising SP001 when NULL or (optionally) negative. */
int64
spool_arg_int64(FunctionCallInfo fcinfo, int argno, const char *what,
				bool nonnegative)
{
	int64		v;

	arg_not_null(fcinfo, argno, what);
	v = PG_GETARG_INT64(argno);
	if (nonnegative && v < 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s must not be negative", what),
				 errdetail("The value given was " INT64_FORMAT ".", v)));
	return v;
}

/*
 * Convert a lease TTL to microseconds, rejecting NULL, non-positive and
 * absurdly large values (over spool.lease_max_ttl).
 */
int64
spool_arg_ttl(FunctionCallInfo fcinfo, int argno)
{
	Interval   *ttl;
	int128		us;

	arg_not_null(fcinfo, argno, "ttl");
	ttl = PG_GETARG_INTERVAL_P(argno);
	us = (int128) ttl->time +
		(int128) ttl->day * USECS_PER_DAY +
		(int128) ttl->month * DAYS_PER_MONTH * USECS_PER_DAY;
	if (us <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("ttl must be positive"),
				 errhint("Pass an interval such as '10 s'.")));
	if (us > (int128) spool_lease_max_ttl_s * USECS_PER_SEC)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("ttl is too large"),
				 errdetail("The longest lease allowed is %d seconds.", spool_lease_max_ttl_s),
				 errhint("Renew a short lease periodically instead, or raise spool.lease_max_ttl.")));
	return (int64) us;
}

/* A TTL in microseconds as an interval Datum, for SPI parameters. */
Datum
spool_ttl_datum(int64 ttl_us)
{
	Interval   *iv = palloc0(sizeof(Interval));

	iv->time = ttl_us;
	return IntervalPGetDatum(iv);
}

/* Prepare sql with cursor_options into *cache once per backend and keep it. */
static SPIPlanPtr
keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes, int cursor_options)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, cursor_options);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
}

/*
 * Prepare sql once per backend and keep the plan.  Plans reference tables by
 * schema-qualified name, so they survive DROP/CREATE EXTENSION by replanning.
 */
SPIPlanPtr
spool_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	return keep_plan(cache, sql, nargs, argtypes, 0);
}

/*
 * spool_plan that always runs a generic plan: for statements written so
 * that their plan does not depend on the parameters (probes of a key per
 * element, updates by ctid), where a custom plan would be planned again at
 * every call and would trust statistics that may not know the values yet.
 */
SPIPlanPtr
spool_plan_generic(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	return keep_plan(cache, sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);
}

/* Run a kept plan; raise on SPI failure; return SPI_processed. */
uint64
spool_exec(SPIPlanPtr plan, Datum *values, const char *nulls, bool read_only,
		   int expected)
{
	int			rc = SPI_execute_plan(plan, values, nulls, read_only, 0);

	if (rc != expected)
		elog(ERROR, "SPI_execute_plan returned %s, expected %s",
			 SPI_result_code_string(rc), SPI_result_code_string(expected));
	return SPI_processed;
}

/*
 * Set parameter i of an SPI call to s as text, or to NULL when s is NULL
 * (nulls as SPI_execute_plan takes them).
 */
void
spool_text_param(Datum *values, char *nulls, int i, const char *s)
{
	if (s)
		values[i] = CStringGetTextDatum(s);
	else
		nulls[i] = 'n';
}

/*
 * Testing hook (spool.test_worker_pause): a worker holds its fenced,
 * uncommitted unit of work open for a while, waiting on its latch.
 */
void
spool_test_pause(void)
{
	TimestampTz until;

	if (spool_test_worker_pause_ms <= 0)
		return;
	until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), spool_test_worker_pause_ms);
	for (;;)
	{
		long		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until);

		if (ms <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * The next member of a JSON object iterated with it (JsonbIteratorInit on the
 * object's container): its key, palloc'd, and its value, where a nested
 * container stays jbvBinary.  False after the last member.
 */
bool
spool_object_next(JsonbIterator **it, char **key, JsonbValue *value)
{
	JsonbValue	k;
	JsonbIteratorToken tok;

	while ((tok = JsonbIteratorNext(it, &k, true)) != WJB_DONE)
	{
		if (tok != WJB_KEY)
			continue;			/* WJB_BEGIN_OBJECT, WJB_END_OBJECT */
		*key = pnstrdup(k.val.string.val, k.val.string.len);
		tok = JsonbIteratorNext(it, value, true);
		Assert(tok == WJB_VALUE);
		return true;
	}
	return false;
}

/* Is s one of the strings of a NULL-terminated list? */
bool
spool_str_in_list(const char *s, const char *const *list)
{
	for (; *list; list++)
		if (strcmp(s, *list) == 0)
			return true;
	return false;
}

/*
 * The role user code (a processor handler, a target function) runs as:
 * run_as, or caller.  Never a superuser unless a superuser names one; others
 * may only name a role they have the privileges of.
 */
Oid
spool_check_run_as(Oid caller, const char *run_as, const char *object, const char *code)
{
	Oid			role = run_as ? get_role_oid(run_as, true) : caller;

	if (!OidIsValid(role))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("role \"%s\" does not exist", run_as)));
	if (run_as && !superuser_arg(caller) && !has_privs_of_role(caller, role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to run a %s as role \"%s\"", object, run_as),
				 errdetail("Only members of a role may name it in run_as.")));
	if (run_as == NULL && superuser_arg(role))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("a %s would run as superuser \"%s\"", code,
						GetUserNameFromId(role, false)),
				 errhint("Create the %s as a member of spool_admin that is not a superuser, or name an unprivileged role in options.run_as.", object)));
	return role;
}

/*
 * One worker transaction with SPI and a snapshot (not nested).  Anything
 * allocated between spool_begin_txn and spool_end_txn lives in SPI's memory
 * and is gone after spool_end_txn; results that must outlive it are copied
 * out first.  Each end flushes the worker's table statistics (at most once a
 * second: pgstat_report_stat is rate-limited), which a client backend does
 * when it goes idle and a background worker must do itself: without it
 * pg_stat_user_tables and autovacuum never see the workers' writes.
 */
static MemoryContext txn_caller_cxt;

void
spool_begin_txn(const char *activity)
{
	spool_start_txn(DefaultXactIsoLevel);
	spool_snapshot_txn(activity);
}

/*
 * spool_begin_txn in two halves, for a transaction that must do something
 * (take a lock, say) before its snapshot: start it at an isolation level,
 * then take the snapshot and connect to SPI.
 */
void
spool_start_txn(int isolation)
{
	txn_caller_cxt = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	XactIsoLevel = isolation;
	spool_worker_check_extension();
}

void
spool_snapshot_txn(const char *activity)
{
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

void
spool_end_txn(void)
{
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(txn_caller_cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

void
spool_abort_txn(void)
{
	PopActiveSnapshot();
	SPI_finish();
	AbortCurrentTransaction();
	MemoryContextSwitchTo(txn_caller_cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * A name of a source, processor or target: letters, digits, '_', '.', '-', at most
 * SPOOL_PROC_NAME_MAX bytes (it is part of worker names).
 */
void
spool_check_object_name(const char *name, const char *what)
{
	if (strlen(name) > SPOOL_PROC_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s name \"%s\" is too long", what, name),
				 errdetail("At most %d bytes are allowed.", SPOOL_PROC_NAME_MAX)));
	if (!spool_name_chars_ok(name))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("invalid %s name \"%s\"", what, name),
				 errdetail("%c%s names use letters, digits, '_', '.' and '-' only.",
						   pg_toupper((unsigned char) what[0]), what + 1)));
}

/* Does s use only letters, digits, '_', '.' and '-' (as Kafka topics do)? */
bool
spool_name_chars_ok(const char *s)
{
	const char *p;

	for (p = s; *p; p++)
		if (!(isalnum((unsigned char) *p) || *p == '_' || *p == '.' || *p == '-'))
			return false;
	return true;
}
