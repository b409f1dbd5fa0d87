/*-------------------------------------------------------------------------
 *
 * consumer_load.c
 *	  The ingest worker's start: the source's definition (brokers, topics,
 *	  options, owner), its pending seeks and dead-letter replays, and where
 *	  each partition resumes (after what is durable or already staged).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "ingest/consumer.h"

#define REGISTER_WAIT_MS	60000	/* longest wait for workers of another count */

char		source_name[SPOOL_SOURCE_NAME_MAX + 1];
int			worker_index;		/* which of the source's workers: 0 .. workers - 1 */
SpoolSourceOptions *opts;
char	   *brokers;
List	   *topics;
bool		skip_gap;
Oid			source_owner;
char	   *default_group;		/* spool_ext.<database>.<source> */
List	   *resume_topic;		/* where partitions resume: stored or staged */
List	   *resume_part;
List	   *resume_next;
static bool pending_work;		/* seeks or replays to apply at start */
List	   *replay_ids;			/* dead letters to replay (as text) */
List	   *replay_topic;
List	   *replay_part;
List	   *replay_offset;
List	   *replay_key;
List	   *replay_payload;

static bool read_source(Datum *name);
static bytea *copy_bytea(HeapTuple tup, TupleDesc desc, int col);
static void read_pending_work(Datum *name);
static void read_resume_offsets(Datum *name);
static void register_worker(void);
static void unregister_worker(int code, Datum arg);

/*
 * The source's row: brokers, topics, options, owner.  False when it is gone
 * or disabled.  In load_source's transaction; kept in TopMemoryContext.
 */
static bool
read_source(Datum *name)
{
	HeapTuple	tup;
	TupleDesc	desc;
	ArrayType  *arr;
	Datum	   *elems;
	int			n;
	bool		isnull;
	MemoryContext old;

	if (SPI_execute_with_args("SELECT brokers, topics, options, enabled, skip_gap, owner::oid"
							  " FROM spool.sources WHERE name = $1",
							  1, (Oid[]) {TEXTOID}, name, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read source \"%s\"", source_name);
	if (SPI_processed != 1 ||
		!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4, &isnull)))
		return false;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	old = MemoryContextSwitchTo(TopMemoryContext);
	brokers = SPI_getvalue(tup, desc, 1);
	arr = DatumGetArrayTypeP(SPI_getbinval(tup, desc, 2, &isnull));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, NULL, &n);
	for (int j = 0; j < n; j++)
		topics = lappend(topics, TextDatumGetCString(elems[j]));
	opts = spool_parse_source_options(DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 3, &isnull)));
	skip_gap = DatumGetBool(SPI_getbinval(tup, desc, 5, &isnull));
	source_owner = DatumGetObjectId(SPI_getbinval(tup, desc, 6, &isnull));
	default_group = psprintf("spool_ext.%s.%s", get_database_name(MyDatabaseId), source_name);
	MemoryContextSwitchTo(old);
	return true;
}

/* A bytea column of an SPI row, copied into the current context; NULL for NULL. */
static bytea *
copy_bytea(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : DatumGetByteaPCopy(d);
}

/*
 * Pending seeks and replays of this source: whether there are any, and the
 * dead letters to replay, with their stored key and payload for a message
 * Kafka no longer has (kept in TopMemoryContext).
 */
static void
read_pending_work(Datum *name)
{
	MemoryContext old;
	uint64		i;

	if (SPI_execute_with_args("SELECT id, topic, kafka_partition, kafka_offset, key, payload FROM spool.dead_letters"
							  " WHERE source = $1 AND replay_requested_at IS NOT NULL"
							  "   AND replay_cursor IS NULL ORDER BY id",
							  1, (Oid[]) {TEXTOID}, name, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.dead_letters");
	old = MemoryContextSwitchTo(TopMemoryContext);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		if (!worker_takes(DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull))))
			continue;			/* another worker of this source replays it */
		replay_ids = lappend(replay_ids, SPI_getvalue(tup, desc, 1));
		replay_topic = lappend(replay_topic, SPI_getvalue(tup, desc, 2));
		replay_part = lappend(replay_part, SPI_getvalue(tup, desc, 3));
		replay_offset = lappend(replay_offset, SPI_getvalue(tup, desc, 4));
		replay_key = lappend(replay_key, copy_bytea(tup, desc, 5));
		replay_payload = lappend(replay_payload, copy_bytea(tup, desc, 6));
	}
	MemoryContextSwitchTo(old);
	pending_work = replay_ids != NIL;
	if (SPI_execute_with_args("SELECT kafka_partition FROM spool.source_seeks WHERE source = $1 AND state = 'pending'",
							  1, (Oid[]) {TEXTOID}, name, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.source_seeks");
	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		pending_work |= worker_takes(DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i],
																 SPI_tuptable->tupdesc, 1, &isnull)));
	}
}

