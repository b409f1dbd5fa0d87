/*-------------------------------------------------------------------------
 *
 * ingest.c
 *	  The ingest worker of one source: consumes its Kafka partitions with
 *	  librdkafka and writes each batch into the UNLOGGED staging table with a
 *	  heap multi-insert.  The promoter makes staged rows durable and moves the
 *	  stored offsets in the same transaction (promoter.c).
 *
 * The worker assigns partitions itself (no consumer-group rebalancing) at the
 * offsets stored in spool.offsets, so where to resume is decided by
 * PostgreSQL only (I-3).  It waits on its latch and on a pipe that librdkafka
 * writes to when the consumer queue becomes non-empty; it never blocks inside
 * librdkafka without a timeout.  Messages that cannot be stored become
 * dead-letter rows and retention holes become gap rows, both through staging,
 * so they are recorded exactly once as well (I-4).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/sequence.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"
#include "ingest/json_check.h"
#include "kafka/kafka.h"

PGDLLEXPORT void spool_ingest_main(Datum main_arg);

#define STATUS_INTERVAL_MS	1000
#define COMMIT_INTERVAL_MS	5000
#define ERROR_QUIET_MS		35000	/* no error for this long: state back to running;
									 * longer than librdkafka's 30 s suppression of a
									 * repeated identical error, so an outage stays
									 * visible */
#define KAFKA_CALL_TIMEOUT_MS 5000
#define BATCH_MAX_BYTES		(32 * 1024 * 1024)	/* message bytes held per batch;
												 * a single larger message still
												 * makes a batch of one */
#define STAGING_NATTS		16
#define REPLAY_FETCH_MS		10000	/* longest wait for one replayed message */
#define DISCOVERY_DEFAULT_MS 300000 /* librdkafka's topic.metadata.refresh.interval.ms */
#define STAGING_SLOTS		1000	/* rows per heap multi-insert */

/* One assigned partition. */
typedef struct PartState
{
	char	   *topic;
	int32		partition;
	int64		position;		/* next offset expected; -1 unknown */
	int64		high;			/* high watermark, -1 unknown */
	uint64		count;			/* messages since the last status */
	TimestampTz error_at;		/* in the error state since; 0: not */
	bool		error_shown;	/* a status refresh has published the error */
} PartState;

/* One staged row, as built from a message. */
typedef struct Staged
{
	int			part;
	int64		offset;
	char		kind;			/* 'm' message, 'd' dead letter, 'g' gap */
	bytea	   *key;
	char	   *json;			/* json source: text to convert to jsonb */
	Datum		value;
	bool		has_value;
	bytea	   *payload;
	Jsonb	   *headers;
	TimestampTz ts;
	bool		has_ts;
	char	   *error;
	int64		gap_to;
	bool		gap_stop;
	int64		dead_letter_id; /* a replay of this dead letter; 0: none */
} Staged;

/* The source, as loaded at start. */
static char source_name[SPOOL_SOURCE_NAME_MAX + 1];
static SpoolSourceOptions *opts;
static char *brokers;
static List *topics;
static bool skip_gap;
static Oid	source_owner;
static char *default_group;		/* spool_ext.<database>.<source> */
static List *resume_topic;		/* where partitions resume: stored or staged */
static List *resume_part;
static List *resume_next;
static bool pending_work;		/* seeks or replays to apply at start */
static List *replay_ids;		/* dead letters to replay (as text) */
static List *replay_topic;
static List *replay_part;
static List *replay_offset;

/* The consumer */
static rd_kafka_t *rk;
static PartState *parts;
static int	nparts;
static int	parts_cap;
static int	discovery_ms;		/* how often to look for new partitions; <= 0 never */
static TimestampTz next_discovery = 0;
static int	wake_pipe[2] = {-1, -1};

/* The batch */
static Staged *batch;
static int	nbatch;
static int	batch_cap;				/* grows up to batch_size + a few gap rows */
static Size batch_bytes;			/* message bytes held in batch */
static bool stop_after_batch = false;
static TimestampTz batch_first;		/* when the batch's first message came */
static SpoolBatchEnd batch_end;		/* what ended the batch */
static SpoolSourceStats *stats;		/* this source's counters, or NULL */
static MemoryContext batch_cxt;
static TupleTableSlot **slots;

/* Status */
static char *last_error = NULL;
static TimestampTz last_error_at = 0;
static const char *state = "starting";
static uint64 errors = 0;			/* since the server started (from stats) */
static TimestampTz last_status = 0;
static TimestampTz last_commit = 0;

static SPIPlanPtr plan_source_runtime;
static SPIPlanPtr plan_partition_runtime;
static SPIPlanPtr plan_durable_offsets;

static void ingest_attach(void);
static void read_pending_work(Datum *name);
static bool load_source(void);
static void kafka_open(void);
static void kafka_assign(void);
static bool discover_and_assign(void);
static void gather_batch(void);
static bool wait_for_messages(long timeout);
static void handle_message(rd_kafka_message_t *rkm);
static void handle_gap(const char *topic, int32 partition);
static void stage_batch(void);
static void convert_json_values(void);
static void refresh_status(bool force);
static void note_batch(int n, TimestampTz t_start);
static void set_error(const char *fmt,...) pg_attribute_printf(1, 2);
static void set_part_error(int part, const char *fmt,...) pg_attribute_printf(2, 3);
static void note_error(int part, const char *msg);
static void drain_pipe(void);
static int	find_part(const char *topic, int32 partition);
static Staged *new_staged(int part, int64 offset, char kind);
static void ingest_stop(void) pg_attribute_noreturn();
static void ingest_failed(void) pg_attribute_noreturn();
static void wait_until_promoted_stop(void);
static void reassign_all(void);
static void fill_staged(Staged *s, rd_kafka_message_t *rkm);
static void apply_pending_seeks(Datum *name);
static void wait_for_staging_drained(Datum *name);
static void replay_dead_letters(void);
static void discover_new_partitions(void);
static void record_failed_replays(void);

/*
 * Errors librdkafka reports on its own threads (a broker down, a failed
 * connection) are copied here under a mutex and taken over by the main
 * loop: no PostgreSQL function may run on those threads.
 */
static pthread_mutex_t kafka_error_mutex = PTHREAD_MUTEX_INITIALIZER;
static char kafka_error[512];
static bool kafka_error_pending = false;

static void
kafka_error_cb(rd_kafka_t *handle, int err, const char *reason, void *opaque)
{
	pthread_mutex_lock(&kafka_error_mutex);
	snprintf(kafka_error, sizeof(kafka_error), "%s: %s",
			 rd_kafka_err2name((rd_kafka_resp_err_t) err), reason);
	kafka_error_pending = true;
	pthread_mutex_unlock(&kafka_error_mutex);
}

/* In the main loop: record an error librdkafka reported since the last call. */
static void
take_kafka_error(void)
{
	char		copy[512];
	bool		pending;

	pthread_mutex_lock(&kafka_error_mutex);
	pending = kafka_error_pending;
	if (pending)
		strlcpy(copy, kafka_error, sizeof(copy));
	kafka_error_pending = false;
	pthread_mutex_unlock(&kafka_error_mutex);
	if (pending)
		set_error("%s", copy);
}

/*
 * Record an error of the source: every assigned partition is in the error
 * state (see note_error).
 */
static void
set_error(const char *fmt,...)
{
	va_list		ap;
	char		buf[1024];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	note_error(-1, buf);
}

/* Record an error of one partition (-1: of the source). */
static void
set_part_error(int part, const char *fmt,...)
{
	va_list		ap;
	char		buf[1024];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	note_error(part, buf);
}

