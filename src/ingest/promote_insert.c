/*-------------------------------------------------------------------------
 *
 * promote_insert.c
 *	  The common promotion, when only messages were staged (no dead letter,
 *	  gap or replay): one scan of the staging table, and its messages go
 *	  into the spool's segments by heap multi-inserts with their index
 *	  entries, as COPY does.  An INSERT ... SELECT writes a WAL record per
 *	  row and per index entry and runs every row through the executor's
 *	  joins; a multi-insert writes one heap record per page.
 *
 * The rules are those of the statement it replaces (promoter.c,
 * promote_sql): only rows of sources that still exist, only offsets at or
 * after the partition's stored next offset, cursor = first cursor +
 * position, spooled_at = the transaction's start, and the stored offsets
 * move in the same transaction.  A segment with triggers or with columns
 * other than the spool's makes the caller use the statement instead.
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
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "ingest/ingest.h"
#include "ingest/promoter.h"

#define STAGING_NATTS		17
#define ENTRIES_NATTS		11
#define MAX_SEGMENTS		8		/* segments one promotion may touch */
#define BUFFER_ROWS			1000	/* rows per multi-insert */
#define BUFFER_BYTES		(4 * 1024 * 1024)
#define SEGMENT_MAX_NATTS	64		/* columns of a segment, dropped ones included */

/* Staging columns (spool.staging_0) this file reads. */
enum
{
	ST_POS = 1, ST_SOURCE = 2, ST_TOPIC = 3, ST_PARTITION = 4, ST_OFFSET = 5,
	ST_KIND = 6, ST_KEY = 7, ST_VALUE = 8, ST_PAYLOAD = 9, ST_HEADERS = 10,
	ST_TS = 11
};

/* The spool's columns, in the order of spool.entries. */
static const char *const entries_cols[ENTRIES_NATTS] = {
	"cursor", "source", "topic", "kafka_partition", "kafka_offset", "key",
	"value", "payload", "headers", "kafka_ts", "spooled_at"
};

/* A partition of a source: where its stored offset is, and how far this promotion got. */
typedef struct PartKey
{
	const char *source;
	int			source_len;
	const char *topic;
	int			topic_len;
	int32		partition;
} PartKey;

typedef struct PartEntry
{
	PartKey		key;
	int64		next_offset;	/* stored; 0 when none */
	int64		last;			/* highest offset promoted now; -1 none */
} PartEntry;

/* One segment this promotion writes into, with its multi-insert buffer. */
typedef struct Segment
{
	int64		lo;
	int64		hi;				/* exclusive */
	Relation	rel;
	ResultRelInfo *rri;
	int			attmap[ENTRIES_NATTS];	/* column i's index in rel */
	TupleTableSlot *slots[BUFFER_ROWS];
	int			nslots;
	Size		bytes;
} Segment;

static SPIPlanPtr plan_parts;
static SPIPlanPtr plan_segments;
static SPIPlanPtr plan_offsets;

static uint32 part_hash(const void *key, Size keysize);
static int	part_match(const void *a, const void *b, Size keysize);
static HTAB *load_parts(char ***sources, int *nsources);
static int	open_segments(int64 lo, int64 hi, Segment *segs);
static void close_segments(Segment *segs, int nsegs);
static void flush_segment(Segment *seg, EState *estate, CommandId cid);
static void store_offsets(HTAB *parts);

static uint32
part_hash(const void *key, Size keysize)
{
	const PartKey *k = key;

	return hash_combine(hash_combine(hash_bytes((const unsigned char *) k->source, k->source_len),
									 hash_bytes((const unsigned char *) k->topic, k->topic_len)),
						murmurhash32((uint32) k->partition));
}

static int
part_match(const void *a, const void *b, Size keysize)
{
	const PartKey *x = a;
	const PartKey *y = b;

	return !(x->partition == y->partition &&
			 x->source_len == y->source_len && x->topic_len == y->topic_len &&
			 memcmp(x->source, y->source, x->source_len) == 0 &&
			 memcmp(x->topic, y->topic, x->topic_len) == 0);
}

/*
 * The existing sources and their stored offsets, as of the promotion's
 * snapshot: a table of partitions, and the source names.
 */
