/*-------------------------------------------------------------------------
 *
 * promoter.c
 *	  The promoter: moves staged rows into the WAL-logged spool in one
 *	  transaction that also stores each partition's next offset (I-3),
 *	  assigns cursors in commit order (I-2), records dead letters and gaps,
 *	  creates segments ahead of the cursor and drops the ones every consumer
 *	  has passed (retention).  Its retention passes also report (or drop)
 *	  stale consumers and remove old history rows (src/retention), one small
 *	  batch between two promotions.
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
 * Every statement of a promotion is a kept plan.  The one that moves the
 * rows names its staging table and its segment, so it is kept per staging
 * table (and with or without the dead-letter part) and prepared again only
 * when the segment it inserts into changes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/visibilitymap.h"
#include "access/xact.h"
#include "catalog/heap.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "catalog/storage.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/bufmgr.h"
#include "storage/freespace.h"
#include "storage/fsm_internals.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"
#include "ingest/promoter.h"
#include "retention/retention.h"

SpoolIngestShared *spool_ingest_shared = NULL;

PGDLLEXPORT void spool_promoter_main(Datum main_arg);

#define IDLE_WAIT_MS		1000
#define STAGING_KEEP_BLOCKS	4096	/* pages of a staging table kept when emptied (32 MB) */

/*
 * The row-moving statement of one staging table, kept for the segment it
 * inserts into (0: spool.entries itself, when the cursors span two).
 */
typedef struct PromotePlan
{
	SPIPlanPtr	plan;
	int32		segment;
} PromotePlan;

/* The staging tables, by their number in spool_ingest_shared->staging_active. */
static const char *const staging_table[2] = {"staging_0", "staging_1"};

static MemoryContext loop_cxt;
static TimestampTz next_retention = 0;
static bool history_pending = false;	/* history rows left to remove */
static int64 promoted_entries;	/* by the last promote_table */
static Oid	staging_oid;		/* the table the current promotion moves out */

static PromotePlan plan_promote[2][2];	/* [staging table][dead letters or gaps] */
static SPIPlanPtr plan_staged[2];
static SPIPlanPtr plan_next_cursor;
static SPIPlanPtr plan_advance;
static SPIPlanPtr plan_segment_top;
static SPIPlanPtr plan_segment_for;
static SPIPlanPtr plan_seal[2];		/* [every cursor used] */
static SPIPlanPtr plan_expired;
static SPIPlanPtr plan_published;

static void promoter_attach(void);
static void promoter_detach(int code, Datum arg);
static void promoter_lock(void);
static void promoter_load(void);
static bool promoter_step(void);
static uint32 promotion_begin(bool flip);
static bool promote_once(bool flip);
static int64 promote_table(uint32 which, int64 next);
static bool empty_staging(uint32 which);
static void reset_staging(Relation rel);
static void fsm_search_from_start(Relation rel);
static SPIPlanPtr promote_plan(uint32 which, bool others, int32 segment);
static char *promote_sql(uint32 which, bool others, int32 segment);
static void ensure_segments(int64 upto);
static int32 segment_for(int64 lo, int64 hi);
static void seal_and_count(int64 lo, int64 n, bool dense);
static void retention(void);
static bool drop_expired_segment(void);
static void note_promotion(int64 entries, TimestampTz t_start, TimestampTz staged_at);
static int64 plan_int8(SPIPlanPtr plan, Datum *values, bool read_only);
static void ingest_attach(bool found);

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

