/*-------------------------------------------------------------------------
 *
 * util.c
 *	  Argument checks shared by the SQL entry points, and the cache of
 *	  prepared SPI plans used on hot paths.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "spool.h"

static char *arg_text(FunctionCallInfo fcinfo, int argno, const char *what,
					  int maxlen);

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

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s must not be null", what)));
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

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s must not be null", what)));
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

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("ttl must not be null")));
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

/*
 * Prepare sql once per backend and keep the plan.  Plans reference tables by
 * schema-qualified name, so they survive DROP/CREATE EXTENSION by replanning.
 */
SPIPlanPtr
spool_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
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
 * Parse an interval given as text in an option, raising SP001 (not the
 * input function's own error) when it is not one.
 */
Interval *
spool_parse_interval(const char *s, const char *what)
{
	Interval   *iv = NULL;
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		iv = DatumGetIntervalP(DirectFunctionCall3(interval_in, CStringGetDatum(s),
												   ObjectIdGetDatum(InvalidOid),
												   Int32GetDatum(-1)));
	}
	PG_CATCH();
	{
		/* interval_in holds no resources; replace its error with ours. */
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s must be an interval such as '5 s' or '2 minutes', not \"%s\"", what, s)));
	}
	PG_END_TRY();
	return iv;
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