static HTAB *
load_parts(char ***sources, int *nsources)
{
	HASHCTL		ctl;
	HTAB	   *parts;
	uint64		i;
	int			n = 0;

	ctl.keysize = sizeof(PartKey);
	ctl.entrysize = sizeof(PartEntry);
	ctl.hash = part_hash;
	ctl.match = part_match;
	ctl.hcxt = CurrentMemoryContext;
	parts = hash_create("spool promotion partitions", 256, &ctl,
						HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);

	spool_plan(&plan_parts,
			   "SELECT s.name, o.topic, o.kafka_partition, o.next_offset"
			   "  FROM spool.sources s LEFT JOIN spool.offsets o ON o.source = s.name"
			   " ORDER BY s.name",
			   0, NULL);
	(void) spool_exec(plan_parts, NULL, NULL, true, SPI_OK_SELECT);
	*sources = palloc(sizeof(char *) * (SPI_processed + 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *source = SPI_getvalue(tup, desc, 1);
		bool		isnull;
		PartKey		key;
		PartEntry  *e;

		if (n == 0 || strcmp((*sources)[n - 1], source) != 0)
			(*sources)[n++] = source;
		(void) SPI_getbinval(tup, desc, 2, &isnull);
		if (isnull)
			continue;			/* a source with no stored offset yet */
		key.source = (*sources)[n - 1];
		key.source_len = strlen(key.source);
		key.topic = SPI_getvalue(tup, desc, 2);
		key.topic_len = strlen(key.topic);
		key.partition = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
		e = hash_search(parts, &key, HASH_ENTER, NULL);
		e->next_offset = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		e->last = -1;
	}
	*nsources = n;
	return parts;
}

/*
 * Open the segments that hold cursors [lo, hi) (created by ensure_segments,
 * possibly in this transaction), with their indexes.  Returns how many, or
 * -1 when one of them cannot take a multi-insert (triggers, other columns).
 */
static int
open_segments(int64 lo, int64 hi, Segment *segs)
{
	Datum		v[2] = {Int64GetDatum(lo), Int64GetDatum(hi)};
	int			nsegs = 0;
	uint64		i;
	int32	   *numbers;
	uint64		nrows;

	spool_plan(&plan_segments,
			   "SELECT segment, lo, hi FROM spool.segment_info"
			   " WHERE lo < $2 AND hi > $1 AND dropped_at IS NULL ORDER BY lo",
			   2, (Oid[]) {INT8OID, INT8OID});
	/* Not read-only: a segment created by this transaction must be seen. */
	nrows = spool_exec(plan_segments, v, NULL, false, SPI_OK_SELECT);
	if (nrows == 0 || nrows > MAX_SEGMENTS)
		return -1;
	numbers = palloc(sizeof(int32) * nrows);
	for (i = 0; i < nrows; i++)
	{
		bool		isnull;

		numbers[i] = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		segs[i].lo = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull));
		segs[i].hi = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3, &isnull));
	}
	for (i = 0; i < nrows; i++)
	{
		Segment    *seg = &segs[nsegs];
		char		name[NAMEDATALEN];
		TupleDesc	desc;
		int			live = 0;
		int			c;
		int			a;

		snprintf(name, sizeof(name), "entries_%d", numbers[i]);
		seg->rel = table_open(RangeVarGetRelid(makeRangeVar("spool", name, -1),
											   RowExclusiveLock, false),
							  RowExclusiveLock);
		nsegs++;
		desc = RelationGetDescr(seg->rel);
		for (c = 0; c < ENTRIES_NATTS; c++)
			seg->attmap[c] = -1;
		for (a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (att->attisdropped)
				continue;
			live++;
			for (c = 0; c < ENTRIES_NATTS; c++)
				if (strcmp(NameStr(att->attname), entries_cols[c]) == 0)
					seg->attmap[c] = a;
		}
		for (c = 0; c < ENTRIES_NATTS; c++)
			if (seg->attmap[c] < 0)
				live = -1;
		if (live != ENTRIES_NATTS || desc->natts > SEGMENT_MAX_NATTS ||
			seg->rel->trigdesc != NULL)
		{
			close_segments(segs, nsegs);
			return -1;
		}
		seg->rri = makeNode(ResultRelInfo);
		InitResultRelInfo(seg->rri, seg->rel, 0, NULL, 0);
		ExecOpenIndices(seg->rri, false);
		for (c = 0; c < BUFFER_ROWS; c++)
			seg->slots[c] = MakeSingleTupleTableSlot(desc, &TTSOpsHeapTuple);
		seg->nslots = 0;
		seg->bytes = 0;
	}
	return nsegs;
}

