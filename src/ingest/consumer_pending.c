/*-------------------------------------------------------------------------
 *
 * consumer_pending.c
 *	  What the ingest worker applies at its start, once nothing of its source
 *	  is left in staging: the pending seeks (spool.seek_source) and the
 *	  dead letters to replay (spool.replay_dead_letter).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"

#define REPLAY_FETCH_MS		10000	/* longest wait for one replayed message */

static void apply_pending_seeks(Datum *name);
static rd_kafka_message_t *fetch_one(rd_kafka_t *handle, const char *topic, int32 partition,
									 int64 offset, char **why, bool *gone);

/*
 * Start a transaction whose snapshot sees staging and spool.offsets in
 * step.  Rows leave staging only when the promoter empties a table, after
 * the promotion that moved them committed and under the table's exclusive
 * lock; locking both tables before the snapshot therefore means that a
 * snapshot that finds rows gone also sees the offsets they moved.
 */
void
staging_snapshot_txn(const char *activity)
{
	spool_start_txn(XACT_READ_COMMITTED);
	(void) RangeVarGetRelid(makeRangeVar("spool", "staging_0", -1), AccessShareLock, false);
	(void) RangeVarGetRelid(makeRangeVar("spool", "staging_1", -1), AccessShareLock, false);
	spool_snapshot_txn(activity);
}

/*
 * Wait (polling, no transaction open while waiting) until staging holds no
 * row of this worker's partitions, then apply the pending seeks in the same transaction
 * (staging_snapshot_txn: then the offsets are those our rows moved).
 */
void
wait_for_staging_drained(Datum *name)
{
	for (;;)
	{
		bool		staged;
		bool		isnull;

		staging_snapshot_txn("waiting for staged rows to be promoted");
		if (SPI_execute_with_args("SELECT DISTINCT kafka_partition FROM spool.staging WHERE source = $1",
								  1, (Oid[]) {TEXTOID}, name, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read spool.staging");
		/* The other workers of this source go on staging their partitions. */
		staged = false;
		for (uint64 i = 0; i < SPI_processed && !staged; i++)
			staged = worker_takes(DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i],
															  SPI_tuptable->tupdesc, 1, &isnull)));
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

			if (!worker_takes(partition))
				continue;		/* another worker of this source applies it */
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

/*
 * Read one message at offset from a consumer of its own (the main one
 * keeps its assignment and position).  Returns it, or NULL with *why set
 * when Kafka no longer has it or does not answer in REPLAY_FETCH_MS; *gone
 * says that Kafka answered and the offset holds nothing any more: it is
 * below the partition's log start (retention), or the partition goes on at
 * a later offset (compaction).
 */
static rd_kafka_message_t *
fetch_one(rd_kafka_t *handle, const char *topic, int32 partition, int64 offset,
		  char **why, bool *gone)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), REPLAY_FETCH_MS);
	rd_kafka_message_t *found = NULL;

	*why = NULL;
	*gone = false;
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
		else if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
				 m->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE)
		{
			/* Out of range: gone only if below the log start (not past the end). */
			int64		low = log_start(topic, partition);

			*gone = low >= 0 && offset < low;
			*why = *gone ?
				psprintf("message no longer in Kafka (the log starts at offset " INT64_FORMAT ")", low) :
				psprintf("message no longer in Kafka: %s", rd_kafka_message_errstr(m));
		}
		else if (m->err)
			*why = psprintf("message no longer in Kafka: %s", rd_kafka_message_errstr(m));
		else if (m->offset != offset)
		{
			*gone = m->offset > offset;
			*why = psprintf("message no longer in Kafka (the next offset there is " INT64_FORMAT ")",
							m->offset);
		}
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
 * (format, max_message_bytes, timestamp).  When Kafka no longer has it
 * (fetch_one's *gone), the dead letter's stored key and payload go through
 * the same value checks instead (fill_stored).  Those that pass are staged
 * as replays ('r', replay_from 'kafka' or 'stored'): the promoter gives them
 * new cursors and marks their dead letters replayed in the same
 * transaction.  The others keep the new error.
 */
void
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
	int			nstored = 0;
	int			i = 0;

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
		bool		gone = false;
		rd_kafka_message_t *m = NULL;
		Staged	   *s;

		if (pi < 0 && nparts == 0)
		{
			ereport(LOG,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("source \"%s\": dead letter %s of %s [%d] is not replayed: this worker reads no partition",
							source_name, (char *) lfirst(a), topic, partition)));
			i++;
			continue;
		}
		if (pi < 0)
		{
			/* Any assigned partition will do to carry the error. */
			pi = 0;
			why = psprintf("this source does not read %s [%d] any more", topic, partition);
		}
		else
			m = fetch_one(handle, topic, partition, offset, &why, &gone);
		s = new_staged(pi, offset, 'm');
		s->dead_letter_id = strtoll(lfirst(a), NULL, 10);
		if (m)
		{
			fill_staged(s, m);
			rd_kafka_message_destroy(m);
		}
		else if (gone)
		{
			fill_stored(s, list_nth(replay_key, i), list_nth(replay_payload, i));
			nstored++;
		}
		else
		{
			s->kind = 'd';
			s->error = why;
		}
		n++;
		i++;
	}
	rd_kafka_consumer_close(handle);
	rd_kafka_destroy(handle);
	stage_batch();
	state = "running";
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("source \"%s\": %d dead letters replayed, %d of them from their stored payload"
					" (Kafka no longer had them)", source_name, n, nstored)));
}
