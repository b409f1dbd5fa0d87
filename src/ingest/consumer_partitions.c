/*-------------------------------------------------------------------------
 *
 * consumer_partitions.c
 *	  The ingest worker's partitions: finding them from the brokers' metadata,
 *	  assigning them at their resume offsets (again after a gap or a new
 *	  partition), their log start, and partitions added while it runs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"

#define KAFKA_CALL_TIMEOUT_MS 5000

PartState  *parts;
int			nparts;
static int	parts_cap;
int			discovery_ms;		/* how often to look for new partitions; <= 0 never */
TimestampTz	next_discovery = 0;

static int64 resume_offset(const char *topic, int32 partition);
static bool add_topic(rd_kafka_topic_partition_list_t *list, const char *topic);
static bool discover_and_assign(void);
static void log_my_partitions(void);

int
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

/* Consume topic [partition] from offset (-1 or a logical offset: the start option). */
void
add_part(const char *topic, int32 partition, int64 offset)
{
	PartState  *ps;

	if (nparts == parts_cap)
	{
		parts_cap *= 2;
		parts = repalloc(parts, sizeof(PartState) * parts_cap);
	}
	ps = &parts[nparts++];
	ps->topic = MemoryContextStrdup(TopMemoryContext, topic);
	ps->partition = partition;
	ps->position = offset >= 0 ? offset : -1;
	ps->start = ps->position;
	ps->high = -1;
	ps->count = 0;
	ps->error_at = 0;
	ps->error_shown = false;
}

/* Stop consuming parts[part] (between batches: staged rows name parts by index). */
void
drop_part(int part)
{
	Assert(nbatch == 0);
	memmove(&parts[part], &parts[part + 1], sizeof(PartState) * (nparts - part - 1));
	nparts--;
}

/*
 * Add every partition of topic this server consumes to parts and to list,
 * at its resume offset.
 * Returns false, with last_error set, when the brokers do not answer or the
 * topic is unknown.
 */
static bool
add_topic(rd_kafka_topic_partition_list_t *list, const char *topic)
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

		if (!worker_takes(partition))
			continue;			/* another worker of this source's */
		if (!spool_source_takes_partition(opts, partition))
		{
			/* It left this server's share: hand it on once drained. */
			if (offset >= 0)
				claims_note_release(topic, partition);
			continue;
		}
		if (sharing && !claims_admit(topic, partition, &offset, false))
			continue;
		add_part(topic, partition, offset);
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
	claims_init();
	list = rd_kafka_topic_partition_list_new(parts_cap);
	foreach(lc, topics)
	{
		if (!add_topic(list, lfirst(lc)))
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
	if (opts->workers > 1)
		log_my_partitions();
	return true;
}

/* One of several workers: say which partitions it reads, as topic[p,p,...]. */
static void
log_my_partitions(void)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < nparts; i++)
	{
		bool		same_topic = i > 0 && strcmp(parts[i - 1].topic, parts[i].topic) == 0;

		if (!same_topic)
			appendStringInfo(&buf, "%s%s[", i > 0 ? "] " : "", parts[i].topic);
		appendStringInfo(&buf, "%s%d", same_topic ? "," : "", parts[i].partition);
	}
	appendStringInfoString(&buf, nparts > 0 ? "]" : "no partition");
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("source \"%s\": worker %d of %d reads %s",
					source_name, worker_index, opts->workers, buf.data)));
	pfree(buf.data);
}

/* Assign the partitions; until the brokers answer, keep retrying with the reason visible. */
void
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

/* Assign every partition again, at its current position. */
void
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
 * The log start of a partition, asked with ListOffsets(earliest); -1 with
 * last_error set when it is unknown.  (Not rd_kafka_query_watermark_offsets:
 * in librdkafka 2.0 it ignores its timeout while the partition leader is
 * unreachable.)
 */
int64
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
 * Partitions added to the topics while the source runs: at most every
 * discovery_ms (topic.metadata.refresh.interval.ms), ask the brokers for
 * the topics' partitions.  A new one is read from its log start: its
 * offset is stored at once (so a restart does not apply the start option
 * to it and skip what was produced meanwhile), and every partition is
 * assigned again at its position.
 */
void
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

			if (find_part(topic, partition) >= 0 || !worker_takes(partition) ||
				!spool_source_takes_partition(opts, partition) ||
				claims_waiting(topic, partition) || (low = log_start(topic, partition)) < 0)
				continue;
			if (sharing && !claims_admit(topic, partition, &low, false))
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
			add_part(topic, partition, low);
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