/* Run a kept plan that returns one bigint (NULL: -1). */
static int64
plan_int8(SPIPlanPtr plan, Datum *values, bool read_only)
{
	bool		isnull;
	Datum		d;

	if (spool_exec(plan, values, NULL, read_only, SPI_OK_SELECT) != 1)
		elog(ERROR, "a promoter query returned no row");
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
	int64		hi;
	int32		seg;
	int64		target = upto + Max(spool_segment_size / 4, 1);
	bool		isnull;

	spool_plan(&plan_segment_top,
			   "SELECT coalesce(max(hi), 1), coalesce(max(segment), 0) FROM spool.segment_info",
			   0, NULL);
	if (spool_exec(plan_segment_top, NULL, NULL, false, SPI_OK_SELECT) != 1)
		elog(ERROR, "could not read spool.segment_info");
	hi = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	seg = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));

	/* Rare (once per segment), and DDL: a statement of its own each time. */
	while (hi <= target)
	{
		int64		lo = hi;
		char	   *sql;

		hi = lo + spool_segment_size;
		seg++;
		sql = psprintf("CREATE TABLE spool.entries_%d"
					   " (LIKE spool.entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
					   " INCLUDING STORAGE);"
					   " ALTER TABLE spool.entries ATTACH PARTITION spool.entries_%d"
					   " FOR VALUES FROM (" INT64_FORMAT ") TO (" INT64_FORMAT ");"
					   " INSERT INTO spool.segment_info (segment, lo, hi)"
					   " VALUES (%d, " INT64_FORMAT ", " INT64_FORMAT ")",
					   seg, seg, lo, hi, seg, lo, hi);
		if (SPI_execute(sql, false, 0) < 0)
			elog(ERROR, "could not create segment %d", seg);
		ereport(DEBUG1, (errcode(ERRCODE_SUCCESSFUL_COMPLETION),
						 errmsg("spool segment %d covers cursors [" INT64_FORMAT ", " INT64_FORMAT ")",
								seg, lo, hi)));
	}
}

/*
 * The segment that holds every cursor in [lo, hi), so the insert skips
 * tuple routing; 0 (the partitioned table) when the range spans two, or
 * when the segment was created by this transaction (the query runs on the
 * promotion's snapshot as it was when the transaction began).
 */
