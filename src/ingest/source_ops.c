/*-------------------------------------------------------------------------
 *
 * source_ops.c
 *	  Operating a source that has data: seek_source (move a partition to an
 *	  offset or a time) and replay_dead_letter.  Both only record a request
 *	  and bump the source's config_version; the launcher restarts the ingest
 *	  worker, which applies the request at its start, once nothing of the
 *	  source is left in staging (consumer_pending.c), so the stored offsets, the
 *	  staged rows and the worker's position can never disagree.
 *
 *	  seek_source checks at call time what it can: the rewind rule against
 *	  the durable offset, and, asking the brokers, that the partition exists
 *	  and the offset lies in its log (a time is resolved to an offset here,
 *	  with ListOffsets, as any Kafka client does).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"
#include "kafka/kafka.h"

PG_FUNCTION_INFO_V1(spool_seek_source);
PG_FUNCTION_INFO_V1(spool_replay_dead_letter);

#define SEEK_KAFKA_TIMEOUT_MS 5000

/* What the brokers say about one partition. */
typedef struct PartitionLog
{
	int64		low;			/* log start */
	int64		high;			/* log end (high watermark) */
	int64		at_time;		/* first offset at or after the time; -1 */
} PartitionLog;

/* A seek as asked for: seek_source's arguments, checked. */
typedef struct SeekRequest
{
	char	   *name;
	char	   *topic;
	int32		partition;
	int64		to_offset;		/* -1: to_time given */
	int64		time_ms;		/* to_time in unix ms; -1: to_offset given */
	bool		allow_rewind;
} SeekRequest;

/* The source as the seek needs it: read under FOR UPDATE. */
typedef struct SeekSource
{
	Oid			owner;
	char	   *brokers;
	Jsonb	   *options;
	int64		durable;		/* the partition's next_offset; -1: none stored */
} SeekSource;

static void check_rewind(const char *name, const char *topic, int32 partition,
						 int64 durable, int64 to_offset, bool allow_rewind);
static void ask_partition(const char *name, const char *brokers, Jsonb *options,
						  Oid owner, const char *topic, int32 partition,
						  int64 time_ms, PartitionLog *log);
static int64 offset_for(rd_kafka_t *rk, const char *topic, int32 partition,
						int64 which, rd_kafka_resp_err_t *err);
static void seek_args(FunctionCallInfo fcinfo, SeekRequest *req);
static void seek_read_source(const SeekRequest *req, Oid role, SeekSource *src);
static int64 seek_resolve(const SeekRequest *req, const SeekSource *src);
static Datum seek_record(const SeekRequest *req, int64 to_offset, Datum to_time,
						 bool time_null, Oid role);

/* SP001 when to_offset goes back over what is durable and no rewind is allowed. */
static void
check_rewind(const char *name, const char *topic, int32 partition, int64 durable,
			 int64 to_offset, bool allow_rewind)
{
	if (allow_rewind || durable < 0 || to_offset >= durable)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("seek of source \"%s\" to offset " INT64_FORMAT " of %s [%d] would go back over spooled data",
					name, to_offset, topic, partition),
			 errdetail("Offsets " INT64_FORMAT " to " INT64_FORMAT " are in the spool already.",
					   to_offset, durable - 1),
			 errhint("Pass allow_rewind => true to spool them again; the rewind is recorded in spool.source_seeks.")));
}

/* One ListOffsets answer: which is a time in unix ms, or BEGINNING / END. */
static int64
offset_for(rd_kafka_t *rk, const char *topic, int32 partition, int64 which,
		   rd_kafka_resp_err_t *err)
{
	rd_kafka_topic_partition_list_t *q = rd_kafka_topic_partition_list_new(1);
	int64		offset;

	rd_kafka_topic_partition_list_add(q, topic, partition)->offset = which;
	*err = rd_kafka_offsets_for_times(rk, q, SEEK_KAFKA_TIMEOUT_MS);
	if (*err == RD_KAFKA_RESP_ERR_NO_ERROR)
		*err = q->elems[0].err;
	offset = q->elems[0].offset;
	rd_kafka_topic_partition_list_destroy(q);
	return offset;
}

