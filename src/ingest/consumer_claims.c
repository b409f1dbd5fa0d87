/*-------------------------------------------------------------------------
 *
 * consumer_claims.c
 *	  Servers sharing a topic (source options "share" and "partitions"):
 *	  which server consumes a partition is said in the source's Kafka
 *	  consumer group.  Every CLAIM_INTERVAL_MS the ingest worker commits,
 *	  for each partition it consumes, the partition's durable next offset
 *	  with metadata naming this server and source (system identifier,
 *	  database, source) and the time: a claim.
 *
 *	  Before it consumes a partition, the worker reads the group's committed
 *	  offset and metadata for it:
 *	  - another server's claim younger than claim_timeout: the partition is
 *	    not consumed here (the shares overlap: refused with a WARNING, and
 *	    looked at again every interval);
 *	  - another server's release, or a claim older than claim_timeout: the
 *	    partition is taken over at the committed offset, which is where that
 *	    server's spool ends, unless this server's own stored offset is
 *	    further (offsets never go back); the offsets between are recorded as
 *	    a gap with action 'handover';
 *	  - this server's own claim, or none: consumed from the stored offset.
 *	  A partition this server stored offsets for and no longer consumes (its
 *	  share changed) is released once nothing of it is staged any more: its
 *	  durable next offset is committed with a release.  A consumed partition
 *	  whose committed claim turns out to be another server's (both claimed it
 *	  at once) is given up.
 *
 *	  Claims are advisory, not consensus: two servers that start with
 *	  overlapping shares within one interval of each other both consume the
 *	  partition until one sees the other's claim (docs/sources.md).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"

#define CLAIM_INTERVAL_MS	5000
#define COMMITTED_TIMEOUT_MS 5000	/* before consuming a partition */
#define CHECK_TIMEOUT_MS	1000	/* the check of consumed ones, each pass */
#define CLAIM_MAGIC			"spool_ext/1"
#define CLAIM_ID_MAX		(24 + NAMEDATALEN + SPOOL_SOURCE_NAME_MAX + 4)

typedef enum ClaimKind
{
	CLAIM_NONE,					/* no commit, or not one of ours */
	CLAIM_MINE,					/* this server's claim or release */
	CLAIM_LIVE,					/* another server's recent claim */
	CLAIM_FREE					/* another server's release or stale claim */
} ClaimKind;

/* A partition waiting: refused (to retry) or to release once drained. */
typedef struct Waiting
{
	char	   *topic;
	int32		partition;
	bool		release;
} Waiting;

bool		sharing = false;
static List *waiting = NIL;
static bool claimed_once = false;	/* the first claims were committed */
static TimestampTz next_claims = 0;
static char identity[CLAIM_ID_MAX];

static ClaimKind read_claim(const rd_kafka_topic_partition_t *e, int64 *offset,
							char *holder, size_t holder_len);
static void take_over(const char *topic, int32 partition, int64 from, int64 to,
					  const char *holder);
static bool commit_claims(void);
static void release_drained(void);
static rd_kafka_resp_err_t commit_bounded(rd_kafka_topic_partition_list_t *l);
static void wait_for(const char *topic, int32 partition, bool release);
static void set_metadata(rd_kafka_topic_partition_t *e, const char *meta);
static long long unix_ms(void);
static int64 stored_offset(const char *topic, int32 partition, bool drained);

/*
 * Set up before (each attempt at) assigning: whether the source shares its
 * topics, this server's name, and no partition waiting yet.
 */
void
claims_init(void)
{
	sharing = opts->share != NULL || opts->npartitions > 0;
	if (identity[0] == '\0')
	{
		spool_begin_txn("naming this server");
		snprintf(identity, sizeof(identity), UINT64_FORMAT ":%s:%s",
				 GetSystemIdentifier(), get_database_name(MyDatabaseId), source_name);
		spool_end_txn();
	}
	waiting = NIL;
	next_claims = 0;
	claimed_once = false;
}

/* Whether topic [partition] waits here (refused, or to be released). */
bool
claims_waiting(const char *topic, int32 partition)
{
	ListCell   *lc;

	foreach(lc, waiting)
	{
		Waiting    *w = lfirst(lc);

		if (w->partition == partition && strcmp(w->topic, topic) == 0)
			return true;
	}
	return false;
}

/* A partition this server stored offsets for but does not consume now. */
void
claims_note_release(const char *topic, int32 partition)
{
	wait_for(topic, partition, true);
}

/*
 * Whether this server may consume topic [partition], starting at *offset
 * (its resume offset, or a logical one), which a takeover moves.  A refused
 * partition (or one the brokers could not tell about) is kept to be asked
 * again at the next claims pass; quiet: it was, and the WARNING was said.
 */