/*
 * The state rule (docs/sources.md): an error puts its partition (an error
 * not tied to one, such as a broker connection failure, every partition)
 * in the error state.  The state ends when that partition itself delivers
 * a message after a status refresh has published the error, or when
 * ERROR_QUIET_MS pass without a new error.  last_error, last_error_at and
 * the errors counter (which only grows) record every error, however brief.
 */
static void
note_error(int part, const char *msg)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	TimestampTz now = GetCurrentTimestamp();
	int			i;

	if (last_error)
		pfree(last_error);
	last_error = pstrdup(msg);
	last_error_at = now;
	state = "error";
	MemoryContextSwitchTo(old);
	for (i = 0; i < nparts; i++)
	{
		if (part >= 0 && i != part)
			continue;
		parts[i].error_at = now;
		parts[i].error_shown = false;
	}
	errors++;
	if (stats)
	{
		LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
		stats->errors = errors;
		LWLockRelease(spool_ingest_shared->lock);
	}
}

static void
drain_pipe(void)
{
	char		buf[256];

	while (read(wake_pipe[0], buf, sizeof(buf)) > 0)
		;
}

static int
find_part(const char *topic, int32 partition)
{
	static int	last = 0;
	int			i;

	if (last < nparts && parts[last].partition == partition &&
		strcmp(parts[last].topic, topic) == 0)
		return last;
	for (i = 0; i < nparts; i++)
		if (parts[i].partition == partition && strcmp(parts[i].topic, topic) == 0)
			return last = i;
	return -1;
}

static Staged *
new_staged(int part, int64 offset, char kind)
{
	Staged	   *s;

	/* Grown on demand: a batch_size of a million is not 100 MB up front. */
	if (nbatch == batch_cap)
	{
		batch_cap *= 2;
		batch = repalloc(batch, sizeof(Staged) * batch_cap);
	}
	s = &batch[nbatch++];

	memset(s, 0, sizeof(Staged));
	s->part = part;
	s->offset = offset;
	s->kind = kind;
	return s;
}

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

/*
 * Pending seeks and replays of this source: whether there are any, and the
 * dead letters to replay (kept in TopMemoryContext).
 */