/*
 * Ask the source's brokers (with the source's configuration, as its owner
 * may use it) whether the partition exists, where its log starts and ends,
 * and, with time_ms >= 0, the first offset at or after that time.
 */
static void
ask_partition(const char *name, const char *brokers, Jsonb *options, Oid owner,
			  const char *topic, int32 partition, int64 time_ms, PartitionLog *log)
{
	SpoolSourceOptions *o = spool_parse_source_options(options);
	char		errbuf[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt;
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;
	char	   *failed = NULL;
	int			nparts = -1;

	spool_kafka_policy_check(brokers, o->nkafka, (const char *const *) o->kafka_keys,
							 (const char *const *) o->kafka_values, owner, "source", name);
	conf = spool_kafka_conf(brokers, o, "spool_ext.seek", errbuf, sizeof(errbuf));
	if (conf == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("invalid Kafka configuration for source \"%s\"", name),
				 errdetail("%s", errbuf)));
	rd_kafka_conf_set(conf, "allow.auto.create.topics", "false", NULL, 0);
	rk = spool_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf, sizeof(errbuf));
	if (rk == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("invalid Kafka configuration for source \"%s\"", name),
				 errdetail("%s", errbuf)));

	rkt = rd_kafka_topic_new(rk, topic, NULL);
	err = rd_kafka_metadata(rk, 0, rkt, &md, SEEK_KAFKA_TIMEOUT_MS);
	rd_kafka_topic_destroy(rkt);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		failed = pstrdup(rd_kafka_err2str(err));
	else if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
		nparts = md->topics[0].partition_cnt;
	else
		nparts = 0;
	if (md)
		rd_kafka_metadata_destroy(md);

	if (failed == NULL && partition < nparts)
	{
		log->low = offset_for(rk, topic, partition, RD_KAFKA_OFFSET_BEGINNING, &err);
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
			log->high = offset_for(rk, topic, partition, RD_KAFKA_OFFSET_END, &err);
		log->at_time = -1;
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR && time_ms >= 0)
			log->at_time = offset_for(rk, topic, partition, time_ms, &err);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			failed = pstrdup(rd_kafka_err2str(err));
	}
	rd_kafka_destroy(rk);

	if (failed)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not ask Kafka at \"%s\" about %s [%d]: %s",
						brokers, topic, partition, failed),
				 errdetail("Nothing was changed.")));
	if (partition >= nparts)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("Kafka topic \"%s\" has no partition %d", topic, partition),
				 errdetail("The brokers at \"%s\" know %d partitions of it.", brokers, Max(nparts, 0))));
}

/* seek_source's arguments: SP001 for a NULL, negative or missing one. */
static void
seek_args(FunctionCallInfo fcinfo, SeekRequest *req)
{
	req->name = spool_arg_name(fcinfo, 0, "name");
	req->topic = spool_arg_name(fcinfo, 1, "topic");
	req->to_offset = -1;
	req->time_ms = -1;
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("kafka_partition must not be null")));
	req->partition = PG_GETARG_INT32(2);
	if (req->partition < 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("kafka_partition must not be negative")));
	if (PG_ARGISNULL(3) == PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("give either to_offset or to_time"),
				 errhint("to_offset is a Kafka offset; to_time seeks to the first message at or after that time.")));
	if (!PG_ARGISNULL(3))
		req->to_offset = spool_arg_int64(fcinfo, 3, "to_offset", true);
	else
	{
		TimestampTz t = PG_GETARG_TIMESTAMPTZ(4);

		if (TIMESTAMP_NOT_FINITE(t))
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("to_time must be finite")));
		/* Microseconds since 2000 to Kafka's milliseconds since 1970. */
		req->time_ms = t / 1000 + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;
		if (req->time_ms < 0)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("to_time must not be before 1970")));
	}
	if (PG_ARGISNULL(5))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("allow_rewind must not be null")));
	req->allow_rewind = PG_GETARG_BOOL(5);
}