bool
claims_admit(const char *topic, int32 partition, int64 *offset, bool quiet)
{
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
	rd_kafka_resp_err_t err;
	ClaimKind	kind = CLAIM_NONE;
	int64		committed = -1;
	char		holder[CLAIM_ID_MAX] = "";

	rd_kafka_topic_partition_list_add(l, topic, partition);
	err = rd_kafka_committed(rk, l, COMMITTED_TIMEOUT_MS);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		err = l->elems[0].err;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		kind = read_claim(&l->elems[0], &committed, holder, sizeof(holder));
	rd_kafka_topic_partition_list_destroy(l);

	if (err != RD_KAFKA_RESP_ERR_NO_ERROR || kind == CLAIM_LIVE)
	{
		if (quiet)
			;					/* said when it was first refused */
		else if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			ereport(WARNING,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("source \"%s\": cannot read the claim of %s [%d] in group \"%s\": %s",
							source_name, topic, partition, opts->group_id ? opts->group_id : default_group,
							rd_kafka_err2str(err)),
					 errdetail("The partition is consumed once the claims can be read.")));
		else
			ereport(WARNING,
					(errcode(ERRCODE_OBJECT_IN_USE),
					 errmsg("source \"%s\": partition %s [%d] is consumed by another server (%s)",
							source_name, topic, partition, holder),
					 errdetail("Servers sharing a topic must have shares that do not overlap; this server does not consume the partition while the other one claims it."),
					 errhint("Check the \"share\" or \"partitions\" option of the source on both servers.")));
		wait_for(topic, partition, false);
		return false;
	}
	if (kind == CLAIM_FREE && committed >= 0 && committed > *offset)
	{
		take_over(topic, partition, *offset, committed, holder);
		*offset = committed;
	}
	return true;
}

/*
 * What the group's commit of a partition says.  Metadata:
 * "spool_ext/1 <claim|release> <unix ms> <system id>:<database>:<source>".
 */
static ClaimKind
read_claim(const rd_kafka_topic_partition_t *e, int64 *offset, char *holder,
		   size_t holder_len)
{
	char		meta[512];
	char		what[16];
	long long	ms;
	int			used = 0;
	int64		age_ms;

	*offset = e->offset;
	if (e->offset < 0 || e->metadata == NULL || e->metadata_size == 0 ||
		e->metadata_size >= sizeof(meta))
		return CLAIM_NONE;
	memcpy(meta, e->metadata, e->metadata_size);
	meta[e->metadata_size] = '\0';
	if (strncmp(meta, CLAIM_MAGIC " ", strlen(CLAIM_MAGIC) + 1) != 0 ||
		sscanf(meta + strlen(CLAIM_MAGIC) + 1, "%15s %lld %n", what, &ms, &used) != 2 ||
		used == 0)
		return CLAIM_NONE;
	strlcpy(holder, meta + strlen(CLAIM_MAGIC) + 1 + used, holder_len);
	if (strcmp(holder, identity) == 0)
		return CLAIM_MINE;
	if (strcmp(what, "release") == 0)
		return CLAIM_FREE;
	age_ms = unix_ms() - ms;
	return age_ms < opts->claim_timeout_ms ? CLAIM_LIVE : CLAIM_FREE;
}

/*
 * Start topic [partition] at the offset another server released (or last
 * claimed): store it, and record the offsets this spool skips as a gap.
 */