static int32
segment_for(int64 lo, int64 hi)
{
	Datum		v[2] = {Int64GetDatum(lo), Int64GetDatum(hi)};
	bool		isnull;

	spool_plan(&plan_segment_for,
			   "SELECT segment FROM spool.segment_info"
			   " WHERE lo <= $1 AND hi >= $2 AND dropped_at IS NULL",
			   2, (Oid[]) {INT8OID, INT8OID});
	if (spool_exec(plan_segment_for, v, NULL, true, SPI_OK_SELECT) != 1)
		return 0;
	return DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Count the entries with cursors in [lo, lo + n) into their segments and seal
 * the full ones.  When every cursor of the range was used (the rule) the
 * counts follow from the range; otherwise the touched segments are counted.
 */
static void
seal_and_count(int64 lo, int64 n, bool dense)
{
	Datum		v[2] = {Int64GetDatum(lo), Int64GetDatum(lo + n)};

	spool_plan(&plan_seal[dense],
			   dense ?
			   "UPDATE spool.segment_info SET"
			   " rows = rows + (least(hi, $2) - greatest(lo, $1)),"
			   " sealed_at = CASE WHEN hi <= $2 THEN clock_timestamp() END"
			   " WHERE lo < $2 AND hi > $1 AND dropped_at IS NULL" :
			   "UPDATE spool.segment_info i SET"
			   " rows = (SELECT count(*) FROM spool.entries e"
			   "          WHERE e.cursor >= i.lo AND e.cursor < i.hi),"
			   " sealed_at = CASE WHEN hi <= $2 THEN clock_timestamp() END"
			   " WHERE lo < $2 AND hi > $1 AND dropped_at IS NULL",
			   2, (Oid[]) {INT8OID, INT8OID});
	(void) spool_exec(plan_seal[dense], v, NULL, false, SPI_OK_UPDATE);
}

/*
 * The statement that moves a staging table out: one statement, so every
 * part sees the offsets as they were before this promotion.  Messages
 * stream from the staging scan into the spool; only narrow RETURNING rows
 * are kept, for the offsets.  Dead letters and gaps (rare) are part of it
 * only with others, and so are replays of dead letters ('r': inserted at
 * their position whatever the stored offset, which they do not move, and
 * their dead letter marked replayed).  $1 is the first cursor; the result
 * is the number of entries inserted.
 */
static char *
promote_sql(uint32 which, bool others, int32 segment)
{
	char	   *tab = psprintf("spool.%s", staging_table[which]);
	char	   *target = segment > 0 ? psprintf("spool.entries_%d", segment) : "spool.entries";

	return psprintf("WITH ins AS ("
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
					" SELECT (SELECT count(*) FROM ins)%s",
					target, tab,
					others ? psprintf(" other AS ("
									  "  SELECT s.* FROM %s s JOIN spool.sources src ON src.name = s.source"
									  "    LEFT JOIN spool.offsets o ON o.source = s.source AND o.topic = s.topic"
									  "         AND o.kafka_partition = s.kafka_partition"
									  "   WHERE s.kind <> 'm'"
									  "     AND (s.kind = 'r' OR s.kafka_offset >= coalesce(o.next_offset, 0))),"
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
									  "     AND s.skip_gap),"
									  " rp AS ("
									  "  INSERT INTO %s (cursor, source, topic, kafka_partition, kafka_offset,"
									  "         key, value, payload, headers, kafka_ts, spooled_at)"
									  "  SELECT $1 + r.pos, r.source, r.topic, r.kafka_partition, r.kafka_offset,"
									  "         r.key, r.value, r.payload, r.headers, r.kafka_ts, now()"
									  "    FROM other r JOIN spool.dead_letters d ON d.id = r.dead_letter_id"
									  "         AND d.replay_cursor IS NULL"
									  "   WHERE r.kind = 'r'"
									  "  RETURNING cursor),"
									  " rpm AS ("
									  "  UPDATE spool.dead_letters d SET replayed_at = now(), replay_cursor = $1 + r.pos,"
									  "         replayed_from = r.replay_from,"
									  "         replay_requested_at = NULL, replay_attempts = d.replay_attempts + 1"
									  "    FROM other r WHERE r.kind = 'r' AND d.id = r.dead_letter_id"
									  "     AND d.replay_cursor IS NULL),", tab, target) : "",
					others ? " UNION ALL SELECT source, topic, kafka_partition, coalesce(gap_to, kafka_offset)"
					"   FROM other WHERE NOT (kind = 'g' AND gap_stop) AND kind <> 'r'" : "",
					others ? " + (SELECT count(*) FROM rp)" : "");
}

/* The kept row-moving statement for this table, kind and segment. */
static SPIPlanPtr
promote_plan(uint32 which, bool others, int32 segment)
{
	PromotePlan *pp = &plan_promote[which][others];

	if (pp->plan != NULL && pp->segment != segment)
	{
		SPI_freeplan(pp->plan);
		pp->plan = NULL;
	}
	if (pp->plan == NULL)
	{
		spool_plan(&pp->plan, promote_sql(which, others, segment), 1, (Oid[]) {INT8OID});
		pp->segment = segment;
	}
	return pp->plan;
}

/*
 * Start a promotion.  With flip, first make the other staging table the
 * active one.  Then wait, before the transaction starts, until no ingest
 * transaction writes the table to move out any more (they count themselves
 * in staging_writers until they end, see open_active_staging), so the
 * snapshot sees all their rows.  No lock of the table waits for them: an
 * exclusive lock per promotion cost a trip through every backend's
 * fast-path lock slots, and its wait could not be interrupted where a
 * condition variable can.  One REPEATABLE READ snapshot serves every
 * statement; spool_end_txn commits.  Returns the number of the staging
 * table to move out.
 */
static uint32
promotion_begin(bool flip)
{
	uint32		which = pg_atomic_read_u32(&spool_ingest_shared->staging_active);

	if (flip)
		(void) pg_atomic_exchange_u32(&spool_ingest_shared->staging_active, 1 - which);
	else
		which = 1 - which;
	if (pg_atomic_read_u32(&spool_ingest_shared->staging_writers[which]) != 0)
	{
		pgstat_report_activity(STATE_RUNNING, "waiting for staging writers");
		ConditionVariablePrepareToSleep(&spool_ingest_shared->staging_cv);
		while (pg_atomic_read_u32(&spool_ingest_shared->staging_writers[which]) != 0)
			ConditionVariableSleep(&spool_ingest_shared->staging_cv, PG_WAIT_EXTENSION);
		ConditionVariableCancelSleep();
	}
	spool_start_txn(XACT_REPEATABLE_READ);
	staging_oid = RangeVarGetRelid(makeRangeVar("spool", (char *) staging_table[which], -1),
								   AccessShareLock, false);
	spool_snapshot_txn("promoting staged entries");
	return which;
}

/*
 * Move staging table which out whole (messages, dead letters, gaps,
 * offsets), numbering cursors from next; empty_staging empties it once
 * this has committed.  Returns the last cursor used, or -1 when no entry
 * was inserted.
 *
 * Each staging batch reserved positions 0, 1, ... in the table under its
 * lock, in staging order, so next + position numbers the cursors in an
 * order that keeps each partition's offsets in order, with no sort.  The
 * counter is how many positions were reserved: an upper bound.
 */
static int64
promote_table(uint32 which, int64 next)
{
	int64		nmsg = (int64) pg_atomic_read_u64(&spool_ingest_shared->staged_msgs[which]);
	bool		others = pg_atomic_read_u64(&spool_ingest_shared->staged_other[which]) > 0;
	Datum		v[1] = {Int64GetDatum(next)};
	int64		inserted = 0;
	int64		last = -1;
	bool		moved = false;

	ensure_segments(next + nmsg);
	/* Messages only (the rule): multi-inserts; otherwise the statement. */
	if (!others)
	{
		Relation	rel = table_open(staging_oid, NoLock);

		moved = spool_promote_messages(rel, next, nmsg, &inserted);
		table_close(rel, NoLock);
	}
	if (!moved)
		inserted = plan_int8(promote_plan(which, others, segment_for(next, next + nmsg)), v, false);
	/* Rows of a dropped source, or of a staging transaction that failed, explain a shortfall. */
	if (inserted > nmsg)
		elog(ERROR, "promotion inserted " INT64_FORMAT " entries for at most " INT64_FORMAT
			 " staged messages; rolled back", inserted, nmsg);
	promoted_entries = inserted;
	if (inserted < nmsg)
		ereport(DEBUG1,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("promotion inserted " INT64_FORMAT " of " INT64_FORMAT " counted messages",
						inserted, nmsg)));
	if (inserted > 0)
	{
		/*
		 * Cursors used lie in [next, next + nmsg); positions of a staging
		 * transaction that failed, or of a dropped source, stay unused.
		 */
		v[0] = Int64GetDatum(next + nmsg);
		spool_plan(&plan_advance, "UPDATE spool.spool_state SET next_cursor = $1 WHERE id = 1",
				   1, (Oid[]) {INT8OID});
		(void) spool_exec(plan_advance, v, NULL, false, SPI_OK_UPDATE);
		seal_and_count(next, nmsg, inserted == nmsg);
		last = next + nmsg - 1;
	}
	return last;
}

