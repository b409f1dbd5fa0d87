/*-------------------------------------------------------------------------
 *
 * consumer.c
 *	  The ingest worker of one source: its main function and batch loop.
 *	  It consumes its Kafka partitions with librdkafka and writes each batch
 *	  into the UNLOGGED staging table (consumer_stage.c).  The promoter makes
 *	  staged rows durable and moves the stored offsets in the same
 *	  transaction (promoter.c).
 *
 * The worker assigns partitions itself (no consumer-group rebalancing) at the
 * offsets stored in spool.offsets, so where to resume is decided by
 * PostgreSQL only (I-3).  It waits on its latch and on a pipe that librdkafka
 * writes to when the consumer queue becomes non-empty; it never blocks inside
 * librdkafka without a timeout.  Messages that cannot be stored become
 * dead-letter rows and retention holes become gap rows, both through staging,
 * so they are recorded exactly once as well (I-4).
 *
 * The worker's other jobs are in consumer_load.c (the source's definition
 * and where it resumes), consumer_pending.c (seeks and dead-letter replays
 * applied at start), consumer_partitions.c (assignment and discovery),
 * consumer_message.c (a message to a staged row), consumer_stage.c (the
 * staging transaction), consumer_status.c (errors and runtime rows) and
 * consumer_claims.c (partitions shared with other servers).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"

PGDLLEXPORT void spool_ingest_main(Datum main_arg);

#define BATCH_MAX_BYTES		(32 * 1024 * 1024)	/* message bytes held per batch;
												 * a single larger message still
												 * makes a batch of one */
#define DISCOVERY_DEFAULT_MS 300000 /* librdkafka's topic.metadata.refresh.interval.ms */

rd_kafka_t *rk;
static int	wake_pipe[2] = {-1, -1};
Staged	   *batch;
int			nbatch;
int			batch_cap;			/* grows up to batch_size + a few gap rows */
Size		batch_bytes;		/* message bytes held in batch */
bool		stop_after_batch = false;
TimestampTz	batch_first;		/* when the batch's first message came */
SpoolBatchEnd batch_end;		/* what ended the batch */
SpoolSourceStats *stats;		/* this source's counters, or NULL */
static MemoryContext batch_cxt;

/* glibc: allocations from 16 MB up are mapped, up to 32 MB of freed heap kept */
#define INGEST_MMAP_THRESHOLD	(16 * 1024 * 1024)
#define INGEST_TRIM_THRESHOLD	(32 * 1024 * 1024)

static void ingest_attach(void);
static void kafka_open(void);
static void drain_pipe(void);
static bool wait_for_messages(long timeout);
static void gather_batch(void);
static void wait_until_promoted_stop(void);
static void ingest_stop(void) pg_attribute_noreturn();
static void ingest_failed(void) pg_attribute_noreturn();

/*
 * Attach: signals, the connection, pinned settings, the batch's memory.
 * Each batch allocates and frees tens of megabytes (its messages, the rows
 * formed for the multi-insert, the staging transaction's memory), which
 * the worker keeps for the next batch instead of faulting it in again
 * (about a sixth of its CPU).
 */
static void
ingest_attach(void)
{
	spool_worker_keep_memory(INGEST_MMAP_THRESHOLD, INGEST_TRIM_THRESHOLD);
	strlcpy(source_name, spool_worker_args()->name, sizeof(source_name));
	worker_index = spool_worker_args()->index;
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

static void
drain_pipe(void)
{
	char		buf[256];

	while (read(wake_pipe[0], buf, sizeof(buf)) > 0)
		;
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
		claims_pass(true);		/* claim before the first message */
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
			claims_pass(false);
		}
	}
	PG_CATCH();
	{
		ingest_failed();
	}
	PG_END_TRY();
}