static void
take_over(const char *topic, int32 partition, int64 from, int64 to, const char *holder)
{
	spool_begin_txn("taking over a partition");
	if (SPI_execute_with_args("INSERT INTO spool.offsets (source, topic, kafka_partition,"
							  " next_offset, updated_at) VALUES ($1, $2, $3, $4, clock_timestamp())"
							  " ON CONFLICT (source, topic, kafka_partition) DO UPDATE"
							  " SET next_offset = greatest(spool.offsets.next_offset, EXCLUDED.next_offset),"
							  " updated_at = EXCLUDED.updated_at",
							  4, (Oid[]) {TEXTOID, TEXTOID, INT4OID, INT8OID},
							  (Datum[]) {CStringGetTextDatum(source_name), CStringGetTextDatum(topic),
								  Int32GetDatum(partition), Int64GetDatum(to)},
							  NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not store the offset of a partition taken over");
	if (from >= 0 &&
		SPI_execute_with_args("INSERT INTO spool.gaps (source, topic, kafka_partition,"
							  " from_offset, to_offset, action) VALUES ($1, $2, $3, $4, $5, 'handover')",
							  5, (Oid[]) {TEXTOID, TEXTOID, INT4OID, INT8OID, INT8OID},
							  (Datum[]) {CStringGetTextDatum(source_name), CStringGetTextDatum(topic),
								  Int32GetDatum(partition), Int64GetDatum(from), Int64GetDatum(to)},
							  NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record the offsets another server consumed");
	spool_end_txn();
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("source \"%s\": partition %s [%d] taken over from %s at offset " INT64_FORMAT,
					source_name, topic, partition, holder, to)));
}

/*
 * Every CLAIM_INTERVAL_MS, between batches: ask again about refused
 * partitions, release drained ones, and claim (or give up) those consumed.
 * With now, at once (right after the partitions were assigned).
 */
void
claims_pass(bool now_)
{
	TimestampTz now = GetCurrentTimestamp();
	List	   *retry;
	ListCell   *lc;
	bool		changed = false;

	if (!sharing || (!now_ && now < next_claims))
		return;
	next_claims = TimestampTzPlusMilliseconds(now, Min(CLAIM_INTERVAL_MS, opts->claim_timeout_ms / 3));

	release_drained();
	retry = waiting;
	waiting = NIL;
	foreach(lc, retry)
	{
		Waiting    *w = lfirst(lc);
		int64		offset;

		if (w->release)
		{
			waiting = lappend(waiting, w);
			continue;
		}
		offset = stored_offset(w->topic, w->partition, false);
		if (!claims_admit(w->topic, w->partition, &offset, true))
			continue;
		add_part(w->topic, w->partition, offset);
		changed = true;
	}
	if (commit_claims())
		changed = true;
	if (changed)
	{
		reassign_all();
		refresh_status(true);
	}
}

/*
 * Claim every consumed partition at its durable next offset (or, before
 * anything of it is durable, where it started, or its log start).  A partition whose
 * committed claim is another server's is given up.  The claims are
 * committed even when the brokers do not tell the committed ones in time
 * (a claim not renewed lapses).  Returns whether the assignment changed.
 */
static bool
commit_claims(void)
{
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(Max(nparts, 1));
	rd_kafka_resp_err_t err;
	char	   *meta = psprintf(CLAIM_MAGIC " claim %lld %s", unix_ms(), identity);
	bool		changed = false;
	int			i;

	for (i = 0; i < nparts; i++)
		rd_kafka_topic_partition_list_add(l, parts[i].topic, parts[i].partition);
	err = rd_kafka_committed(rk, l, CHECK_TIMEOUT_MS);
	for (i = nparts - 1; i >= 0; i--)
	{
		rd_kafka_topic_partition_t *e = &l->elems[i];
		int64		committed;
		char		holder[CLAIM_ID_MAX] = "";

		if (err == RD_KAFKA_RESP_ERR_NO_ERROR && e->err == RD_KAFKA_RESP_ERR_NO_ERROR &&
			read_claim(e, &committed, holder, sizeof(holder)) == CLAIM_LIVE)
		{
			ereport(WARNING,
					(errcode(ERRCODE_OBJECT_IN_USE),
					 errmsg("source \"%s\": partition %s [%d] is claimed by another server (%s): giving it up",
							source_name, parts[i].topic, parts[i].partition, holder),
					 errhint("Check the \"share\" or \"partitions\" option of the source on both servers.")));
			(void) claims_admit(parts[i].topic, parts[i].partition, &committed, true);
			drop_part(i);
			rd_kafka_topic_partition_list_del_by_idx(l, i);
			changed = true;
			continue;
		}
		e->offset = stored_offset(parts[i].topic, parts[i].partition, false);
		if (e->offset < 0 && parts[i].start < 0)
			parts[i].start = log_start(parts[i].topic, parts[i].partition);
		if (e->offset < 0)
			e->offset = parts[i].start;
		if (e->offset < 0)
		{
			rd_kafka_topic_partition_list_del_by_idx(l, i);
			continue;
		}
		set_metadata(e, meta);
	}
	if (l->cnt > 0)
	{
		err = commit_bounded(l);
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR && !claimed_once)
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("source \"%s\": claimed %d partitions in group \"%s\"",
							source_name, l->cnt, opts->group_id ? opts->group_id : default_group)));
		else if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("source \"%s\": could not commit claims: %s",
							source_name, rd_kafka_err2str(err))));
		claimed_once |= err == RD_KAFKA_RESP_ERR_NO_ERROR;
	}
	rd_kafka_topic_partition_list_destroy(l);
	return changed;
}

