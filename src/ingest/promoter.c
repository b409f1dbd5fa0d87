/*-------------------------------------------------------------------------
 *
 * promoter.c
 *	  The promoter: moves staged rows into the WAL-logged spool in one
 *	  transaction that also stores each partition's next offset (I-3),
 *	  assigns cursors in commit order (I-2), records dead letters and gaps,
 *	  creates segments ahead of the cursor and drops the ones every consumer
 *	  has passed (retention).
 *
 * Cursor order: the promotion transaction locks the single spool_state row
 * before it assigns cursors and keeps it until commit, so promotions commit
 * one after another in cursor order and a reader's snapshot always sees a
 * prefix of the cursors.
 *
 * Exactly once (I-1): the ingest worker stages each offset once (a restarted
 * worker resumes after what is staged), the promoter moves a staging table
 * out whole and the stored offset moves in the same transaction.  Per
 * source, batches are staged in offset order and every batch written before
 * a flip of the staging tables is promoted before any batch written after.
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
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"

SpoolIngestShared *spool_ingest_shared = NULL;

PGDLLEXPORT void spool_promoter_main(Datum main_arg);

#define RETENTION_INTERVAL_MS 10000

static void promoter_detach(int code, Datum arg);
static uint64 promote_once(bool flip);
static void ensure_segments(int64 upto);
static void seal_and_count(int64 lo, int64 n, bool dense);
static const char *segment_for(int64 lo, int64 hi);
static void retention(void);
static int64 spi_int8(const char *sql);

void
spool_wake_promoter(void)
{
	Latch	   *latch = spool_ingest_shared->promoter_latch;

	if (latch)
		SetLatch(latch);
}

static void
promoter_detach(int code, Datum arg)
{
	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	if (spool_ingest_shared->promoter_latch == MyLatch)
		spool_ingest_shared->promoter_latch = NULL;
	LWLockRelease(spool_ingest_shared->lock);
}

static int64
spi_int8(const char *sql)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute(sql, false, 0) < 0 || SPI_processed != 1)
		elog(ERROR, "query returned no row: %s", sql);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? -1 : DatumGetInt64(d);
}

/*
 * Segments are partitions spool.entries_<n> of spool.entries, each covering
 * spool.segment_size cursors.  Create them (ATTACH, which does not block
 * readers) until one covers upto plus a quarter segment of headroom.
 */
static void
ensure_segments(int64 upto)
{
	int64		hi = spi_int8("SELECT coalesce(max(hi), 1) FROM spool.segment_info");
	int64		seg = spi_int8("SELECT coalesce(max(segment), 0) FROM spool.segment_info");
	int64		target = upto + Max(spool_segment_size / 4, 1);

	while (hi <= target)
	{
		int64		lo = hi;
		char	   *sql;

		hi = lo + spool_segment_size;
		seg++;
		sql = psprintf("CREATE TABLE spool.entries_" INT64_FORMAT
					   " (LIKE spool.entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
					   " INCLUDING STORAGE);"
					   " ALTER TABLE spool.entries ATTACH PARTITION spool.entries_" INT64_FORMAT
					   " FOR VALUES FROM (" INT64_FORMAT ") TO (" INT64_FORMAT ");"
					   " INSERT INTO spool.segment_info (segment, lo, hi)"
					   " VALUES (" INT64_FORMAT ", " INT64_FORMAT ", " INT64_FORMAT ")",
					   seg, seg, lo, hi, seg, lo, hi);
		if (SPI_execute(sql, false, 0) < 0)
			elog(ERROR, "could not create segment " INT64_FORMAT, seg);
		ereport(DEBUG1, (errmsg("spool segment " INT64_FORMAT " covers cursors [" INT64_FORMAT ", " INT64_FORMAT ")",
								seg, lo, hi)));
	}
}

/*
 * The segment partition that holds every cursor in [lo, hi), so the insert
 * skips tuple routing; the partitioned table when the range spans two.
 */
static const char *
segment_for(int64 lo, int64 hi)
{
	Oid			t[2] = {INT8OID, INT8OID};
	Datum		v[2];
	bool		isnull;

	v[0] = Int64GetDatum(lo);
	v[1] = Int64GetDatum(hi);
	if (SPI_execute_with_args("SELECT segment FROM spool.segment_info"
							  " WHERE lo <= $1 AND hi >= $2 AND dropped_at IS NULL",
							  2, t, v, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		return psprintf("spool.entries_%d",
						DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)));
	return "spool.entries";
}