static void
close_segments(Segment *segs, int nsegs)
{
	int			i;
	int			c;

	for (i = 0; i < nsegs; i++)
	{
		if (segs[i].rri != NULL)
		{
			ExecCloseIndices(segs[i].rri);
			for (c = 0; c < BUFFER_ROWS; c++)
				ExecDropSingleTupleTableSlot(segs[i].slots[c]);
		}
		table_close(segs[i].rel, NoLock);
	}
}

/* Write a segment's buffered rows, then their index entries (as COPY). */
static void
flush_segment(Segment *seg, EState *estate, CommandId cid)
{
	int			i;

	if (seg->nslots == 0)
		return;
	table_multi_insert(seg->rel, seg->slots, seg->nslots, cid, TABLE_INSERT_SKIP_FSM, NULL);
	for (i = 0; i < seg->nslots; i++)
	{
		if (seg->rri->ri_NumIndices > 0)
			(void) ExecInsertIndexTuples(seg->rri, seg->slots[i], estate, false, false,
										 NULL, NIL);
		ResetPerTupleExprContext(estate);
		ExecClearTuple(seg->slots[i]);
	}
	seg->nslots = 0;
	seg->bytes = 0;
}

/* Move each partition's stored next offset past what this promotion inserted. */
static void
store_offsets(HTAB *parts)
{
	HASH_SEQ_STATUS seq;
	PartEntry  *e;
	long		n = hash_get_num_entries(parts);
	Datum	   *src = palloc(sizeof(Datum) * n);
	Datum	   *topic = palloc(sizeof(Datum) * n);
	Datum	   *part = palloc(sizeof(Datum) * n);
	Datum	   *next = palloc(sizeof(Datum) * n);
	Datum		v[4];
	int			k = 0;

	hash_seq_init(&seq, parts);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		if (e->last < 0)
			continue;
		src[k] = PointerGetDatum(cstring_to_text_with_len(e->key.source, e->key.source_len));
		topic[k] = PointerGetDatum(cstring_to_text_with_len(e->key.topic, e->key.topic_len));
		part[k] = Int32GetDatum(e->key.partition);
		next[k] = Int64GetDatum(e->last + 1);
		k++;
	}
	if (k == 0)
		return;
	v[0] = PointerGetDatum(construct_array(src, k, TEXTOID, -1, false, TYPALIGN_INT));
	v[1] = PointerGetDatum(construct_array(topic, k, TEXTOID, -1, false, TYPALIGN_INT));
	v[2] = PointerGetDatum(construct_array(part, k, INT4OID, 4, true, TYPALIGN_INT));
	v[3] = PointerGetDatum(construct_array(next, k, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	spool_plan(&plan_offsets,
			   "INSERT INTO spool.offsets AS o (source, topic, kafka_partition, next_offset, updated_at)"
			   " SELECT s, t, p, n, clock_timestamp() FROM unnest($1, $2, $3, $4) AS u(s, t, p, n)"
			   " ON CONFLICT (source, topic, kafka_partition) DO UPDATE"
			   "    SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset),"
			   "        updated_at = EXCLUDED.updated_at",
			   4, (Oid[]) {TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID});
	(void) spool_exec(plan_offsets, v, NULL, false, SPI_OK_INSERT);
}

/*
 * Promote the messages of staging (locked, and read with the promotion's
 * snapshot), numbering cursors from next; nmsg positions were reserved.
 * Returns false, having written nothing, when a segment cannot take a
 * multi-insert; else true with the number of entries inserted.
 */
bool
spool_promote_messages(Relation staging, int64 next, int64 nmsg, int64 *inserted)
{
	Segment		segs[MAX_SEGMENTS];
	int			nsegs;
	HTAB	   *parts;
	char	  **sources;
	int			nsources;
	EState	   *estate;
	CommandId	cid;
	TableScanDesc scan;
	TupleTableSlot *in;
	Datum		spooled_at = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	PartEntry  *last_part = NULL;
	int64		count = 0;
	int			i;

	if (RelationGetDescr(staging)->natts != STAGING_NATTS)
		elog(ERROR, "spool staging table has %d columns, expected %d",
			 RelationGetDescr(staging)->natts, STAGING_NATTS);
	memset(segs, 0, sizeof(segs));
	/* Segments made by ensure_segments in this transaction must be visible. */
	CommandCounterIncrement();
	nsegs = open_segments(next, next + Max(nmsg, 1), segs);
	if (nsegs < 0)
		return false;
	parts = load_parts(&sources, &nsources);
	estate = CreateExecutorState();
	cid = GetCurrentCommandId(true);

	in = table_slot_create(staging, NULL);
	scan = table_beginscan(staging, GetActiveSnapshot(), 0, NULL);
	while (table_scan_getnextslot(scan, ForwardScanDirection, in))
	{
		PartKey		key;
		PartEntry  *e;
		text	   *src;
		text	   *topic;
		int64		offset;
		int64		cursor;
		Segment    *seg = NULL;
		Datum		values[ENTRIES_NATTS];
		bool		isnull[ENTRIES_NATTS];
		Datum		row[SEGMENT_MAX_NATTS];
		bool		rownull[SEGMENT_MAX_NATTS];
		TupleDesc	desc;
		HeapTuple	tup;
		int			c;

		slot_getsomeattrs(in, ST_TS + 1);
		if (in->tts_isnull[ST_KIND] || DatumGetChar(in->tts_values[ST_KIND]) != 'm' ||
			in->tts_isnull[ST_POS])
			continue;
		src = DatumGetTextPP(in->tts_values[ST_SOURCE]);
		topic = DatumGetTextPP(in->tts_values[ST_TOPIC]);
		key.source = VARDATA_ANY(src);
		key.source_len = VARSIZE_ANY_EXHDR(src);
		key.topic = VARDATA_ANY(topic);
		key.topic_len = VARSIZE_ANY_EXHDR(topic);
		key.partition = DatumGetInt32(in->tts_values[ST_PARTITION]);
		if (last_part != NULL && part_match(&last_part->key, &key, sizeof(PartKey)) == 0)
			e = last_part;
		else if ((e = hash_search(parts, &key, HASH_FIND, NULL)) == NULL)
		{
			bool		known = false;

			/* First row of a partition with no stored offset: does its source exist? */
			for (i = 0; i < nsources && !known; i++)
				known = strlen(sources[i]) == key.source_len &&
					memcmp(sources[i], key.source, key.source_len) == 0;
			if (!known)
				continue;		/* a dropped source */
			key.source = pnstrdup(key.source, key.source_len);
			key.topic = pnstrdup(key.topic, key.topic_len);
			e = hash_search(parts, &key, HASH_ENTER, NULL);
			e->next_offset = 0;
			e->last = -1;
		}
		last_part = e;
		offset = DatumGetInt64(in->tts_values[ST_OFFSET]);
		if (offset < e->next_offset)
			continue;			/* already in the spool */
		e->last = Max(e->last, offset);

		cursor = next + DatumGetInt64(in->tts_values[ST_POS]);
		for (i = 0; i < nsegs; i++)
			if (cursor >= segs[i].lo && cursor < segs[i].hi)
				seg = &segs[i];
		if (seg == NULL)
			elog(ERROR, "no spool segment holds cursor " INT64_FORMAT, cursor);

		values[0] = Int64GetDatum(cursor);
		values[1] = in->tts_values[ST_SOURCE];
		values[2] = in->tts_values[ST_TOPIC];
		values[3] = in->tts_values[ST_PARTITION];
		values[4] = in->tts_values[ST_OFFSET];
		values[5] = in->tts_values[ST_KEY];
		values[6] = in->tts_values[ST_VALUE];
		values[7] = in->tts_values[ST_PAYLOAD];
		values[8] = in->tts_values[ST_HEADERS];
		values[9] = in->tts_values[ST_TS];
		values[10] = spooled_at;
		memset(isnull, false, sizeof(isnull));
		for (c = 5; c <= 9; c++)
			isnull[c] = in->tts_isnull[ST_KEY + c - 5];

		desc = RelationGetDescr(seg->rel);
		memset(rownull, true, sizeof(bool) * desc->natts);
		for (c = 0; c < ENTRIES_NATTS; c++)
		{
			row[seg->attmap[c]] = values[c];
			rownull[seg->attmap[c]] = isnull[c];
		}
		/* Copies the row out of the staging page. */
		tup = heap_form_tuple(desc, row, rownull);
		ExecStoreHeapTuple(tup, seg->slots[seg->nslots], true);
		if (seg->rel->rd_att->constr)
			ExecConstraints(seg->rri, seg->slots[seg->nslots], estate);
		seg->bytes += tup->t_len;
		if (++seg->nslots == BUFFER_ROWS || seg->bytes >= BUFFER_BYTES)
			flush_segment(seg, estate, cid);
		count++;
	}
	table_endscan(scan);
	ExecDropSingleTupleTableSlot(in);
	for (i = 0; i < nsegs; i++)
		flush_segment(&segs[i], estate, cid);
	close_segments(segs, nsegs);
	FreeExecutorState(estate);

	store_offsets(parts);
	*inserted = count;
	return true;
}