/*
 * Empty staging table which after its promotion committed, in a short
 * transaction of its own, and reset its counters.  It is emptied in place
 * (reset_staging keeps its first pages, initialized empty, and truncates the
 * rest as TRUNCATE does for a table created in the same transaction): the
 * table keeps its relfilenode, so no catalog row
 * changes, no init fork is written and synced, no WAL is written, and
 * neither the kept plans that name it nor the ingest workers' relcache
 * entries are invalidated.  In place is not transactional, which is why it
 * waits for the commit.  The rows it removes are promoted, so removing them
 * late is harmless: a promotion of them again (after the promoter stopped
 * in between, or when the table is active again) inserts nothing, as they
 * are all below the stored offsets (dead letters and gaps too; replays have
 * their replay cursor).  So the lock is only tried: a reader of
 * spool.staging holding the table leaves the rows for the next time.  No
 * ingest worker writes the table (it is inactive).
 */
static bool
empty_staging(uint32 which)
{
	MemoryContext cxt = CurrentMemoryContext;
	Oid			relid;
	bool		emptied;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "emptying a promoted staging table");
	relid = RangeVarGetRelid(makeRangeVar("spool", (char *) staging_table[which], -1),
							 NoLock, false);
	emptied = ConditionalLockRelationOid(relid, AccessExclusiveLock);
	if (emptied)
	{
		Relation	rel = table_open(relid, NoLock);

		reset_staging(rel);
		table_close(rel, NoLock);
	}
	else
		ereport(DEBUG1,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("promoted rows left in spool.%s: another session holds it",
						staging_table[which])));
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	pg_atomic_write_u64(&spool_ingest_shared->staged_msgs[which], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_other[which], 0);
	return emptied;
}

