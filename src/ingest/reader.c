/*-------------------------------------------------------------------------
 *
 * reader.c
 *	  spool.read: entries after a cursor, in cursor order, optionally waiting
 *	  (on a condition variable the promoter broadcasts) for the first one.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"

PG_FUNCTION_INFO_V1(spool_read);

#define READ_MAX_ENTRIES 100000
#define READ_MAX_WAIT_MS (3600 * 1000)

static SPIPlanPtr plan_read = NULL;

/* Run the read query into the SRF's tuplestore; returns rows read. */
static uint64
read_into(ReturnSetInfo *rsinfo, int64 after, int32 max)
{
	Oid			t[2] = {INT8OID, INT4OID};
	Datum		v[2];
	uint64		i;
	uint64		n;
	SpoolCaller caller;

	spool_enter(&caller);
	SPI_connect();
	spool_plan(&plan_read,
			   "SELECT * FROM spool.entries WHERE cursor > $1 ORDER BY cursor LIMIT $2",
			   2, t);
	v[0] = Int64GetDatum(after);
	v[1] = Int32GetDatum(max);
	/* Not read-only: a fresh snapshot, so a read after a wait sees new entries. */
	n = spool_exec(plan_read, v, NULL, false, SPI_OK_SELECT);
	for (i = 0; i < n; i++)
		tuplestore_puttuple(rsinfo->setResult, SPI_tuptable->vals[i]);
	SPI_finish();
	spool_leave(&caller);
	return n;
}

/*
 * SQL: spool.read(after_cursor, max_entries, wait) RETURNS SETOF spool.entries
 */
Datum
spool_read(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int64		after = spool_arg_int64(fcinfo, 0, "after_cursor", true);
	int32		max;
	int64		wait_ms = 0;
	TimestampTz deadline;

	spool_require_shmem();
	if (PG_ARGISNULL(1) || PG_GETARG_INT32(1) < 1 || PG_GETARG_INT32(1) > READ_MAX_ENTRIES)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("max_entries must be between 1 and %d", READ_MAX_ENTRIES)));
	max = PG_GETARG_INT32(1);
	if (!PG_ARGISNULL(2))
	{
		Interval   *iv = PG_GETARG_INTERVAL_P(2);

		wait_ms = (iv->time + (int64) iv->day * USECS_PER_DAY +
				   (int64) iv->month * DAYS_PER_MONTH * USECS_PER_DAY) / 1000;
		if (wait_ms < 0 || wait_ms > READ_MAX_WAIT_MS)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("wait must be between 0 and 1 hour")));
	}

	InitMaterializedSRF(fcinfo, 0);
	if (read_into(rsinfo, after, max) > 0 || wait_ms == 0)
		return (Datum) 0;

	/* Nothing yet: sleep until the promoter publishes a cursor past ours. */
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
	ConditionVariablePrepareToSleep(&spool_ingest_shared->spool_cv);
	for (;;)
	{
		long		remaining;

		if (pg_atomic_read_u64(&spool_ingest_shared->published_cursor) > (uint64) after)
			break;
		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (remaining <= 0)
			break;
		(void) ConditionVariableTimedSleep(&spool_ingest_shared->spool_cv, Min(remaining, 1000),
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
	(void) read_into(rsinfo, after, max);
	return (Datum) 0;
}

/*
 * The consumer registry.  A consumer's committed cursor only moves forward;
 * retention keeps every segment some consumer has not passed.  A consumer
 * belongs to the role that registered it: only its members (and
 * superusers) move or drop it.  Consumers named 'processor:...' belong to
 * processors and are changed only through them.
 */
PG_FUNCTION_INFO_V1(spool_register_consumer);
PG_FUNCTION_INFO_V1(spool_commit_consumer);
PG_FUNCTION_INFO_V1(spool_drop_consumer);

#define PROCESSOR_CONSUMER_PREFIX "processor:"

static void
check_consumer_name(const char *name)
{
	if (strncmp(name, PROCESSOR_CONSUMER_PREFIX, strlen(PROCESSOR_CONSUMER_PREFIX)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("consumer \"%s\" belongs to a processor", name),
				 errhint("Consumers named \"processor:...\" are kept by their processors; use spool.drop_processor.")));
}

/*
 * Lock consumer name's row for role: -1 if there is none, else its committed
 * cursor; 42501 if role may not change it.  SPI is connected.
 */
static int64
consumer_lock(const char *name, Oid role)
{
	bool		isnull;

	if (SPI_execute_with_args("SELECT committed_cursor, owner FROM spool.consumers"
							  " WHERE name = $1 FOR UPDATE",
							  1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(name)},
							  NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.consumers");
	if (SPI_processed == 0)
		return -1;
	spool_check_owner(role,
					  DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2,
													 &isnull)),
					  "consumer", name);
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Run sql ($1 = name, $2 = cursor or NULL, $3 = role) for role after the
 * checks above; return column 1 of its row, or -1 if none.
 */
static int64
consumer_exec(const char *sql, const char *name, bool has_cursor, int64 cursor)
{
	Oid			t[3] = {TEXTOID, INT8OID, OIDOID};
	Datum		v[3];
	char		nulls[3] = {' ', has_cursor ? ' ' : 'n', ' '};
	bool		isnull;
	int64		result = -1;
	SpoolCaller caller;

	check_consumer_name(name);
	spool_enter(&caller);
	SPI_connect();
	(void) consumer_lock(name, caller.role);
	v[0] = CStringGetTextDatum(name);
	v[1] = Int64GetDatum(cursor);
	v[2] = ObjectIdGetDatum(caller.role);
	if (SPI_execute_with_args(sql, 3, t, v, nulls, false, 0) < 0)
		elog(ERROR, "consumer query failed: %s", sql);
	if (SPI_processed > 0)
		result = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	spool_leave(&caller);
	return result;
}

/* SQL: spool.register_consumer(name, start_cursor) RETURNS bigint */
Datum
spool_register_consumer(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	bool		has = !PG_ARGISNULL(1);
	int64		start = has ? spool_arg_int64(fcinfo, 1, "start_cursor", true) : 0;

	PG_RETURN_INT64(consumer_exec("INSERT INTO spool.consumers (name, committed_cursor, owner)"
								  " VALUES ($1, coalesce($2, (SELECT next_cursor - 1"
								  "   FROM spool.spool_state WHERE id = 1)), $3)"
								  " ON CONFLICT (name) DO UPDATE SET updated_at = now()"
								  " RETURNING committed_cursor",
								  name, has, start));
}

/* SQL: spool.commit_consumer(name, cursor) RETURNS bigint */
Datum
spool_commit_consumer(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	int64		cursor = spool_arg_int64(fcinfo, 1, "cursor", true);
	int64		committed;

	committed = consumer_exec("UPDATE spool.consumers"
							  " SET committed_cursor = greatest(committed_cursor, $2), updated_at = now(),"
							  "     moved_at = CASE WHEN $2 > committed_cursor THEN now() ELSE moved_at END"
							  " WHERE name = $1 RETURNING committed_cursor",
							  name, true, cursor);
	if (committed < 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("consumer \"%s\" does not exist", name),
				 errhint("Register it with spool.register_consumer first.")));
	PG_RETURN_INT64(committed);
}

/* SQL: spool.drop_consumer(name) RETURNS boolean */
Datum
spool_drop_consumer(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");

	PG_RETURN_BOOL(consumer_exec("DELETE FROM spool.consumers WHERE name = $1"
								 " RETURNING 1",
								 name, false, 0) > 0);
}