/*
 * The source's row (locked: the seek is recorded against it), checked to be
 * the caller's and to read the topic, and the partition's durable offset.
 */
static void
seek_read_source(const SeekRequest *req, Oid role, SeekSource *src)
{
	Datum		v[3];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Datum	   *elems;
	int			ntopics;
	bool		reads_topic = false;

	v[0] = CStringGetTextDatum(req->name);
	if (SPI_execute_with_args("SELECT owner, brokers, options, topics FROM spool.sources"
							  " WHERE name = $1 FOR UPDATE",
							  1, (Oid[]) {TEXTOID}, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.sources");
	tup = spool_owned_row("source", req->name, 1, role);
	desc = SPI_tuptable->tupdesc;
	src->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 1, &isnull));
	src->brokers = SPI_getvalue(tup, desc, 2);
	src->options = DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 3, &isnull));
	deconstruct_array(DatumGetArrayTypePCopy(SPI_getbinval(tup, desc, 4, &isnull)),
					  TEXTOID, -1, false, TYPALIGN_INT, &elems, NULL, &ntopics);
	for (int i = 0; i < ntopics; i++)
		reads_topic |= strcmp(TextDatumGetCString(elems[i]), req->topic) == 0;
	if (!reads_topic)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("source \"%s\" does not read topic \"%s\"", req->name, req->topic)));

	v[1] = CStringGetTextDatum(req->topic);
	v[2] = Int32GetDatum(req->partition);
	if (SPI_execute_with_args("SELECT next_offset FROM spool.offsets"
							  " WHERE source = $1 AND topic = $2 AND kafka_partition = $3",
							  3, (Oid[]) {TEXTOID, TEXTOID, INT4OID}, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.offsets");
	src->durable = -1;
	if (SPI_processed == 1)
		src->durable = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Ask the brokers: the partition must exist and the offset (a time is
 * resolved to one here) lie in its log; then the rewind rule once more.
 * Returns the offset to seek to.
 */
static int64
seek_resolve(const SeekRequest *req, const SeekSource *src)
{
	PartitionLog log = {0, 0, -1};
	int64		to_offset = req->to_offset;

	ask_partition(req->name, src->brokers, src->options, src->owner, req->topic,
				  req->partition, req->time_ms, &log);
	if (req->time_ms >= 0)
		to_offset = log.at_time >= 0 ? log.at_time : log.high;
	if (to_offset < log.low || to_offset > log.high)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("offset " INT64_FORMAT " is not in the log of %s [%d]", to_offset, req->topic, req->partition),
				 errdetail("Kafka holds offsets " INT64_FORMAT " to " INT64_FORMAT " of it; " INT64_FORMAT " is its end.",
						   log.low, log.high - 1, log.high)));
	check_rewind(req->name, req->topic, req->partition, src->durable, to_offset, req->allow_rewind);
	return to_offset;
}

/*
 * Record the pending seek and move the source's config_version (so the
 * launcher restarts its worker); returns the new spool.source_seeks row.
 */
static Datum
seek_record(const SeekRequest *req, int64 to_offset, Datum to_time, bool time_null,
			Oid role)
{
	Datum		v[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};

	v[0] = CStringGetTextDatum(req->name);
	v[1] = CStringGetTextDatum(req->topic);
	v[2] = Int32GetDatum(req->partition);
	v[3] = Int64GetDatum(to_offset);
	v[4] = time_null ? (Datum) 0 : to_time;
	nulls[4] = time_null ? 'n' : ' ';
	v[5] = BoolGetDatum(req->allow_rewind);
	v[6] = ObjectIdGetDatum(role);
	if (SPI_execute_with_args("WITH v AS (UPDATE spool.sources SET config_version = config_version + 1"
							  "            WHERE name = $1)"
							  " INSERT INTO spool.source_seeks (source, topic, kafka_partition, to_offset,"
							  "   to_time, allow_rewind, requested_by)"
							  " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
							  7, (Oid[]) {TEXTOID, TEXTOID, INT4OID, INT8OID, TIMESTAMPTZOID, BOOLOID, OIDOID},
							  v, nulls, false, 0) != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "could not record the seek");
	return PointerGetDatum(SPI_returntuple(SPI_tuptable->vals[0], SPI_tuptable->tupdesc));
}