/*
 * Empty staging table rel (held exclusively) and keep its first
 * STAGING_KEEP_BLOCKS pages for the next batches: each page is initialized
 * empty in shared buffers (no read, no WAL: the table is unlogged) and
 * entered in the free space map as empty, and the map's searches start
 * again at the first page, so that the next batches fill the pages in
 * order and the promoter still reads them in staging order.  Truncating the
 * file instead made the ingest worker extend it again page by page for
 * every batch (a write of a zero page each) and scanned all of shared
 * buffers for the dropped pages.  The table's TOAST table is truncated
 * when it holds anything; a table with indexes or a visibility map (a
 * manual VACUUM) is truncated as before.
 */
static void
reset_staging(Relation rel)
{
	BlockNumber nblocks = RelationGetNumberOfBlocks(rel);
	BlockNumber keep = Min(nblocks, STAGING_KEEP_BLOCKS);
	SMgrRelation smgr = RelationGetSmgr(rel);
	BlockNumber blk;

	if (keep == 0 || rel->rd_rel->relhasindex ||
		(smgrexists(smgr, VISIBILITYMAP_FORKNUM) &&
		 smgrnblocks(smgr, VISIBILITYMAP_FORKNUM) > 0))
	{
		heap_truncate_one_rel(rel);
		return;
	}
	if (keep < nblocks)
		RelationTruncate(rel, keep);
	for (blk = 0; blk < keep; blk++)
	{
		Buffer		buf = ReadBufferExtended(rel, MAIN_FORKNUM, blk, RBM_ZERO_AND_LOCK, NULL);
		Page		page = BufferGetPage(buf);
		Size		avail;

		PageInit(page, BufferGetPageSize(buf), 0);
		avail = PageGetHeapFreeSpace(page);
		MarkBufferDirty(buf);
		UnlockReleaseBuffer(buf);
		RecordPageWithFreeSpace(rel, blk, avail);
	}
	FreeSpaceMapVacuumRange(rel, 0, keep);
	fsm_search_from_start(rel);
	RelationSetTargetBlock(rel, InvalidBlockNumber);
	if (OidIsValid(rel->rd_rel->reltoastrelid))
	{
		Relation	toast = table_open(rel->rd_rel->reltoastrelid, AccessExclusiveLock);

		if (RelationGetNumberOfBlocks(toast) > 0)
			heap_truncate_one_rel(toast);
		table_close(toast, NoLock);
	}
}

/*
 * The free space map hands out pages round-robin from where its last
 * search ended (fp_next_slot of each map page); start them at the first.
 */