/*
 * Release each partition this server no longer consumes once nothing of it
 * is staged: commit its durable next offset with a release (unless another
 * server claims it by now).
 */
static void
release_drained(void)
{
	ListCell   *lc;
	List	   *keep = NIL;
	char	   *meta = psprintf(CLAIM_MAGIC " release %lld %s", unix_ms(), identity);

	foreach(lc, waiting)
	{
		Waiting    *w = lfirst(lc);
		rd_kafka_topic_partition_list_t *l;
		int64		durable;
		int64		committed;
		char		holder[CLAIM_ID_MAX] = "";

		if (!w->release)
		{
			keep = lappend(keep, w);
			continue;
		}
		durable = stored_offset(w->topic, w->partition, true);
		if (durable < 0)
		{
			keep = lappend(keep, w);	/* still staged: next time */
			continue;
		}
		l = rd_kafka_topic_partition_list_new(1);
		rd_kafka_topic_partition_list_add(l, w->topic, w->partition);
		if (rd_kafka_committed(rk, l, COMMITTED_TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR ||
			l->elems[0].err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			rd_kafka_topic_partition_list_destroy(l);
			keep = lappend(keep, w);
			continue;
		}
		if (read_claim(&l->elems[0], &committed, holder, sizeof(holder)) != CLAIM_LIVE)
		{
			l->elems[0].offset = durable;
			set_metadata(&l->elems[0], meta);
			if (commit_bounded(l) != RD_KAFKA_RESP_ERR_NO_ERROR)
			{
				rd_kafka_topic_partition_list_destroy(l);
				keep = lappend(keep, w);	/* try again next time */
				continue;
			}
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("source \"%s\": partition %s [%d] released at offset " INT64_FORMAT,
							source_name, w->topic, w->partition, durable)));
		}
		rd_kafka_topic_partition_list_destroy(l);
	}
	waiting = keep;
}

/* Commit l and wait for the brokers' answer, at most COMMITTED_TIMEOUT_MS. */
static rd_kafka_resp_err_t
commit_bounded(rd_kafka_topic_partition_list_t *l)
{
	rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
	rd_kafka_resp_err_t err = rd_kafka_commit_queue(rk, l, q, NULL, NULL);

	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		rd_kafka_event_t *ev = rd_kafka_queue_poll(q, COMMITTED_TIMEOUT_MS);

		err = ev ? rd_kafka_event_error(ev) : RD_KAFKA_RESP_ERR__TIMED_OUT;
		if (ev)
			rd_kafka_event_destroy(ev);
	}
	rd_kafka_queue_destroy(q);
	return err;
}

/*
 * The stored next offset of topic [partition], -1 if none; with drained,
 * also -1 while rows of it are staged (staging_snapshot_txn: staging and
 * the offsets are seen in step).
 */
static int64
stored_offset(const char *topic, int32 partition, bool drained)
{
	int64		next = -1;
	bool		isnull;

	staging_snapshot_txn("reading where a partition stands");
	if (SPI_execute_with_args("SELECT o.next_offset FROM spool.offsets o"
							  " WHERE o.source = $1 AND o.topic = $2 AND o.kafka_partition = $3"
							  "   AND NOT ($4 AND EXISTS (SELECT 1 FROM spool.staging s WHERE s.source = $1"
							  "   AND s.topic = $2 AND s.kafka_partition = $3))",
							  4, (Oid[]) {TEXTOID, TEXTOID, INT4OID, BOOLOID},
							  (Datum[]) {CStringGetTextDatum(source_name), CStringGetTextDatum(topic),
								  Int32GetDatum(partition), BoolGetDatum(drained)},
							  NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the offset of %s [%d]", topic, partition);
	if (SPI_processed == 1)
		next = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	spool_end_txn();
	return next;
}

/* Keep topic [partition] waiting: to ask again, or to release once drained. */
static void
wait_for(const char *topic, int32 partition, bool release)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	Waiting    *w = palloc(sizeof(Waiting));

	w->topic = pstrdup(topic);
	w->partition = partition;
	w->release = release;
	waiting = lappend(waiting, w);
	MemoryContextSwitchTo(old);
}

/* The commit metadata of e (librdkafka frees it with the list). */
static void
set_metadata(rd_kafka_topic_partition_t *e, const char *meta)
{
	if (e->metadata)
		free(e->metadata);
	e->metadata = strdup(meta);
	e->metadata_size = strlen(meta);
}

/* Now, in milliseconds since 1970: claims are read by other servers. */
static long long
unix_ms(void)
{
	return (long long) (GetCurrentTimestamp() / 1000 +
						(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * (int64) SECS_PER_DAY * 1000);
}