/*
 * Count the entries with cursors in [lo, lo + n) into their segments and seal
 * the full ones.  When every cursor of the range was used (the rule) the
 * counts follow from the range; otherwise the touched segments are counted.
 */
static void
seal_and_count(int64 lo, int64 n, bool dense)
{
	Oid			t[2] = {INT8OID, INT8OID};
	Datum		v[2];

	v[0] = Int64GetDatum(lo);
	v[1] = Int64GetDatum(lo + n);
	if (SPI_execute_with_args(dense ?
							  "UPDATE spool.segment_info SET"
							  " rows = rows + (least(hi, $2) - greatest(lo, $1)),"
							  " sealed_at = CASE WHEN hi <= $2 THEN clock_timestamp() END"
							  " WHERE lo < $2 AND hi > $1 AND dropped_at IS NULL" :
							  "UPDATE spool.segment_info i SET"
							  " rows = (SELECT count(*) FROM spool.entries e"
							  "          WHERE e.cursor >= i.lo AND e.cursor < i.hi),"
							  " sealed_at = CASE WHEN hi <= $2 THEN clock_timestamp() END"
							  " WHERE lo < $2 AND hi > $1 AND dropped_at IS NULL",
							  2, t, v, NULL, false, 0) < 0)
		elog(ERROR, "could not update segment counts");
}

/*
 * One promotion.  With flip, first make the other staging table the active
 * one; then move the inactive table out whole (messages, dead letters, gaps,
 * offsets) and truncate it, in one transaction.  The exclusive lock on that
 * table is taken before the snapshot, so it waits for the ingest
 * transactions still writing into it and the snapshot sees all their rows.
 * Returns the number of staged rows consumed.
 */