static void
fsm_search_from_start(Relation rel)
{
	SMgrRelation smgr = RelationGetSmgr(rel);
	BlockNumber n;
	BlockNumber blk;

	if (!smgrexists(smgr, FSM_FORKNUM))
		return;
	n = smgrnblocks(smgr, FSM_FORKNUM);
	for (blk = 0; blk < n; blk++)
	{
		Buffer		buf = ReadBufferExtended(rel, FSM_FORKNUM, blk, RBM_ZERO_ON_ERROR, NULL);
		Page		page = BufferGetPage(buf);

		LockBuffer(buf, BUFFER_LOCK_EXCLUSIVE);
		if (!PageIsNew(page))
		{
			((FSMPage) PageGetContents(page))->fp_next_slot = 0;
			MarkBufferDirtyHint(buf, false);
		}
		UnlockReleaseBuffer(buf);
	}
}

/*
 * An ingest worker committed a batch into staging table which (called in
 * its transaction, holding its lock on the table): the oldest such time of
 * the table is what the promoter's lag is measured from.
 */
void
spool_note_staged(uint32 which, TimestampTz at)
{
	uint64		zero = 0;

	if (pg_atomic_read_u64(&spool_ingest_shared->staged_first_at[which]) == 0)
		(void) pg_atomic_compare_exchange_u64(&spool_ingest_shared->staged_first_at[which],
											  &zero, (uint64) at);
}

/*
 * An ingest transaction that wrote (or meant to write) staging table which
 * ended: the promoter may be waiting for the table's last writer.
 */
void
spool_staging_writer_done(uint32 which)
{
	if (pg_atomic_sub_fetch_u32(&spool_ingest_shared->staging_writers[which], 1) == 0)
		ConditionVariableBroadcast(&spool_ingest_shared->staging_cv);
}

/*
 * The counters of source, found or claimed by name; NULL when every slot
 * is taken (the source then has no stage numbers).
 */
SpoolSourceStats *
spool_source_stats(const char *source)
{
	SpoolSourceStats *found = NULL;
	SpoolSourceStats *free_slot = NULL;
	int			i;

	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < SPOOL_MAX_SOURCES && found == NULL; i++)
	{
		SpoolSourceStats *st = &spool_ingest_shared->sources[i];

		if (strcmp(st->name, source) == 0)
			found = st;
		else if (st->name[0] == '\0' && free_slot == NULL)
			free_slot = st;
	}
	if (found == NULL && free_slot != NULL)
	{
		found = free_slot;
		memset(found, 0, sizeof(*found));
		strlcpy(found->name, source, sizeof(found->name));
		spool_hist_init(&found->rows, 1);
		spool_hist_init(&found->batch_ms, 0.25);
		spool_hist_init(&found->stage_ms, 0.25);
	}
	LWLockRelease(spool_ingest_shared->lock);
	return found;
}

/* drop_source: the source's counters are gone, its slot free again. */
void
spool_source_stats_forget(const char *source)
{
	int			i;

	if (spool_ingest_shared == NULL)
		return;
	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < SPOOL_MAX_SOURCES; i++)
		if (strcmp(spool_ingest_shared->sources[i].name, source) == 0)
			spool_ingest_shared->sources[i].name[0] = '\0';
	LWLockRelease(spool_ingest_shared->lock);
}

/* The promotion's numbers (after it committed). */
static void
note_promotion(int64 entries, TimestampTz t_start, TimestampTz staged_at)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	spool_ingest_shared->promotions++;
	spool_hist_add(&spool_ingest_shared->promote_rows, (double) entries, now);
	spool_hist_add(&spool_ingest_shared->promote_ms, (double) (now - t_start) / 1000.0, now);
	if (staged_at != 0)
		spool_hist_add(&spool_ingest_shared->promote_lag_ms,
					   (double) Max(now - staged_at, 0) / 1000.0, now);
	LWLockRelease(spool_ingest_shared->lock);
}