static void
read_pending_work(Datum *name)
{
	MemoryContext old;
	uint64		i;

	if (SPI_execute_with_args("SELECT id, topic, kafka_partition, kafka_offset FROM spool.dead_letters"
							  " WHERE source = $1 AND replay_requested_at IS NOT NULL"
							  "   AND replay_cursor IS NULL ORDER BY id",
							  1, (Oid[]) {TEXTOID}, name, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.dead_letters");
	old = MemoryContextSwitchTo(TopMemoryContext);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		replay_ids = lappend(replay_ids, SPI_getvalue(tup, desc, 1));
		replay_topic = lappend(replay_topic, SPI_getvalue(tup, desc, 2));
		replay_part = lappend(replay_part, SPI_getvalue(tup, desc, 3));
		replay_offset = lappend(replay_offset, SPI_getvalue(tup, desc, 4));
	}
	MemoryContextSwitchTo(old);
	pending_work = SPI_processed > 0;
	if (SPI_execute_with_args("SELECT 1 FROM spool.source_seeks WHERE source = $1 AND state = 'pending'",
							  1, (Oid[]) {TEXTOID}, name, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.source_seeks");
	pending_work |= SPI_processed > 0;
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
static bool
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
	if (!spool_internal_lock(SPOOL_LOCK_INGEST, source_name, 0))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("another ingest worker is running for source \"%s\"", source_name)));
	found = read_source(name);
	if (found)
		read_pending_work(name);
	spool_end_txn();
	if (!found)
		return false;

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

/*
 * Wait (polling, no transaction open while waiting) until staging holds no
 * row of this source, then apply the pending seeks in the same transaction.
 * Locking both staging tables before the snapshot waits out a promotion
 * in flight, so the snapshot sees its offsets if it moved our rows.
 */
static void
wait_for_staging_drained(Datum *name)
{
	for (;;)
	{
		bool		staged;
		bool		isnull;

		spool_start_txn(XACT_READ_COMMITTED);
		(void) RangeVarGetRelid(makeRangeVar("spool", "staging_0", -1), AccessShareLock, false);
		(void) RangeVarGetRelid(makeRangeVar("spool", "staging_1", -1), AccessShareLock, false);
		spool_snapshot_txn("waiting for staged rows to be promoted");
		if (SPI_execute_with_args("SELECT EXISTS (SELECT 1 FROM spool.staging WHERE source = $1)",
								  1, (Oid[]) {TEXTOID}, name, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read spool.staging");
		staged = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (!staged)
			apply_pending_seeks(name);
		spool_end_txn();
		if (!staged)
			return;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 50L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		spool_exit_if_orphaned();
	}
}

/*
 * Apply the pending seeks of this source, oldest first, each against the
 * durable offset as it is now.  A forward seek records the skipped offsets
 * as a gap (action 'seek'), so that every offset is still an entry, a dead
 * letter or a gap (I-1).  A seek that would go back is applied only with
 * allow_rewind; without it, the partition moved past the target since the
 * seek was asked for, and the seek is 'overtaken' (nothing changes).
 */
static void
apply_pending_seeks(Datum *name)
{
	SPIPlanPtr	plan;
	uint64		i;

	if (SPI_execute_with_args("SELECT k.id, k.topic, k.kafka_partition, k.to_offset, k.allow_rewind,"
							  "       k.requested_by::text"
							  " FROM spool.source_seeks k WHERE k.source = $1 AND k.state = 'pending'"
							  " ORDER BY k.id",
							  1, (Oid[]) {TEXTOID}, name, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.source_seeks");
	plan = SPI_prepare("WITH o AS (SELECT next_offset FROM spool.offsets"
					   "            WHERE source = $1 AND topic = $2 AND kafka_partition = $3 FOR UPDATE),"
					   " d AS (SELECT (SELECT next_offset FROM o) AS from_offset),"
					   " x AS (SELECT from_offset,"
					   "         CASE WHEN from_offset IS NULL OR $4 > from_offset THEN 'forward'"
					   "              WHEN $4 < from_offset THEN 'rewind' ELSE 'none' END AS direction,"
					   "         (from_offset IS NULL OR $4 >= from_offset OR $5) AS apply FROM d),"
					   " off AS (INSERT INTO spool.offsets AS f (source, topic, kafka_partition, next_offset, updated_at)"
					   "         SELECT $1, $2, $3, $4, clock_timestamp() FROM x WHERE apply"
					   "         ON CONFLICT (source, topic, kafka_partition) DO UPDATE"
					   "         SET next_offset = EXCLUDED.next_offset, updated_at = EXCLUDED.updated_at),"
					   " gap AS (INSERT INTO spool.gaps (source, topic, kafka_partition, from_offset, to_offset, action)"
					   "         SELECT $1, $2, $3, from_offset, $4 - 1, 'seek' FROM x"
					   "          WHERE apply AND direction = 'forward' AND from_offset IS NOT NULL)"
					   " UPDATE spool.source_seeks k SET from_offset = x.from_offset, direction = x.direction,"
					   "        state = CASE WHEN x.apply THEN 'applied' ELSE 'overtaken' END,"
					   "        applied_at = clock_timestamp()"
					   "   FROM x WHERE k.id = $6"
					   " RETURNING k.state, k.direction, k.from_offset",
					   6, (Oid[]) {TEXTOID, TEXTOID, INT4OID, INT8OID, BOOLOID, INT8OID});
	if (plan == NULL)
		elog(ERROR, "could not prepare the seek: %s", SPI_result_code_string(SPI_result));
	/* The pending seeks are few: their result stays valid while the plan runs. */
	{
		SPITupleTable *seeks = SPI_tuptable;
		uint64		n = SPI_processed;

		for (i = 0; i < n; i++)
		{
			HeapTuple	tup = seeks->vals[i];
			TupleDesc	desc = seeks->tupdesc;
			bool		isnull;
			Datum		v[6];
			char	   *topic = SPI_getvalue(tup, desc, 2);
			int32		partition = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
			int64		to = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
			char	   *by = SPI_getvalue(tup, desc, 6);
			char	   *st;
			char	   *dir;
			char	   *from;

			v[0] = name[0];
			v[1] = CStringGetTextDatum(topic);
			v[2] = Int32GetDatum(partition);
			v[3] = Int64GetDatum(to);
			v[4] = SPI_getbinval(tup, desc, 5, &isnull);
			v[5] = SPI_getbinval(tup, desc, 1, &isnull);
			if (SPI_execute_plan(plan, v, NULL, false, 0) != SPI_OK_UPDATE_RETURNING ||
				SPI_processed != 1)
				elog(ERROR, "could not apply seek %s", SPI_getvalue(tup, desc, 1));
			st = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			dir = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
			from = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("source \"%s\": seek %s of %s [%d] from offset %s to " INT64_FORMAT " (%s, asked by role %s): %s",
							source_name, SPI_getvalue(tup, desc, 1), topic, partition,
							from ? from : "(none stored)", to, dir, by, st),
					 strcmp(dir, "rewind") == 0 && strcmp(st, "applied") == 0 ?
					 errdetail("Offsets " INT64_FORMAT " to " INT64_FORMAT " will be spooled again, with new cursors.",
							   to, (int64) strtoll(from, NULL, 10) - 1) : 0));
		}
	}
	SPI_freeplan(plan);
}

/* Where a partition starts: its stored offset, else the start option. */
static int64
resume_offset(const char *topic, int32 partition)
{
	int64		offset = opts->start_latest ? RD_KAFKA_OFFSET_END : RD_KAFKA_OFFSET_BEGINNING;
	ListCell   *a,
			   *b,
			   *c;

	forthree(a, resume_topic, b, resume_part, c, resume_next)
	{
		if (strcmp(lfirst(a), topic) == 0 && lfirst_int(b) == partition)
			offset = strtoll(lfirst(c), NULL, 10);
	}
	return offset;
}

/*
 * Add every partition of topic to parts and to list, at its resume offset.
 * Returns false, with last_error set, when the brokers do not answer or the
 * topic is unknown.
 */
static bool
add_topic(rd_kafka_topic_partition_list_t *list, const char *topic, int *cap)
{
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;
	int			p;

	err = rd_kafka_metadata(rk, 0, rkt, &md, KAFKA_CALL_TIMEOUT_MS);
	rd_kafka_topic_destroy(rkt);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		set_error("could not fetch metadata for topic \"%s\" from %s: %s",
				  topic, brokers, rd_kafka_err2str(err));
		return false;
	}
	if (md->topic_cnt < 1 || md->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR ||
		md->topics[0].partition_cnt == 0)
	{
		set_error("topic \"%s\" is not available: %s", topic,
				  md->topic_cnt < 1 ? "no metadata" : rd_kafka_err2str(md->topics[0].err));
		rd_kafka_metadata_destroy(md);
		return false;
	}
	for (p = 0; p < md->topics[0].partition_cnt; p++)
	{
		int32		partition = md->topics[0].partitions[p].id;
		int64		offset = resume_offset(topic, partition);
		PartState  *ps;

		if (nparts == *cap)
		{
			*cap *= 2;
			parts = repalloc(parts, sizeof(PartState) * *cap);
		}
		ps = &parts[nparts++];
		ps->topic = MemoryContextStrdup(TopMemoryContext, topic);
		ps->partition = partition;
		ps->position = offset >= 0 ? offset : -1;
		ps->high = -1;
		ps->count = 0;
		ps->error_at = 0;
		ps->error_shown = false;
		rd_kafka_topic_partition_list_add(list, topic, partition)->offset = offset;
	}
	rd_kafka_metadata_destroy(md);
	return true;
}

/*
 * Find the partitions of every topic and assign them at the stored offsets
 * (or at the start option for partitions never seen).  Returns false, with
 * last_error set, when the brokers do not answer or a topic is unknown.
 */
static bool
discover_and_assign(void)
{
	rd_kafka_topic_partition_list_t *list;
	ListCell   *lc;
	rd_kafka_resp_err_t err;

	parts_cap = 64;
	parts = MemoryContextAlloc(TopMemoryContext, sizeof(PartState) * parts_cap);
	nparts = 0;
	list = rd_kafka_topic_partition_list_new(parts_cap);
	foreach(lc, topics)
	{
		if (!add_topic(list, lfirst(lc), &parts_cap))
		{
			rd_kafka_topic_partition_list_destroy(list);
			return false;
		}
	}
	err = rd_kafka_assign(rk, list);
	rd_kafka_topic_partition_list_destroy(list);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		set_error("could not assign partitions: %s", rd_kafka_err2str(err));
		return false;
	}
	return true;
}

/* Kafka headers as a JSON object; values that are not UTF-8 become "\x<hex>". */
static Jsonb *
headers_jsonb(rd_kafka_message_t *rkm)
{
	rd_kafka_headers_t *hdrs;
	StringInfoData buf;
	const char *name;
	const void *val;
	size_t		size;
	size_t		i;

	if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return NULL;
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
	{
		char	   *text;

		if (i > 0)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, pg_verify_mbstr(PG_UTF8, name, strlen(name), true) ? name : "\\x?");
		appendStringInfoString(&buf, ": ");
		if (val == NULL)
		{
			appendStringInfoString(&buf, "null");
			continue;
		}
		if (pg_verify_mbstr(PG_UTF8, val, size, true) && memchr(val, '\0', size) == NULL)
			text = pnstrdup(val, size);
		else
		{
			text = palloc(size * 2 + 3);
			strcpy(text, "\\x");
			hex_encode(val, size, text + 2);
			text[size * 2 + 2] = '\0';
		}
		escape_json(&buf, text);
	}
	appendStringInfoChar(&buf, '}');
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

static bytea *
make_bytea(const void *data, size_t len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), data, len);
	return b;
}

/*
 * The message's Kafka timestamp, if it has one.  False when it is outside
 * the range of timestamptz: s is then a dead letter.
 */
