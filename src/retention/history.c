/*-------------------------------------------------------------------------
 *
 * history.c
 *	  Retention of the history tables: dead letters, gaps, outbox dead
 *	  letters, consumed nonces and the operations logs (nonce_set_next,
 *	  seeks, rewinds).  Rows older than their table's
 *	  spool.*_retention setting are removed oldest first, in batches of
 *	  spool.retention_batch_size rows, one short transaction per batch, so
 *	  that no long transaction holds vacuum back and the caller (the
 *	  promoter) can do its own work between two batches.
 *
 * A batch finds its rows through the index on the table's time column and
 * deletes them by ctid (a TID scan, no second index probe); the time
 * condition is repeated on the DELETE so that a row changed in between is
 * checked again.  Each batch starts its index scan at the newest time the
 * previous batch removed, so it does not wade again through the index
 * entries of the rows already removed (vacuum has not cleaned them yet).  Only consumed nonces are removed: allocated ones are
 * still in use and released ones are handed out again.  Removing them is
 * safe because new nonces come from nonce_signer.next_nonce, which never
 * goes down, and never from the rows.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

#include "retention/retention.h"

typedef struct HistoryTable
{
	const char *name;
	int		   *retention_s;	/* the setting; 0 keeps rows forever */
	const char *sql;			/* $1 retention in seconds, $2 batch size,
								 * $3 where to start; returns count and the
								 * newest time removed */
	SPIPlanPtr	plan;
	bool		pending;		/* rows may be left to remove in this pass */
	TimestampTz from;			/* newest time removed so far in this pass */
	uint64		removed;		/* in this pass */
} HistoryTable;

#define OLDER(col) col " < now() - make_interval(secs => $1)"
#define BATCH_DELETE(tab, col, extra) \
	"WITH d AS (DELETE FROM " tab " WHERE " OLDER(col) extra " AND ctid = ANY (ARRAY(" \
	"SELECT ctid FROM " tab " WHERE " col " >= $3 AND " OLDER(col) extra \
	" ORDER BY " col " LIMIT $2)) RETURNING " col ")" \
	" SELECT count(*), max(" col ") FROM d"

static HistoryTable tables[] = {
	{"spool.dead_letters", &spool_dead_letters_retention_s,
	BATCH_DELETE("spool.dead_letters", "at",
				 " AND replay_requested_at IS NULL")},
	{"spool.gaps", &spool_gaps_retention_s,
	BATCH_DELETE("spool.gaps", "at", "")},
	{"spool.outbox_dead", &spool_outbox_dead_retention_s,
	BATCH_DELETE("spool.outbox_dead", "failed_at", "")},
	{"spool.nonce_store (consumed)", &spool_nonce_history_retention_s,
	BATCH_DELETE("spool.nonce_store", "updated_at", " AND state = 'consumed'")},
	/* The operations logs (since 0.2). */
	{"spool.nonce_set_next_log", &spool_operations_retention_s,
	BATCH_DELETE("spool.nonce_set_next_log", "at", "")},
	{"spool.source_seeks", &spool_operations_retention_s,
	BATCH_DELETE("spool.source_seeks", "requested_at", " AND state <> 'pending'")},
	{"spool.processor_rewinds", &spool_operations_retention_s,
	BATCH_DELETE("spool.processor_rewinds", "at", "")},
};

#define NTABLES lengthof(tables)

static int	current = 0;

/*
 * Start a pass over every table with a retention.  Returns whether there is
 * anything to do; spool_history_step then does it batch by batch.
 */
bool
spool_history_begin(void)
{
	bool		any = false;

	for (int i = 0; i < NTABLES; i++)
	{
		tables[i].pending = *tables[i].retention_s > 0;
		tables[i].removed = 0;
		TIMESTAMP_NOBEGIN(tables[i].from);
		any |= tables[i].pending;
	}
	current = 0;
	return any;
}

/*
 * Remove one batch from the next table with rows left, in its own
 * transaction.  Returns false once the pass is over (a table is done when a
 * batch finds fewer rows than the batch size).
 */
bool
spool_history_step(void)
{
	HistoryTable *t = NULL;
	Datum		v[3];
	uint64		n;
	bool		isnull;

	for (int i = 0; i < NTABLES && t == NULL; i++)
	{
		HistoryTable *c = &tables[(current + i) % NTABLES];

		if (c->pending)
		{
			t = c;
			current = (current + i) % NTABLES;
		}
	}
	if (t == NULL)
		return false;
	/* Set to 0 (keep forever) by a reload since the pass began. */
	if (*t->retention_s <= 0)
	{
		t->pending = false;
		return spool_history_step();
	}

	v[0] = Int32GetDatum(*t->retention_s);
	v[1] = Int32GetDatum(spool_retention_batch_size);
	v[2] = TimestampTzGetDatum(t->from);
	spool_begin_txn("removing old history rows");
	spool_plan(&t->plan, t->sql, 3, (Oid[]) {INT4OID, INT4OID, TIMESTAMPTZOID});
	(void) spool_exec(t->plan, v, NULL, false, SPI_OK_SELECT);
	n = (uint64) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (n > 0)
		t->from = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2,
													&isnull));
	spool_end_txn();

	t->removed += n;
	if (n < (uint64) spool_retention_batch_size)
	{
		t->pending = false;
		if (t->removed > 0)
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("spool retention removed " UINT64_FORMAT " rows of %s",
							t->removed, t->name)));
	}
	/* Round robin: one busy table does not hold the others back. */
	current = (current + 1) % NTABLES;
	for (int i = 0; i < NTABLES; i++)
		if (tables[i].pending)
			return true;
	return false;
}