/*
 * One promotion (see promotion_begin for flip), in one transaction; the
 * readers waiting for new cursors are woken after it commits.  Returns
 * whether it did anything: inserted entries, or emptied a staging table
 * (promoted rows left behind by a reader of spool.staging are tried again
 * after a wait, not in a loop).
 */
static bool
promote_once(bool flip)
{
	TimestampTz t_start = GetCurrentTimestamp();
	uint32		which = promotion_begin(flip);
	int64		next;
	int64		staged;
	int64		last = -1;
	bool		emptied = false;
	TimestampTz staged_at;

	spool_plan(&plan_next_cursor,
			   "SELECT next_cursor FROM spool.spool_state WHERE id = 1 FOR UPDATE", 0, NULL);
	next = plan_int8(plan_next_cursor, NULL, false);
	spool_plan(&plan_staged[which],
			   which ? "SELECT count(*) FROM (SELECT 1 FROM spool.staging_1 LIMIT 1) x"
			   : "SELECT count(*) FROM (SELECT 1 FROM spool.staging_0 LIMIT 1) x",
			   0, NULL);
	staged = plan_int8(plan_staged[which], NULL, false);
	promoted_entries = 0;
	if (staged > 0)
		last = promote_table(which, next);
	/* No ingest worker writes the table, so none stamps it meanwhile. */
	staged_at = (TimestampTz) pg_atomic_exchange_u64(&spool_ingest_shared->staged_first_at[which], 0);
	spool_end_txn();
	if (staged > 0)
		emptied = empty_staging(which);

	if (staged > 0)
		note_promotion(promoted_entries, t_start, staged_at);
	if (last >= 0)
	{
		pg_atomic_write_u64(&spool_ingest_shared->published_cursor, (uint64) last);
		ConditionVariableBroadcast(&spool_ingest_shared->spool_cv);
	}
	return staged > 0 && (promoted_entries > 0 || emptied);
}

/*
 * Drop the oldest sealed segment that every consumer has passed and that is
 * older than spool.min_retention, with a short lock timeout so that readers
 * are never held up for long.  Returns false when there was none, or when
 * its lock timed out (a long reader, or pg_dump, which holds a share lock on
 * every segment while it runs): the next retention pass tries again.
 */
static bool
drop_expired_segment(void)
{
	Datum		v[1] = {Int32GetDatum(spool_min_retention_s)};
	int64		seg;
	bool		isnull;
	int			save_timeout = LockTimeout;
	MemoryContext cxt = CurrentMemoryContext;
	bool		locked_out = false;

	spool_begin_txn("dropping an old segment");
	spool_plan(&plan_expired,
			   "SELECT i.segment::bigint FROM spool.segment_info i"
			   " WHERE i.dropped_at IS NULL AND i.sealed_at IS NOT NULL"
			   "   AND i.sealed_at < clock_timestamp() - make_interval(secs => $1)"
			   "   AND i.hi - 1 <= coalesce((SELECT min(committed_cursor)"
			   "                             FROM spool.consumers), i.hi - 1)"
			   " ORDER BY i.segment LIMIT 1",
			   1, (Oid[]) {INT4OID});
	seg = spool_exec(plan_expired, v, NULL, false, SPI_OK_SELECT) == 1 ?
		DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) : -1;
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
		PG_CATCH();
		{
			ErrorData  *edata;

			LockTimeout = save_timeout;
			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
				PG_RE_THROW();
			FlushErrorState();
			AbortCurrentTransaction();
			MemoryContextSwitchTo(cxt);
			pgstat_report_activity(STATE_IDLE, NULL);
			FreeErrorData(edata);
			locked_out = true;
		}
		PG_END_TRY();
		LockTimeout = save_timeout;
		if (locked_out)
		{
			ereport(LOG,
					(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
					 errmsg("spool segment " INT64_FORMAT " not dropped: another session holds a lock on it",
							seg),
					 errhint("Retention tries again at its next pass.")));
			return false;
		}
		ereport(LOG, (errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					  errmsg("spool segment " INT64_FORMAT " dropped by retention", seg)));
	}
	spool_end_txn();
	return seg >= 0;
}

