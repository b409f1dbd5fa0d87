/*-------------------------------------------------------------------------
 *
 * consumer_stage.c
 *	  The staging transaction of the ingest worker: the batch goes into the
 *	  active staging table with heap multi-inserts, at positions reserved for
 *	  the promoter; replays that failed again are recorded on their dead
 *	  letters; the batch's numbers go to the source's counters.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"

#define STAGING_NATTS		17
#define STAGING_SLOTS		1000	/* rows per heap multi-insert */

static TupleTableSlot **slots;
static int	writing = -1;		/* the staging table this transaction writes, -1: none */

static void writer_xact_callback(XactEvent event, void *arg);
static Relation open_active_staging(uint32 *which);
static inline void set_column(TupleTableSlot *slot, int col, Datum value);
static void fill_slot(TupleTableSlot *slot, Staged *s, int64 batch_id, int64 pos,
					  Datum source, Datum topic);
static void insert_batch(Relation rel, int64 first_pos);
static void record_failed_replays(void);
static void note_batch(int n, TimestampTz t_start);

/* The staging transaction ended (committed: its rows are visible): unregister. */
static void
writer_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			if (writing >= 0)
				spool_staging_writer_done((uint32) writing);
			writing = -1;
			break;
		default:
			break;
	}
}

/*
 * Open the active staging table for writing.  The transaction counts itself
 * as a writer of the table until it ends (the promoter waits for a table's
 * writers after flipping the flag, instead of locking the table), then
 * checks the flag again: if the promoter flipped it meanwhile, it may be
 * waiting to move the table out, so use the new active one.  Both sides
 * write before they read, through atomics that are full barriers, so
 * either the writer sees the flip or the promoter sees the writer.
 */
static Relation
open_active_staging(uint32 *which)
{
	static bool registered = false;
	Oid			staging_oid;
	Relation	rel;

	if (!registered)
	{
		RegisterXactCallback(writer_xact_callback, NULL);
		registered = true;
	}
	for (;;)
	{
		*which = pg_atomic_read_u32(&spool_ingest_shared->staging_active);
		(void) pg_atomic_fetch_add_u32(&spool_ingest_shared->staging_writers[*which], 1);
		writing = (int) *which;
		if (pg_atomic_read_u32(&spool_ingest_shared->staging_active) == *which)
			break;
		writing = -1;
		spool_staging_writer_done(*which);
	}
	staging_oid = RangeVarGetRelid(makeRangeVar("spool", *which ? "staging_1" : "staging_0", -1),
								   RowExclusiveLock, false);
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
	{
		set_column(slot, 15, Int64GetDatum(s->dead_letter_id));
		set_column(slot, 16, CStringGetTextDatum(s->from_stored ? "stored" : "kafka"));
	}
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
				 errmsg("source \"%s\": replay of dead letter " INT64_FORMAT "%s failed again: %s",
						source_name, s->dead_letter_id,
						s->from_stored ? " (from its stored payload)" : "", s->error)));
		s->kind = 'x';
	}
}

/* Write the batch into the active staging table in one transaction and wake the promoter. */
void
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

	/*
	 * The first batch since the table was emptied: its kept pages are free
	 * again, and our cached insertion page would send the batch into the
	 * middle of them; the free space map hands them out from the first.
	 */
	if (first_pos == 0)
		RelationSetTargetBlock(rel, InvalidBlockNumber);
	insert_batch(rel, first_pos);
	table_close(rel, NoLock);
	if (nother > 0)
		pg_atomic_fetch_add_u64(&spool_ingest_shared->staged_other[which], (uint64) nother);

	refresh_status(false);
	/* Still a writer of the table: the promoter cannot have moved it out yet. */
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