static bool
set_timestamp(Staged *s, rd_kafka_message_t *rkm)
{
	rd_kafka_timestamp_type_t tstype;
	int64		ts = rd_kafka_message_timestamp(rkm, &tstype);
	int64		pg_ms;

	if (tstype == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE || ts < 0)
		return true;
	/* Milliseconds since 1970 to microseconds since 2000, if in range. */
	pg_ms = ts - ((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000);
	if (pg_ms >= END_TIMESTAMP / 1000)
	{
		s->kind = 'd';
		if (rkm->payload && rkm->len <= (size_t) opts->max_message_bytes)
			s->payload = make_bytea(rkm->payload, rkm->len);
		s->error = psprintf("Kafka timestamp " INT64_FORMAT " ms is outside the range of timestamptz", ts);
		return false;
	}
	s->ts = (TimestampTz) pg_ms * 1000;
	s->has_ts = true;
	return true;
}

/*
 * The message's value, as the source's format says; a value that cannot
 * be stored makes s a dead letter.  json text is converted to jsonb when
 * the batch is staged (convert_json_values).
 */
static void
set_value(Staged *s, rd_kafka_message_t *rkm)
{
	bool		utf8;

	if (rkm->payload == NULL)
	{
		s->kind = 'd';
		s->error = "null value (tombstone)";
		return;
	}
	if (rkm->len > (size_t) opts->max_message_bytes)
	{
		s->kind = 'd';
		s->error = psprintf("value of %zu bytes exceeds max_message_bytes (%d); payload not kept",
							rkm->len, opts->max_message_bytes);
		return;
	}
	if (opts->format == SPOOL_FORMAT_BYTES)
	{
		s->payload = make_bytea(rkm->payload, rkm->len);
		return;
	}
	/* jsonb_in and text trust their input to be server-encoded and stop at a NUL. */
	utf8 = pg_verify_mbstr(PG_UTF8, rkm->payload, rkm->len, true) &&
		memchr(rkm->payload, '\0', rkm->len) == NULL;
	if (opts->format == SPOOL_FORMAT_JSON && utf8)
		s->json = pnstrdup(rkm->payload, rkm->len);
	else
		s->payload = make_bytea(rkm->payload, rkm->len);
	if (!utf8)
	{
		s->kind = 'd';
		s->error = opts->format == SPOOL_FORMAT_JSON ? "invalid JSON: not valid UTF-8"
			: "invalid UTF-8 text";
	}
}

/* A consumer error: a hole (offset out of range) becomes a gap row. */
static void
handle_consumer_error(rd_kafka_message_t *rkm)
{
	if (rkm->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
		return;
	if (rkm->rkt &&
		(rkm->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
		 rkm->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE))
	{
		handle_gap(rd_kafka_topic_name(rkm->rkt), rkm->partition);
		return;
	}
	set_part_error(rkm->rkt ? find_part(rd_kafka_topic_name(rkm->rkt), rkm->partition) : -1,
				   "%s%s%s", rkm->rkt ? rd_kafka_topic_name(rkm->rkt) : "",
				   rkm->rkt ? ": " : "", rd_kafka_message_errstr(rkm));
}

/* Turn one consumed message (or consumer error) into a staged row. */
static void
handle_message(rd_kafka_message_t *rkm)
{
	int			pi;
	Staged	   *s;

	if (rkm->err)
	{
		handle_consumer_error(rkm);
		return;
	}
	pi = find_part(rd_kafka_topic_name(rkm->rkt), rkm->partition);
	if (pi < 0)
		return;					/* not ours (cannot happen with assign) */
	if (parts[pi].position >= 0 && rkm->offset < parts[pi].position)
		return;					/* already staged (a re-fetch after seek) */
	parts[pi].position = rkm->offset + 1;
	parts[pi].count++;
	/* Data ends the partition's error state once a refresh has shown it. */
	if (parts[pi].error_at != 0 && parts[pi].error_shown)
		parts[pi].error_at = 0;

	s = new_staged(pi, rkm->offset, 'm');
	fill_staged(s, rkm);
}

/* A message's key, headers, timestamp and value, by the source's checks. */
static void
fill_staged(Staged *s, rd_kafka_message_t *rkm)
{
	if (rkm->key)
		s->key = make_bytea(rkm->key, rkm->key_len);
	s->headers = headers_jsonb(rkm);
	batch_bytes += rkm->len + rkm->key_len;
	if (set_timestamp(s, rkm))
		set_value(s, rkm);
}

/*
 * The log start of a partition, asked with ListOffsets(earliest); -1 with
 * last_error set when it is unknown.  (Not rd_kafka_query_watermark_offsets:
 * in librdkafka 2.0 it ignores its timeout while the partition leader is
 * unreachable.)
 */
static int64
log_start(const char *topic, int32 partition)
{
	rd_kafka_topic_partition_list_t *q = rd_kafka_topic_partition_list_new(1);
	rd_kafka_resp_err_t err;
	int64		low;

	rd_kafka_topic_partition_list_add(q, topic, partition)->offset = RD_KAFKA_OFFSET_BEGINNING;
	err = rd_kafka_offsets_for_times(rk, q, KAFKA_CALL_TIMEOUT_MS);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		err = q->elems[0].err;
	low = q->elems[0].offset;
	rd_kafka_topic_partition_list_destroy(q);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR || low < 0)
	{
		set_error("%s [%d]: offset out of range, and the log start is unknown: %s",
				  topic, partition, rd_kafka_err2str(err));
		return -1;
	}
	return low;
}

/*
 * The broker no longer has the offset we need: record the hole [position,
 * log start - 1] as a gap row and, unless on_gap is 'stop', continue from
 * the log start.
 */
static void
handle_gap(const char *topic, int32 partition)
{
	int			pi = find_part(topic, partition);
	int64		low;
	Staged	   *s;
	bool		stop;

	if (pi < 0 || (low = log_start(topic, partition)) < 0)
		return;
	if (parts[pi].position < 0 || parts[pi].position >= low)
	{
		/* Not a hole behind us (e.g. we asked beyond the end): resume at the end. */
		set_error("%s [%d]: offset " INT64_FORMAT " out of range (log start " INT64_FORMAT ")",
				  topic, partition, parts[pi].position, low);
		return;
	}

	stop = opts->on_gap_stop && !skip_gap;
	s = new_staged(pi, parts[pi].position, 'g');
	s->gap_to = low - 1;
	s->gap_stop = stop;
	ereport(WARNING,
			(errcode(ERRCODE_WARNING),
			 errmsg("source \"%s\": retention gap in %s [%d], offsets " INT64_FORMAT " to " INT64_FORMAT " are gone",
					source_name, topic, partition, parts[pi].position, low - 1),
			 errdetail(stop ? "on_gap is 'stop': the source stops; spool.start_source continues past the gap."
					   : "The source continues from the log start.")));
	if (stop)
	{
		stop_after_batch = true;
		return;
	}
	/*
	 * Continue from the log start.  After an offset-out-of-range error with
	 * auto.offset.reset=error a seek does not restart fetching; assigning
	 * every partition again at its position does.
	 */
	parts[pi].position = low;
	reassign_all();
}

/* Convert every pending json text of the batch in one subtransaction. */
static bool
convert_batch_json(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = false;
	int			i;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		for (i = 0; i < nbatch; i++)
			if (batch[i].kind == 'm' && batch[i].json && !batch[i].has_value)
			{
				batch[i].value = DirectFunctionCall1(jsonb_in, CStringGetDatum(batch[i].json));
				batch[i].has_value = true;
			}
		ReleaseCurrentSubTransaction();
		ok = true;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return ok;
}

/*
 * Convert one message's json text in its own subtransaction; a failure makes
 * it a dead letter, with jansson's wording when it has one.
 */
static void
convert_one_json(Staged *s, const char *why)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	s->has_value = false;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		s->value = DirectFunctionCall1(jsonb_in, CStringGetDatum(s->json));
		s->has_value = true;
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		s->kind = 'd';
		s->payload = make_bytea(s->json, strlen(s->json));
		s->error = psprintf("invalid JSON: %s", why ? why : edata->message);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
}

/* Assign every partition again, at its current position. */
static void
reassign_all(void)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(nparts);
	rd_kafka_resp_err_t err;
	int			i;

	for (i = 0; i < nparts; i++)
		rd_kafka_topic_partition_list_add(list, parts[i].topic, parts[i].partition)->offset =
			parts[i].position >= 0 ? parts[i].position :
			opts->start_latest ? RD_KAFKA_OFFSET_END : RD_KAFKA_OFFSET_BEGINNING;
	err = rd_kafka_assign(rk, list);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		set_error("could not assign partitions again: %s", rd_kafka_err2str(err));
	rd_kafka_topic_partition_list_destroy(list);
}

/*
 * Convert the json texts of the batch to jsonb.  The common case is one
 * subtransaction for the whole batch.  When it fails, jansson (which reports
 * errors as values, no subtransaction needed) points at the suspects; jsonb
 * has the last word on each of them (jansson refuses some documents jsonb
 * takes, such as 1e400), and the rest is converted as a batch again.  Should
 * that still fail, every message gets a subtransaction of its own.
 */