/* Retention: expired segments are dropped one per transaction. */
static void
retention(void)
{
	while (drop_expired_segment())
		CHECK_FOR_INTERRUPTS();
}

/* Attach: signals, the connection, settings, and the latch ingest wakes. */
static void
promoter_attach(void)
{
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

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "spool promoter loop",
									 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(loop_cxt);
}

/*
 * One promoter, ever: a second one (started by a restarted launcher while
 * the first still finishes a pass) would flip and empty the staging tables
 * under the first one, which no table lock prevents any more.  Wait for
 * the other one to exit (it does at its next pass, see
 * spool_exit_if_orphaned).  The session lock lives as long as this process.
 */
static void
promoter_lock(void)
{
	for (;;)
	{
		bool		got;

		spool_begin_txn("waiting for the previous promoter to exit");
		got = spool_internal_lock(SPOOL_LOCK_PROMOTER, "promoter", 0);
		spool_end_txn();
		if (got)
			return;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 100L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		spool_exit_if_orphaned();
	}
}

/*
 * Load: the inactive staging table may hold rows a failed round left
 * behind; they are older than anything in the active one, so they go
 * first.  Then publish the committed cursor so waiting readers start from
 * the truth.
 */
static void
promoter_load(void)
{
	(void) promote_once(false);

	spool_begin_txn("reading the spool's cursor");
	spool_plan(&plan_published, "SELECT next_cursor - 1 FROM spool.spool_state WHERE id = 1",
			   0, NULL);
	pg_atomic_write_u64(&spool_ingest_shared->published_cursor,
						(uint64) plan_int8(plan_published, NULL, false));
	spool_end_txn();
}

/*
 * One pass: promote what was staged since the last one and apply retention
 * every spool.retention_interval (stale consumers first, so that what a dropped
 * one held goes in the same pass).  History rows are removed one batch per
 * pass, so a promotion waits for at most one batch.  Returns false when
 * nothing was promoted or emptied and no history batch is left (the loop
 * then waits; a backlog is promoted pass after pass).
 */
static bool
promoter_step(void)
{
	bool		moved = promote_once(true);
	TimestampTz now = GetCurrentTimestamp();

	if (now >= next_retention)
	{
		spool_stale_consumers();
		retention();
		history_pending = spool_history_begin();
		next_retention = TimestampTzPlusMilliseconds(now, spool_retention_interval_ms);
	}
	if (history_pending)
		history_pending = spool_history_step();
	return moved || history_pending;
}

void
spool_promoter_main(Datum main_arg)
{
	promoter_attach();
	promoter_lock();
	promoter_load();
	for (;;)
	{
		spool_worker_pass(loop_cxt, true);
		/* Before the step: a batch staged during it wakes the next wait. */
		ResetLatch(MyLatch);
		if (!promoter_step())
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 IDLE_WAIT_MS, PG_WAIT_EXTENSION);
	}
}

static void
ingest_attach(bool found)
{
	SpoolIngestShared *s = spool_ingest_shared;

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
	pg_atomic_init_u64(&s->staged_first_at[0], 0);
	pg_atomic_init_u64(&s->staged_first_at[1], 0);
	pg_atomic_init_u32(&s->staging_writers[0], 0);
	pg_atomic_init_u32(&s->staging_writers[1], 0);
	ConditionVariableInit(&s->staging_cv);
	spool_hist_init(&s->promote_rows, 1);
	spool_hist_init(&s->promote_ms, 0.25);
	spool_hist_init(&s->promote_lag_ms, 1);
}

/* Shared memory: what the ingest workers and the promoter share. */
const SpoolShmemArea spool_ingest_shmem = {
	"spool_ext ingest", true, sizeof(SpoolIngestShared), (void **) &spool_ingest_shared,
	0, NULL, NULL, ingest_attach
};