/*
 * SQL: spool.seek_source(name, topic, kafka_partition, to_offset, to_time,
 * allow_rewind) RETURNS spool.source_seeks.  Exactly one of to_offset and
 * to_time.  Records a pending seek (the ingest worker applies it at its
 * next start, which the launcher brings about) and returns its row.
 */
Datum
spool_seek_source(PG_FUNCTION_ARGS)
{
	SeekRequest req;
	SeekSource	src;
	int64		to_offset;
	Datum		result;
	SpoolCaller caller;

	spool_require_pipeline_database("source");
	seek_args(fcinfo, &req);

	spool_enter(&caller);
	SPI_connect();
	seek_read_source(&req, caller.role, &src);
	/* Fail fast, without the network, where we can. */
	if (req.to_offset >= 0)
		check_rewind(req.name, req.topic, req.partition, src.durable, req.to_offset, req.allow_rewind);
	to_offset = seek_resolve(&req, &src);
	result = seek_record(&req, to_offset, PG_ARGISNULL(4) ? (Datum) 0 : PG_GETARG_DATUM(4),
						 PG_ARGISNULL(4), caller.role);
	SPI_finish();
	spool_leave(&caller);
	spool_wake_launcher();
	PG_RETURN_DATUM(result);
}

/*
 * SQL: spool.replay_dead_letter(id).  Marks the dead letter for replay; the
 * source's ingest worker re-reads the message from Kafka at its next start
 * (brought about by the launcher) and puts it through the source's current
 * checks: it becomes an entry with a new cursor (the dead letter gets
 * replayed_at and replay_cursor, in the promotion's transaction), or the
 * dead letter keeps the new error.  Asking again for a pending replay is
 * harmless; a replayed dead letter cannot be replayed again.
 */
Datum
spool_replay_dead_letter(PG_FUNCTION_ARGS)
{
	int64		id = spool_arg_int64(fcinfo, 0, "id", true);
	Datum		v[1] = {Int64GetDatum(id)};
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	char	   *source;
	SpoolCaller caller;

	spool_require_pipeline_database("source");
	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args("SELECT d.source, s.owner, d.replay_cursor, s.name IS NULL"
							  " FROM spool.dead_letters d LEFT JOIN spool.sources s ON s.name = d.source"
							  " WHERE d.id = $1 FOR UPDATE OF d",
							  1, (Oid[]) {INT8OID}, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.dead_letters");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("dead letter " INT64_FORMAT " does not exist", id),
				 errhint("spool.dead_letters lists them.")));
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	source = SPI_getvalue(tup, desc, 1);
	if (DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull)))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("source \"%s\" of dead letter " INT64_FORMAT " does not exist", source, id)));
	spool_check_owner(caller.role, DatumGetObjectId(SPI_getbinval(tup, desc, 2, &isnull)),
					  "source", source);
	(void) SPI_getbinval(tup, desc, 3, &isnull);
	if (!isnull)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("dead letter " INT64_FORMAT " was replayed already", id),
				 errdetail("Its message is the entry with cursor %s.", SPI_getvalue(tup, desc, 3))));
	if (SPI_execute_with_args("WITH d AS (UPDATE spool.dead_letters SET replay_requested_at = now()"
							  "            WHERE id = $1 RETURNING source)"
							  " UPDATE spool.sources s SET config_version = config_version + 1"
							  "   FROM d WHERE s.name = d.source",
							  1, (Oid[]) {INT8OID}, v, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not request the replay of dead letter " INT64_FORMAT, id);
	SPI_finish();
	spool_leave(&caller);
	spool_wake_launcher();
	PG_RETURN_VOID();
}