static void
convert_json_values(void)
{
	int			i;

	if (convert_batch_json())
		return;

	for (i = 0; i < nbatch; i++)
	{
		Staged	   *s = &batch[i];
		char		why[256];

		s->has_value = false;
		if (s->kind == 'm' && s->json &&
			!spool_json_valid(s->json, strlen(s->json), why, sizeof(why)))
			convert_one_json(s, why);
	}
	if (convert_batch_json())
		return;
	for (i = 0; i < nbatch; i++)
		if (batch[i].kind == 'm' && batch[i].json && !batch[i].has_value)
			convert_one_json(&batch[i], NULL);
}

/*
 * Open the active staging table for writing.  Check the flag again once we
 * hold the lock: if the promoter flipped it meanwhile, it may be about to
 * move and truncate the table we locked, so use the new active one.
 */
static Relation
open_active_staging(uint32 *which)
{
	Oid			staging_oid;
	Relation	rel;

	for (;;)
	{
		*which = pg_atomic_read_u32(&spool_ingest_shared->staging_active);
		staging_oid = RangeVarGetRelid(makeRangeVar("spool", *which ? "staging_1" : "staging_0", -1),
									   RowExclusiveLock, false);
		if (pg_atomic_read_u32(&spool_ingest_shared->staging_active) == *which)
			break;
	}
	rel = table_open(staging_oid, RowExclusiveLock);
	if (RelationGetDescr(rel)->natts != STAGING_NATTS)
		elog(ERROR, "spool staging table has %d columns, expected %d",
			 RelationGetDescr(rel)->natts, STAGING_NATTS);
	if (slots == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		TupleDesc	desc = CreateTupleDescCopy(RelationGetDescr(rel));
		int			i;

		slots = palloc(sizeof(TupleTableSlot *) * STAGING_SLOTS);
		for (i = 0; i < STAGING_SLOTS; i++)
			slots[i] = MakeSingleTupleTableSlot(desc, &TTSOpsVirtual);
		MemoryContextSwitchTo(old);
	}
	return rel;
}

static inline void
set_column(TupleTableSlot *slot, int col, Datum value)
{
	slot->tts_values[col] = value;
	slot->tts_isnull[col] = false;
}

/* One staging row in slot: a message at position pos, or (pos -1) another kind. */
static void
fill_slot(TupleTableSlot *slot, Staged *s, int64 batch_id, int64 pos, Datum source,
		  Datum topic)
{
	ExecClearTuple(slot);
	memset(slot->tts_isnull, true, sizeof(bool) * STAGING_NATTS);
	set_column(slot, 0, Int64GetDatum(batch_id));
	if (pos >= 0)
		set_column(slot, 1, Int64GetDatum(pos));
	set_column(slot, 2, source);
	set_column(slot, 3, topic);
	set_column(slot, 4, Int32GetDatum(parts[s->part].partition));
	set_column(slot, 5, Int64GetDatum(s->offset));
	set_column(slot, 6, CharGetDatum(s->dead_letter_id ? 'r' : s->kind));
	if (s->dead_letter_id)
		set_column(slot, 15, Int64GetDatum(s->dead_letter_id));
	if (s->key)
		set_column(slot, 7, PointerGetDatum(s->key));
	if (s->kind == 'm' && s->has_value)
		set_column(slot, 8, s->value);
	if (s->payload)
		set_column(slot, 9, PointerGetDatum(s->payload));
	if (s->headers)
		set_column(slot, 10, JsonbPGetDatum(s->headers));
	if (s->has_ts)
		set_column(slot, 11, TimestampTzGetDatum(s->ts));
	if (s->error)
		set_column(slot, 12, CStringGetTextDatum(s->error));
	if (s->kind == 'g')
	{
		set_column(slot, 13, Int64GetDatum(s->gap_to));
		set_column(slot, 14, BoolGetDatum(s->gap_stop));
	}
	ExecStoreVirtualTuple(slot);
}

/*
 * Insert the batch into rel with heap multi-inserts, its messages at
 * positions first_pos, first_pos + 1, ...  No BulkInsertState: its ring
 * buffer would push staging pages out of shared buffers just before the
 * promoter reads them.
 */
static void
insert_batch(Relation rel, int64 first_pos)
{
	Oid			seq_oid = RangeVarGetRelid(makeRangeVar("spool", "staging_batch", -1), NoLock, false);
	int64		batch_id = DatumGetInt64(DirectFunctionCall1(nextval_oid, ObjectIdGetDatum(seq_oid)));
	CommandId	cid = GetCurrentCommandId(true);
	Datum		source_datum = CStringGetTextDatum(source_name);
	Datum	   *topic_datums = palloc(sizeof(Datum) * nparts);
	int64		pos = first_pos;
	int			nslots = 0;
	int			i;

	for (i = 0; i < nparts; i++)
		topic_datums[i] = CStringGetTextDatum(parts[i].topic);
	for (i = 0; i < nbatch; i++)
	{
		Staged	   *s = &batch[i];

		if (s->kind == 'x')
			continue;			/* a replay that failed again */
		fill_slot(slots[nslots], s, batch_id, s->kind == 'm' ? pos++ : -1, source_datum,
				  topic_datums[s->part]);
		if (++nslots == STAGING_SLOTS)
		{
			table_multi_insert(rel, slots, nslots, cid, 0, NULL);
			nslots = 0;
		}
	}
	if (nslots > 0)
		table_multi_insert(rel, slots, nslots, cid, 0, NULL);
}

/*
 * Replays whose message failed the checks again: the dead letter keeps the
 * new error and its request is cleared; the row is not staged ('x').
 */
static void
record_failed_replays(void)
{
	int			i;

	for (i = 0; i < nbatch; i++)
	{
		Staged	   *s = &batch[i];

		if (s->dead_letter_id == 0 || s->kind != 'd')
			continue;
		if (SPI_execute_with_args("UPDATE spool.dead_letters SET error = $2,"
								  " replay_requested_at = NULL, replay_attempts = replay_attempts + 1"
								  " WHERE id = $1",
								  2, (Oid[]) {INT8OID, TEXTOID},
								  (Datum[]) {Int64GetDatum(s->dead_letter_id),
								  CStringGetTextDatum(s->error)}, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not update dead letter " INT64_FORMAT, s->dead_letter_id);
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("source \"%s\": replay of dead letter " INT64_FORMAT " failed again: %s",
						source_name, s->dead_letter_id, s->error)));
		s->kind = 'x';
	}
}

/* Write the batch into the active staging table in one transaction and wake the promoter. */
static void
stage_batch(void)
{
	Relation	rel;
	uint32		which;
	int			nmsg = 0;
	int			nother = 0;
	int64		first_pos;
	int			i;
	TimestampTz t_start = GetCurrentTimestamp();

	spool_begin_txn("staging a batch");
	if (opts->format == SPOOL_FORMAT_JSON)
		convert_json_values();
	record_failed_replays();
	rel = open_active_staging(&which);

	/*
	 * Reserve positions for this batch's messages in the table, while we hold
	 * it: the promoter numbers cursors by these positions, and the counter
	 * tells it how many there can be.  Replays are messages with a position
	 * that only the promoter's statement for other rows moves.
	 */
	for (i = 0; i < nbatch; i++)
	{
		nmsg += (batch[i].kind == 'm');
		nother += (batch[i].kind == 'd' || batch[i].kind == 'g' ||
				   (batch[i].kind == 'm' && batch[i].dead_letter_id != 0));
	}
	first_pos = (int64) pg_atomic_fetch_add_u64(&spool_ingest_shared->staged_msgs[which], (uint64) nmsg);
	insert_batch(rel, first_pos);
	table_close(rel, NoLock);
	if (nother > 0)
		pg_atomic_fetch_add_u64(&spool_ingest_shared->staged_other[which], (uint64) nother);

	refresh_status(false);
	/* Under our lock on the table: the promoter cannot have moved it out yet. */
	spool_note_staged(which, GetCurrentTimestamp());
	spool_end_txn();
	spool_wake_promoter();
	note_batch(nbatch, t_start);
	nbatch = 0;
	batch_bytes = 0;
}