static uint64
promote_once(bool flip)
{
	int64		next;
	int64		nmsg = 0;
	int64		ntotal;
	int64		inserted = 0;
	int64		last_cursor = 0;
	bool		isnull;
	uint32		old;
	const char *tab;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	XactIsoLevel = XACT_REPEATABLE_READ;
	old = pg_atomic_read_u32(&spool_ingest_shared->staging_active);
	if (flip)
		pg_atomic_write_u32(&spool_ingest_shared->staging_active, 1 - old);
	else
		old = 1 - old;
	tab = old ? "spool.staging_1" : "spool.staging_0";
	(void) RangeVarGetRelid(makeRangeVar("spool", old ? "staging_1" : "staging_0", -1),
							AccessExclusiveLock, false);
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "promoting staged entries");

	next = spi_int8("SELECT next_cursor FROM spool.spool_state WHERE id = 1 FOR UPDATE");

	/*
	 * Each staging batch reserved positions 0, 1, ... in this table under its
	 * lock, in staging order, so next + position numbers the cursors in an
	 * order that keeps each partition's offsets in order, with no sort.  The
	 * counter is how many positions were reserved: an upper bound.
	 */
	ntotal = spi_int8(psprintf("SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 1) x", tab));
	nmsg = (int64) pg_atomic_read_u64(&spool_ingest_shared->staged_msgs[old]);
	if (ntotal > 0)
	{
		Oid			t[1] = {INT8OID};
		Datum		v[1];
		bool		others;
		const char *target;

		ensure_segments(next + nmsg);
		target = segment_for(next, next + nmsg);
		v[0] = Int64GetDatum(next);
		/*
		 * One statement, so every part sees the offsets as they were before
		 * this promotion.  Messages stream from the staging scan into the
		 * spool; only narrow RETURNING rows are kept, for the offsets.  Dead
		 * letters and gaps (rare) are added only when some were staged.
		 */
		others = pg_atomic_read_u64(&spool_ingest_shared->staged_other[old]) > 0;
		if (SPI_execute_with_args(psprintf(
								  "WITH ins AS ("
								  "  INSERT INTO %s (cursor, source, topic, kafka_partition, kafka_offset,"
								  "         key, value, payload, headers, kafka_ts, spooled_at)"
								  "  SELECT $1 + m.pos, m.source, m.topic, m.kafka_partition, m.kafka_offset,"
								  "         m.key, m.value, m.payload, m.headers, m.kafka_ts, now()"
								  "    FROM %s m JOIN spool.sources src ON src.name = m.source"
								  "    LEFT JOIN spool.offsets o ON o.source = m.source AND o.topic = m.topic"
								  "         AND o.kafka_partition = m.kafka_partition"
								  "   WHERE m.kind = 'm' AND m.kafka_offset >= coalesce(o.next_offset, 0)"
								  "  RETURNING source, topic, kafka_partition, kafka_offset),"
								  "%s"
								  " adv AS ("
								  "  INSERT INTO spool.offsets AS o (source, topic, kafka_partition, next_offset, updated_at)"
								  "  SELECT source, topic, kafka_partition, max(last) + 1, clock_timestamp()"
								  "    FROM (SELECT source, topic, kafka_partition, kafka_offset AS last FROM ins"
								  "%s) a"
								  "   GROUP BY source, topic, kafka_partition"
								  "  ON CONFLICT (source, topic, kafka_partition) DO UPDATE"
								  "     SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset),"
								  "         updated_at = EXCLUDED.updated_at)"
								  " SELECT count(*) FROM ins",
								  target, tab,
								  others ? psprintf(
													" other AS ("
													"  SELECT s.* FROM %s s JOIN spool.sources src ON src.name = s.source"
													"    LEFT JOIN spool.offsets o ON o.source = s.source AND o.topic = s.topic"
													"         AND o.kafka_partition = s.kafka_partition"
													"   WHERE s.kind <> 'm' AND s.kafka_offset >= coalesce(o.next_offset, 0)),"
													" dl AS ("
													"  INSERT INTO spool.dead_letters (source, topic, kafka_partition, kafka_offset,"
													"         key, payload, error)"
													"  SELECT source, topic, kafka_partition, kafka_offset, key, payload, error"
													"    FROM other WHERE kind = 'd'),"
													" gp AS ("
													"  INSERT INTO spool.gaps (source, topic, kafka_partition, from_offset, to_offset, action)"
													"  SELECT source, topic, kafka_partition, kafka_offset, gap_to,"
													"         CASE WHEN gap_stop THEN 'stopped' ELSE 'continued' END"
													"    FROM other WHERE kind = 'g'),"
													" stop AS ("
													"  UPDATE spool.sources s SET enabled = false, skip_gap = false,"
													"         stopped_reason = format('gap in %%s [%%s]: offsets %%s to %%s are gone',"
													"           f.topic, f.kafka_partition, f.kafka_offset, f.gap_to)"
													"    FROM other f WHERE f.source = s.name AND f.kind = 'g' AND f.gap_stop),"
													" skip AS ("
													"  UPDATE spool.sources s SET skip_gap = false"
													"    FROM other f WHERE f.source = s.name AND f.kind = 'g' AND NOT f.gap_stop"
													"     AND s.skip_gap),", tab) : "",
								  others ? " UNION ALL SELECT source, topic, kafka_partition, coalesce(gap_to, kafka_offset)"
								  "   FROM other WHERE NOT (kind = 'g' AND gap_stop)" : ""),
								  1, t, v, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not promote staged rows");
		inserted = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		/* Rows of a dropped source, or of a staging transaction that failed, explain a shortfall. */
		if (inserted > nmsg)
			elog(ERROR, "promotion inserted " INT64_FORMAT " entries for at most " INT64_FORMAT
				 " staged messages; rolled back", inserted, nmsg);
		if (inserted < nmsg)
			ereport(DEBUG1,
					(errmsg("promotion inserted " INT64_FORMAT " of " INT64_FORMAT " counted messages",
							inserted, nmsg)));
		if (inserted > 0)
		{
			Oid			t2[1] = {INT8OID};
			Datum		v2[1];

			/*
			 * Cursors used lie in [next, next + nmsg); positions of a staging
			 * transaction that failed, or of a dropped source, stay unused.
			 */
			v2[0] = Int64GetDatum(next + nmsg);
			if (SPI_execute_with_args("UPDATE spool.spool_state SET next_cursor = $1 WHERE id = 1",
									  1, t2, v2, NULL, false, 0) != SPI_OK_UPDATE)
				elog(ERROR, "could not advance the cursor");
			seal_and_count(next, nmsg, inserted == nmsg);
			last_cursor = next + nmsg - 1;
		}
		if (SPI_execute(psprintf("TRUNCATE %s", tab), false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "could not empty %s", tab);
		pg_atomic_write_u64(&spool_ingest_shared->staged_msgs[old], 0);
		pg_atomic_write_u64(&spool_ingest_shared->staged_other[old], 0);
	}

	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	if (inserted > 0)
	{
		pg_atomic_write_u64(&spool_ingest_shared->published_cursor, (uint64) last_cursor);
		ConditionVariableBroadcast(&spool_ingest_shared->spool_cv);
	}
	return (uint64) ntotal;
}

/*
 * Drop sealed segments that every consumer has passed and that are older
 * than spool.min_retention; one segment per transaction, with a short lock
 * timeout so that readers are never held up for long.
 */
static void
retention(void)
{
	for (;;)
	{
		int64		seg = -1;
		bool		isnull;
		Oid			t[1] = {INT4OID};
		Datum		v[1];
		int			save_timeout = LockTimeout;

		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		v[0] = Int32GetDatum(spool_min_retention_s);
		if (SPI_execute_with_args("SELECT i.segment FROM spool.segment_info i"
								  " WHERE i.dropped_at IS NULL AND i.sealed_at IS NOT NULL"
								  "   AND i.sealed_at < clock_timestamp() - make_interval(secs => $1)"
								  "   AND i.hi - 1 <= coalesce((SELECT min(committed_cursor)"
								  "                             FROM spool.consumers), i.hi - 1)"
								  " ORDER BY i.segment LIMIT 1",
								  1, t, v, NULL, false, 0) == SPI_OK_SELECT && SPI_processed == 1)
			seg = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (seg >= 0)
		{
			LockTimeout = 200;
			PG_TRY();
			{
				if (SPI_execute(psprintf("DROP TABLE spool.entries_" INT64_FORMAT, seg), false, 0) < 0 ||
					SPI_execute(psprintf("UPDATE spool.segment_info SET dropped_at = clock_timestamp()"
										 " WHERE segment = " INT64_FORMAT, seg), false, 0) < 0)
					elog(ERROR, "could not drop segment " INT64_FORMAT, seg);
			}
			PG_FINALLY();
			{
				LockTimeout = save_timeout;
			}
			PG_END_TRY();
			ereport(LOG, (errmsg("spool segment " INT64_FORMAT " dropped by retention", seg)));
		}
		PopActiveSnapshot();
		SPI_finish();
		CommitTransactionCommand();
		if (seg < 0)
			return;
		CHECK_FOR_INTERRUPTS();
	}
}

void
spool_promoter_main(Datum main_arg)
{
	TimestampTz next_retention = 0;

	spool_worker_attach(InvalidOid, NULL);
	/* Hash joins and aggregates over a whole backlog stay in memory. */
	SetConfigOption("work_mem", "262144", PGC_USERSET, PGC_S_SESSION);
	/* Staging is read in physical order: no scan may start mid-table. */
	SetConfigOption("synchronize_seqscans", "off", PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("max_parallel_workers_per_gather", "0", PGC_USERSET, PGC_S_SESSION);
	/* Offsets and sources are small: hash them once instead of a probe per row. */
	SetConfigOption("enable_nestloop", "off", PGC_USERSET, PGC_S_SESSION);

	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	spool_ingest_shared->promoter_latch = MyLatch;
	LWLockRelease(spool_ingest_shared->lock);
	before_shmem_exit(promoter_detach, (Datum) 0);

	/*
	 * The inactive staging table may hold rows a failed round left behind;
	 * they are older than anything in the active one, so they go first.
	 */
	(void) promote_once(false);

	/* Publish the committed cursor so waiting readers start from the truth. */
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pg_atomic_write_u64(&spool_ingest_shared->published_cursor,
						(uint64) spi_int8("SELECT next_cursor - 1 FROM spool.spool_state WHERE id = 1"));
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();

	for (;;)
	{
		uint64		moved;
		TimestampTz now;

		spool_worker_pass(NULL, true);
		ResetLatch(MyLatch);
		moved = promote_once(true);

		now = GetCurrentTimestamp();
		if (now >= next_retention)
		{
			retention();
			next_retention = TimestampTzPlusMilliseconds(now, RETENTION_INTERVAL_MS);
		}
		if (moved > 0)
			continue;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1000L, PG_WAIT_EXTENSION);
	}
}

/* Shared memory: what the ingest workers and the promoter share. */
Size
spool_ingest_shmem_size(void)
{
	return MAXALIGN(sizeof(SpoolIngestShared));
}

void
spool_ingest_shmem_init(void)
{
	bool		found;
	SpoolIngestShared *s;

	s = spool_shmem_area("spool_ext ingest", spool_ingest_shmem_size(), &found);
	spool_ingest_shared = s;
	if (found)
		return;
	s->lock = spool_shmem_lock("spool_ext ingest");
	pg_atomic_init_u64(&s->published_cursor, 0);
	pg_atomic_init_u32(&s->staging_active, 0);
	pg_atomic_init_u64(&s->staged_msgs[0], 0);
	pg_atomic_init_u64(&s->staged_msgs[1], 0);
	pg_atomic_init_u64(&s->staged_other[0], 0);
	pg_atomic_init_u64(&s->staged_other[1], 0);
	ConditionVariableInit(&s->spool_cv);
}
