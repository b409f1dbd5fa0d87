/*-------------------------------------------------------------------------
 *
 * consumer_status.c
 *	  The ingest worker's state as others see it: errors (its own and those
 *	  librdkafka reports on its threads) and the error-state rule, the rows of
 *	  spool.source_runtime and spool.partition_runtime, and the broker-side
 *	  commit of durable offsets for lag monitoring.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"

#define COMMIT_INTERVAL_MS	5000
#define ERROR_QUIET_MS		35000	/* no error for this long: state back to running;
									 * longer than librdkafka's 30 s suppression of a
									 * repeated identical error, so an outage stays
									 * visible */

static char *last_error = NULL;
static TimestampTz last_error_at = 0;
const char *state = "starting";
uint64		errors = 0;			/* since the server started (from stats) */
static TimestampTz last_status = 0;
static TimestampTz last_commit = 0;
static SPIPlanPtr plan_source_runtime;
static SPIPlanPtr plan_partition_runtime;
static SPIPlanPtr plan_durable_offsets;

static void take_kafka_error(void);
static void note_error(int part, const char *msg);
static void write_source_runtime(void);
static void write_partition_runtime(double secs);
static void commit_offsets_to_broker(void);

/*
 * Errors librdkafka reports on its own threads (a broker down, a failed
 * connection) are copied here under a mutex and taken over by the main
 * loop: no PostgreSQL function may run on those threads.
 */
static pthread_mutex_t kafka_error_mutex = PTHREAD_MUTEX_INITIALIZER;
static char kafka_error[512];
static bool kafka_error_pending = false;

void
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
void
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
void
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
		/* The source's count: its other workers add theirs. */
		LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
		errors = ++stats->errors;
		LWLockRelease(spool_ingest_shared->lock);
	}
}

/*
 * The worker's row of spool.source_runtime.  Several workers of one source
 * write the same row: each its own pid and state, and the latest error of
 * any of them stays until a later one replaces it.
 */
static void
write_source_runtime(void)
{
	Datum		v[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};

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
	if (stats)
	{
		LWLockAcquire(spool_ingest_shared->lock, LW_SHARED);
		errors = stats->errors;
		LWLockRelease(spool_ingest_shared->lock);
	}
	v[5] = Int64GetDatum((int64) errors);
	v[6] = BoolGetDatum(opts->workers > 1);
	spool_plan(&plan_source_runtime,
			   "INSERT INTO spool.source_runtime AS r"
			   " (source, pid, state, last_error, last_error_at, errors, updated_at)"
			   " VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())"
			   " ON CONFLICT (source) DO UPDATE SET pid = EXCLUDED.pid,"
			   " state = EXCLUDED.state,"
			   " last_error = CASE WHEN $7 AND r.last_error_at > coalesce(EXCLUDED.last_error_at, '-infinity')"
			   "                   THEN r.last_error ELSE EXCLUDED.last_error END,"
			   " last_error_at = CASE WHEN $7 AND r.last_error_at > coalesce(EXCLUDED.last_error_at, '-infinity')"
			   "                      THEN r.last_error_at ELSE EXCLUDED.last_error_at END,"
			   " errors = EXCLUDED.errors, updated_at = EXCLUDED.updated_at",
			   7, (Oid[]) {TEXTOID, INT4OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, INT8OID, BOOLOID});
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
void
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
	/*
	 * A source sharing its topics commits claims instead (consumer_claims.c):
	 * a commit without a claim would erase another server's.  Of several
	 * workers, the first commits every partition's offset.
	 */
	if (rk && opts->share == NULL && opts->npartitions == 0 && worker_index == 0 &&
		now - last_commit >= (int64) COMMIT_INTERVAL_MS * 1000)
	{
		last_commit = now;
		commit_offsets_to_broker();
	}
	if (own_xact)
		spool_end_txn();
}