/*
 * The batch's numbers: its rows, what ended it, the time from its first
 * message to its commit into staging, and the staging transaction's time.
 */
static void
note_batch(int n, TimestampTz t_start)
{
	TimestampTz now = GetCurrentTimestamp();

	if (stats == NULL)
		return;
	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	stats->ended[batch_end]++;
	spool_hist_add(&stats->rows, n, now);
	spool_hist_add(&stats->batch_ms, (double) (now - batch_first) / 1000.0, now);
	spool_hist_add(&stats->stage_ms, (double) (now - t_start) / 1000.0, now);
	LWLockRelease(spool_ingest_shared->lock);
}

/* The worker's row of spool.source_runtime. */
static void
write_source_runtime(void)
{
	Datum		v[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};

	v[0] = CStringGetTextDatum(source_name);
	v[1] = Int32GetDatum(MyProcPid);
	v[2] = CStringGetTextDatum(state);
	if (last_error)
	{
		v[3] = CStringGetTextDatum(last_error);
		v[4] = TimestampTzGetDatum(last_error_at);
	}
	else
		nulls[3] = nulls[4] = 'n';
	v[5] = Int64GetDatum((int64) errors);
	spool_plan(&plan_source_runtime,
			   "INSERT INTO spool.source_runtime AS r"
			   " (source, pid, state, last_error, last_error_at, errors, updated_at)"
			   " VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())"
			   " ON CONFLICT (source) DO UPDATE SET pid = EXCLUDED.pid,"
			   " state = EXCLUDED.state, last_error = EXCLUDED.last_error,"
			   " last_error_at = EXCLUDED.last_error_at, errors = EXCLUDED.errors,"
			   " updated_at = EXCLUDED.updated_at",
			   6, (Oid[]) {TEXTOID, INT4OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, INT8OID});
	(void) spool_exec(plan_source_runtime, v, nulls, false, SPI_OK_INSERT);
}

/*
 * The rows of spool.partition_runtime: high watermark (as librdkafka last
 * saw it), position, and messages per second over the last secs.
 */