/* Does this worker consume partition (of any of the source's topics)? */
bool
worker_takes(int32 partition)
{
	return spool_source_worker_of(opts, partition) == worker_index;
}

/*
 * The workers of a source split its partitions by their number and their
 * count (spool_source_worker_of), so a worker may run only beside workers
 * of the same count: after alter_source changed the count, a worker of the
 * old count could still read a partition a new one reads.  Each worker
 * registers in the source's shared slot; one of a new count waits (bounded)
 * until those of the old count have exited.  The bit goes at exit (also
 * on an error), once an open staging transaction is aborted; a crash
 * restart empties shared memory.
 */
static void
register_worker(void)
{
	uint32		me = (uint32) 1 << worker_index;
	int			waited_ms;

	if (stats == NULL)
	{
		if (opts->workers > 1)
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("source \"%s\" cannot run %d workers: no counter slot is free",
							source_name, opts->workers)));
		return;
	}
	for (waited_ms = 0;; waited_ms += 100)
	{
		bool		ok;

		LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
		ok = (stats->workers_running & ~me) == 0 || stats->workers_of == opts->workers;
		if (ok)
		{
			stats->workers_running |= me;
			stats->workers_of = opts->workers;
		}
		LWLockRelease(spool_ingest_shared->lock);
		if (ok)
			break;
		if (waited_ms == 0)
			pgstat_report_activity(STATE_RUNNING, "waiting for the workers of another count to exit");
		if (waited_ms >= REGISTER_WAIT_MS)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_IN_USE),
					 errmsg("workers of source \"%s\" with another worker count are still running",
							source_name)));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 100L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	/* After the exit's abort of an open staging transaction (before_shmem_exit). */
	on_shmem_exit(unregister_worker, (Datum) 0);
}

static void
unregister_worker(int code, Datum arg)
{
	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	if (strcmp(stats->name, source_name) == 0)	/* not freed by drop_source */
		stats->workers_running &= ~((uint32) 1 << worker_index);
	LWLockRelease(spool_ingest_shared->lock);
}

/*
 * Where each partition resumes: after whatever is durable or already staged
 * (staged rows of an earlier incarnation will be promoted; re-staging them
 * would duplicate them).  A staged 'stop' gap is not passed.
 */
static void
read_resume_offsets(Datum *name)
{
	MemoryContext old;
	uint64		i;
	bool		isnull;

	if (SPI_execute_with_args("SELECT topic, kafka_partition, max(n) FROM ("
							  "  SELECT topic, kafka_partition, next_offset AS n"
							  "    FROM spool.offsets WHERE source = $1"
							  "  UNION ALL"
							  "  SELECT topic, kafka_partition, max(coalesce(gap_to, kafka_offset)) + 1"
							  "    FROM spool.staging WHERE source = $1 AND NOT coalesce(gap_stop, false)"
							  "   GROUP BY topic, kafka_partition) x"
							  " GROUP BY topic, kafka_partition",
							  1, (Oid[]) {TEXTOID}, name, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read offsets of source \"%s\"", source_name);
	old = MemoryContextSwitchTo(TopMemoryContext);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		resume_topic = lappend(resume_topic, SPI_getvalue(tup, desc, 1));
		resume_part = lappend_int(resume_part, DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull)));
		resume_next = lappend(resume_next, psprintf(INT64_FORMAT,
													DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull))));
	}
	MemoryContextSwitchTo(old);
}

/*
 * Load: read the source's definition and where its partitions resume.
 * Returns false when the source is gone or disabled (the worker then exits
 * quietly).
 */
bool
load_source(void)
{
	Datum		name[1];
	bool		found;

	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	/* Used across several transactions: not in SPI's memory. */
	name[0] = CStringGetTextDatum(source_name);
	MemoryContextSwitchTo(old);
	spool_begin_txn("loading the source");

	/*
	 * One worker per source, ever: a second one (e.g. started by a restarted
	 * launcher while the first still runs) would stage offsets twice.  The
	 * session lock lives as long as this process.
	 */
	if (!spool_internal_lock(SPOOL_LOCK_INGEST, source_name, (uint32) worker_index))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("another ingest worker is running for source \"%s\"", source_name)));
	found = read_source(name);
	if (found)
		read_pending_work(name);
	spool_end_txn();
	if (!found)
		return false;
	register_worker();

	/*
	 * Seeks and replays are applied once everything an earlier worker staged
	 * for this source is promoted: from then on, nobody but us stages for it
	 * (we hold its lock), so what spool.offsets says is all there is.
	 */
	if (pending_work)
		wait_for_staging_drained(name);

	spool_begin_txn("loading the source's offsets");
	read_resume_offsets(name);
	spool_end_txn();
	return true;
}