static void
write_partition_runtime(double secs)
{
	Datum	   *d_topic,
			   *d_part,
			   *d_high,
			   *d_pos,
			   *d_rate,
			   *d_state,
			   *d_err;
	bool	   *pn_high,
			   *pn_pos,
			   *pn_err;
	int			dims[1] = {nparts};
	int			lbs[1] = {1};
	Datum		v[8];
	int			i;

	if (nparts == 0)
		return;
	d_state = palloc(sizeof(Datum) * nparts);
	d_err = palloc(sizeof(Datum) * nparts);
	pn_err = palloc(sizeof(bool) * nparts);
	d_topic = palloc(sizeof(Datum) * nparts);
	d_part = palloc(sizeof(Datum) * nparts);
	d_high = palloc(sizeof(Datum) * nparts);
	d_pos = palloc(sizeof(Datum) * nparts);
	d_rate = palloc(sizeof(Datum) * nparts);
	pn_high = palloc(sizeof(bool) * nparts);
	pn_pos = palloc(sizeof(bool) * nparts);
	for (i = 0; i < nparts; i++)
	{
		int64		low = -1;
		int64		high = -1;

		if (rk && rd_kafka_get_watermark_offsets(rk, parts[i].topic, parts[i].partition,
												 &low, &high) == RD_KAFKA_RESP_ERR_NO_ERROR &&
			high >= 0)
			parts[i].high = high;
		d_topic[i] = CStringGetTextDatum(parts[i].topic);
		d_part[i] = Int32GetDatum(parts[i].partition);
		d_high[i] = Int64GetDatum(parts[i].high);
		pn_high[i] = parts[i].high < 0;
		d_pos[i] = Int64GetDatum(parts[i].position);
		pn_pos[i] = parts[i].position < 0;
		d_rate[i] = Float8GetDatum(parts[i].count / secs);
		parts[i].count = 0;
		d_state[i] = CStringGetTextDatum(parts[i].error_at != 0 ? "error" : "running");
		d_err[i] = TimestampTzGetDatum(parts[i].error_at);
		pn_err[i] = parts[i].error_at == 0;
	}
	v[0] = CStringGetTextDatum(source_name);
	v[1] = PointerGetDatum(construct_array(d_topic, nparts, TEXTOID, -1, false, TYPALIGN_INT));
	v[2] = PointerGetDatum(construct_array(d_part, nparts, INT4OID, 4, true, TYPALIGN_INT));
	v[3] = PointerGetDatum(construct_md_array(d_high, pn_high, 1, dims, lbs, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	v[4] = PointerGetDatum(construct_md_array(d_pos, pn_pos, 1, dims, lbs, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	v[5] = PointerGetDatum(construct_array(d_rate, nparts, FLOAT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	v[6] = PointerGetDatum(construct_array(d_state, nparts, TEXTOID, -1, false, TYPALIGN_INT));
	v[7] = PointerGetDatum(construct_md_array(d_err, pn_err, 1, dims, lbs, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	spool_plan(&plan_partition_runtime,
			   "INSERT INTO spool.partition_runtime AS p"
			   " (source, topic, kafka_partition, high_watermark, position, msgs_per_sec, state,"
			   "  error_since, updated_at)"
			   " SELECT $1, u.t, u.p, u.h, u.o, u.r, u.s, u.e, clock_timestamp()"
			   " FROM unnest($2, $3, $4, $5, $6, $7, $8) AS u(t, p, h, o, r, s, e)"
			   " ON CONFLICT (source, topic, kafka_partition) DO UPDATE SET"
			   " high_watermark = EXCLUDED.high_watermark, position = EXCLUDED.position,"
			   " msgs_per_sec = EXCLUDED.msgs_per_sec, state = EXCLUDED.state,"
			   " error_since = EXCLUDED.error_since, updated_at = EXCLUDED.updated_at",
			   8, (Oid[]) {TEXTOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, FLOAT8ARRAYOID,
			   TEXTARRAYOID, TIMESTAMPTZARRAYOID});
	(void) spool_exec(plan_partition_runtime, v, NULL, false, SPI_OK_INSERT);
	/* Published: from now on the partition's own data may end its error state. */
	for (i = 0; i < nparts; i++)
		if (parts[i].error_at != 0)
			parts[i].error_shown = true;
}

/* Broker-side commit of the durable offsets: for lag monitoring only. */
static void
commit_offsets_to_broker(void)
{
	Datum		v[1] = {CStringGetTextDatum(source_name)};
	rd_kafka_topic_partition_list_t *list;
	bool		isnull;
	uint64		j;

	spool_plan(&plan_durable_offsets,
			   "SELECT topic, kafka_partition, next_offset FROM spool.offsets WHERE source = $1",
			   1, (Oid[]) {TEXTOID});
	if (spool_exec(plan_durable_offsets, v, NULL, true, SPI_OK_SELECT) == 0)
		return;
	list = rd_kafka_topic_partition_list_new((int) SPI_processed);
	for (j = 0; j < SPI_processed; j++)
	{
		HeapTuple	tup = SPI_tuptable->vals[j];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		rd_kafka_topic_partition_list_add(list, SPI_getvalue(tup, desc, 1),
										  DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull)))->offset =
			DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	}
	(void) rd_kafka_commit(rk, list, 1);	/* async; failures only affect monitoring */
	rd_kafka_topic_partition_list_destroy(list);
}

/*
 * Write the runtime state (at most once a second unless forced) and, every
 * few seconds, commit the promoted offsets to the broker for lag monitoring.
 * Runs inside the caller's transaction (connected to SPI), or in one of its
 * own.
 */
static void
refresh_status(bool force)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		own_xact = !IsTransactionState();
	double		secs;

	take_kafka_error();
	/* Errors stopped: the state is healthy again (last_error stays, with its time). */
	if (strcmp(state, "error") == 0 && last_error_at != 0 &&
		now - last_error_at > (int64) ERROR_QUIET_MS * 1000)
		state = "running";
	for (int i = 0; i < nparts; i++)
		if (parts[i].error_at != 0 && parts[i].error_shown &&
			now - parts[i].error_at > (int64) ERROR_QUIET_MS * 1000)
			parts[i].error_at = 0;
	if (!force && now - last_status < (int64) STATUS_INTERVAL_MS * 1000)
		return;
	secs = last_status ? (double) (now - last_status) / 1000000.0 : 1.0;
	last_status = now;

	if (own_xact)
		spool_begin_txn("writing the source's status");
	write_source_runtime();
	write_partition_runtime(secs);
	if (rk && now - last_commit >= (int64) COMMIT_INTERVAL_MS * 1000)
	{
		last_commit = now;
		commit_offsets_to_broker();
	}
	if (own_xact)
		spool_end_txn();
}

/*
 * After staging a gap with on_gap 'stop', wait (bounded) until the promoter
 * has recorded it and disabled the source, so that the launcher does not
 * restart us into the same gap.
 */
static void
wait_until_promoted_stop(void)
{
	Datum		v[1];
	int			i;

	for (i = 0; i < 600; i++)
	{
		bool		enabled;
		bool		isnull;

		spool_begin_txn("waiting for the gap to be promoted");
		v[0] = CStringGetTextDatum(source_name);
		if (SPI_execute_with_args("SELECT enabled FROM spool.sources WHERE name = $1",
								  1, (Oid[]) {TEXTOID}, v, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read source \"%s\"", source_name);
		enabled = SPI_processed == 1 &&
			DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		spool_end_txn();
		if (!enabled)
			return;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 100L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* Attach: signals, the connection, pinned settings, the batch's memory. */
static void
ingest_attach(void)
{
	strlcpy(source_name, spool_worker_args()->name, sizeof(source_name));
	spool_worker_attach(InvalidOid, NULL);

	batch_cxt = AllocSetContextCreate(TopMemoryContext, "spool ingest batch",
									  ALLOCSET_DEFAULT_SIZES);
	batch_cap = 1024;
	batch = MemoryContextAlloc(TopMemoryContext, sizeof(Staged) * batch_cap);
	stats = spool_source_stats(source_name);
	if (stats)
		errors = stats->errors;
}

/*
 * Create the consumer (with what the owner may hand to librdkafka today: it
 * may have been demoted) and the pipe librdkafka wakes us through.
 */
static void
kafka_open(void)
{
	char		errbuf[512];
	rd_kafka_conf_t *conf;

	spool_begin_txn("checking the Kafka policy");
	spool_kafka_policy_check(brokers, opts->nkafka, (const char *const *) opts->kafka_keys,
							 (const char *const *) opts->kafka_values, source_owner,
							 "source", source_name);
	spool_end_txn();
	conf = spool_kafka_conf(brokers, opts, default_group, errbuf, sizeof(errbuf));
	if (conf == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("invalid Kafka configuration: %s", errbuf)));
	rd_kafka_conf_set_error_cb(conf, kafka_error_cb);
	rk = spool_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf, sizeof(errbuf));
	if (rk == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("could not create Kafka consumer: %s", errbuf)));
	rd_kafka_poll_set_consumer(rk);
	{
		char		val[64];
		size_t		len = sizeof(val);

		discovery_ms = DISCOVERY_DEFAULT_MS;
		if (rd_kafka_conf_get(rd_kafka_conf(rk), "topic.metadata.refresh.interval.ms",
							  val, &len) == RD_KAFKA_CONF_OK)
			discovery_ms = (int) strtol(val, NULL, 10);
		/* Each look is a metadata request per topic: not more than once a second. */
		if (discovery_ms > 0)
			discovery_ms = Max(discovery_ms, 1000);
		next_discovery = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), discovery_ms);
	}

	if (pipe(wake_pipe) != 0 ||
		fcntl(wake_pipe[0], F_SETFL, O_NONBLOCK) != 0 ||
		fcntl(wake_pipe[1], F_SETFL, O_NONBLOCK) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create wake-up pipe: %m")));
	rd_kafka_queue_io_event_enable(rd_kafka_queue_get_consumer(rk), wake_pipe[1], "1", 1);
}

/* Assign the partitions; until the brokers answer, keep retrying with the reason visible. */
static void
kafka_assign(void)
{
	int			retry_ms = 1000;

	state = "connecting";
	refresh_status(true);
	while (!discover_and_assign())
	{
		refresh_status(true);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 retry_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		spool_exit_if_orphaned();
		retry_ms = Min(retry_ms * 2, 30000);
	}
	state = "running";
	refresh_status(true);
	ereport(LOG, (errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				  errmsg("spool ingest worker for source \"%s\" assigned %d partitions",
						 source_name, nparts)));
}

/*
 * Sleep until the latch is set, the consumer queue has messages (the pipe)
 * or timeout ms passed; false on timeout.
 */
static bool
wait_for_messages(long timeout)
{
	int			rc = WaitLatchOrSocket(MyLatch,
									   WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
									   wake_pipe[0], timeout, PG_WAIT_EXTENSION);

	if (rc & WL_LATCH_SET)
	{
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	if (rc & WL_SOCKET_READABLE)
		drain_pipe();
	return !(rc & WL_TIMEOUT);
}

/*
 * Consume into the batch until it is full (batch_size messages or
 * BATCH_MAX_BYTES), batch_ms have passed since its first message, a gap
 * stops the source, or, with nothing held, STATUS_INTERVAL_MS pass without
 * a message.  Never blocks inside librdkafka.
 */
static void
gather_batch(void)
{
	TimestampTz first = 0;

	batch_end = BATCH_END_TIME;
	while (nbatch < opts->batch_size && batch_bytes < BATCH_MAX_BYTES && !stop_after_batch)
	{
		rd_kafka_message_t *rkm = rd_kafka_consumer_poll(rk, 0);
		long		timeout = STATUS_INTERVAL_MS;

		if (rkm)
		{
			if (nbatch == 0)
				first = GetCurrentTimestamp();
			handle_message(rkm);
			rd_kafka_message_destroy(rkm);
			continue;
		}
		if (nbatch > 0)
		{
			timeout = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
													  TimestampTzPlusMilliseconds(first, opts->batch_ms));
			if (timeout <= 0)
				break;
		}
		if (!wait_for_messages(timeout) && nbatch == 0)
			break;
	}
	if (stop_after_batch)
		batch_end = BATCH_END_STOP;
	else if (nbatch >= opts->batch_size)
		batch_end = BATCH_END_SIZE;
	else if (batch_bytes >= BATCH_MAX_BYTES)
		batch_end = BATCH_END_BYTES;
	/* Gap and dead-letter rows only: timed from now. */
	batch_first = first ? first : GetCurrentTimestamp();
}

/* A gap stopped the source: say so, wait until it is recorded, and exit. */
static void
ingest_stop(void)
{
	state = "stopped";
	refresh_status(true);
	wait_until_promoted_stop();
	proc_exit(0);
}

/*
 * The worker failed: show why in spool.source_runtime (unless it was told
 * to stop), then exit with the error.  Called in PG_CATCH.
 */
static void
ingest_failed(void)
{
	ErrorData  *edata;

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(TopMemoryContext);
	edata = CopyErrorData();
	FlushErrorState();
	AbortOutOfAnyTransaction();
	if (edata->sqlerrcode != ERRCODE_ADMIN_SHUTDOWN)
	{
		set_error("%s", edata->message);
		state = "failed";
		PG_TRY();
		{
			refresh_status(true);
		}
		PG_CATCH();
		{
			FlushErrorState();
			AbortOutOfAnyTransaction();
		}
		PG_END_TRY();
	}
	RESUME_INTERRUPTS();
	ReThrowError(edata);
}

/*
 * Read one message at offset from a consumer of its own (the main one
 * keeps its assignment and position).  Returns it, or NULL with *why set
 * when Kafka no longer has it or does not answer in REPLAY_FETCH_MS.
 */
static rd_kafka_message_t *
fetch_one(rd_kafka_t *handle, const char *topic, int32 partition, int64 offset,
		  char **why)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), REPLAY_FETCH_MS);
	rd_kafka_message_t *found = NULL;

	*why = NULL;
	rd_kafka_topic_partition_list_add(list, topic, partition)->offset = offset;
	if (rd_kafka_assign(handle, list) != RD_KAFKA_RESP_ERR_NO_ERROR)
		*why = "could not assign the partition";
	rd_kafka_topic_partition_list_destroy(list);
	while (*why == NULL && found == NULL)
	{
		/* A short wait inside librdkafka, bounded, with interrupts checked. */
		rd_kafka_message_t *m = rd_kafka_consumer_poll(handle, 100);

		CHECK_FOR_INTERRUPTS();
		if (m == NULL)
		{
			if (GetCurrentTimestamp() >= deadline)
				*why = psprintf("Kafka did not return offset " INT64_FORMAT " within %d ms",
								offset, REPLAY_FETCH_MS);
			continue;
		}
		if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
			*why = psprintf("offset " INT64_FORMAT " is past the end of the partition", offset);
		else if (m->err)
			*why = psprintf("message no longer in Kafka: %s", rd_kafka_message_errstr(m));
		else if (m->offset != offset)
			*why = psprintf("message no longer in Kafka (the next offset there is " INT64_FORMAT ")",
							m->offset);
		else
		{
			found = m;
			continue;
		}
		rd_kafka_message_destroy(m);
	}
	(void) rd_kafka_assign(handle, NULL);
	return found;
}

/*
 * Replay the dead letters asked for (spool.replay_dead_letter): read each
 * message from Kafka again and put it through the source's current checks
 * (format, max_message_bytes, timestamp).  Those that pass are staged as
 * replays ('r'): the promoter gives them new cursors and marks their dead
 * letters replayed in the same transaction.  The others keep the new error.
 */
static void
replay_dead_letters(void)
{
	char		errbuf[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *handle;
	ListCell   *a,
			   *b,
			   *c,
			   *d;
	int			n = 0;

	if (replay_ids == NIL)
		return;
	state = "replaying";
	conf = spool_kafka_conf(brokers, opts, default_group, errbuf, sizeof(errbuf));
	if (conf == NULL ||
		rd_kafka_conf_set(conf, "enable.partition.eof", "true", errbuf, sizeof(errbuf)) != RD_KAFKA_CONF_OK ||
		(handle = spool_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf, sizeof(errbuf))) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("could not create a Kafka consumer for replays: %s", errbuf)));
	forfour(a, replay_ids, b, replay_topic, c, replay_part, d, replay_offset)
	{
		const char *topic = lfirst(b);
		int32		partition = (int32) strtol(lfirst(c), NULL, 10);
		int64		offset = strtoll(lfirst(d), NULL, 10);
		int			pi = find_part(topic, partition);
		char	   *why = NULL;
		rd_kafka_message_t *m = NULL;
		Staged	   *s;

		if (pi < 0)
		{
			/* Any assigned partition will do to carry the error. */
			pi = 0;
			why = psprintf("this source does not read %s [%d] any more", topic, partition);
		}
		else
			m = fetch_one(handle, topic, partition, offset, &why);
		s = new_staged(pi, offset, 'm');
		s->dead_letter_id = strtoll(lfirst(a), NULL, 10);
		if (m)
		{
			fill_staged(s, m);
			rd_kafka_message_destroy(m);
		}
		else
		{
			s->kind = 'd';
			s->error = why;
		}
		n++;
	}
	rd_kafka_consumer_close(handle);
	rd_kafka_destroy(handle);
	stage_batch();
	state = "running";
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("source \"%s\": %d dead letters replayed from Kafka", source_name, n)));
}

/*
 * Partitions added to the topics while the source runs: at most every
 * discovery_ms (topic.metadata.refresh.interval.ms), ask the brokers for
 * the topics' partitions.  A new one is read from its log start: its
 * offset is stored at once (so a restart does not apply the start option
 * to it and skip what was produced meanwhile), and every partition is
 * assigned again at its position.
 */
static void
discover_new_partitions(void)
{
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;
	int			added = 0;

	if (discovery_ms <= 0 || now < next_discovery)
		return;
	next_discovery = TimestampTzPlusMilliseconds(now, discovery_ms);
	foreach(lc, topics)
	{
		const char *topic = lfirst(lc);
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
		const struct rd_kafka_metadata *md = NULL;
		rd_kafka_resp_err_t err;
		int			p;

		err = rd_kafka_metadata(rk, 0, rkt, &md, 2000);
		rd_kafka_topic_destroy(rkt);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR || md->topic_cnt < 1 ||
			md->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			if (md)
				rd_kafka_metadata_destroy(md);
			continue;			/* errors show through error_cb; try again later */
		}
		for (p = 0; p < md->topics[0].partition_cnt; p++)
		{
			int32		partition = md->topics[0].partitions[p].id;
			int64		low;
			PartState  *ps;

			if (find_part(topic, partition) >= 0 || (low = log_start(topic, partition)) < 0)
				continue;
			spool_begin_txn("storing the start of a new partition");
			if (SPI_execute_with_args("INSERT INTO spool.offsets (source, topic, kafka_partition,"
									  " next_offset, updated_at) VALUES ($1, $2, $3, $4, clock_timestamp())"
									  " ON CONFLICT DO NOTHING",
									  4, (Oid[]) {TEXTOID, TEXTOID, INT4OID, INT8OID},
									  (Datum[]) {CStringGetTextDatum(source_name),
										  CStringGetTextDatum(topic), Int32GetDatum(partition),
									  Int64GetDatum(low)}, NULL, false, 0) != SPI_OK_INSERT)
				elog(ERROR, "could not store the offset of a new partition");
			spool_end_txn();
			if (nparts == parts_cap)
			{
				parts_cap *= 2;
				parts = repalloc(parts, sizeof(PartState) * parts_cap);
			}
			ps = &parts[nparts++];
			ps->topic = MemoryContextStrdup(TopMemoryContext, topic);
			ps->partition = partition;
			ps->position = low;
			ps->high = -1;
			ps->count = 0;
			added++;
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("source \"%s\": new partition %s [%d], read from offset " INT64_FORMAT,
							source_name, topic, partition, low)));
		}
		rd_kafka_metadata_destroy(md);
	}
	if (added > 0)
	{
		reassign_all();
		refresh_status(true);
	}
}

void
spool_ingest_main(Datum main_arg)
{
	ingest_attach();
	if (!load_source())
		proc_exit(0);

	PG_TRY();
	{
		kafka_open();
		kafka_assign();
		replay_dead_letters();
		for (;;)
		{
			spool_worker_pass(batch_cxt, true);
			discover_new_partitions();
			gather_batch();
			if (nbatch > 0)
				stage_batch();
			else
				refresh_status(false);
			if (stop_after_batch)
				ingest_stop();
		}
	}
	PG_CATCH();
	{
		ingest_failed();
	}
	PG_END_TRY();
}
