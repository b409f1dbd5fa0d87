/*-------------------------------------------------------------------------
 *
 * stale.c
 *	  Stale spool consumers: a registered consumer or a processor whose
 *	  cursor has not moved for spool.max_retention while the spool moved on
 *	  (spool.consumer_status says which) holds every later segment back.
 *	  Each one is reported as a WARNING once per spool.max_retention; with
 *	  spool.max_retention_action = 'drop' it is dropped, so that retention
 *	  passes it: a registered consumer loses its registration, a processor
 *	  is stopped and detached (spool.start_processor then refuses it until
 *	  it is dropped and created again).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "retention/retention.h"

typedef struct StaleConsumer
{
	char	   *kind;			/* 'consumer' or 'processor' */
	char	   *name;
	int64		cursor;
	int64		lag;
	char	   *idle;			/* for how long it has held the spool back */
	TimestampTz warned_at;
} StaleConsumer;

/* The stale consumers of the previous check, with when each was warned about. */
static MemoryContext stale_cxt = NULL;
static List *warned = NIL;

static SPIPlanPtr plan_stale;
static SPIPlanPtr plan_drop_consumer;
static SPIPlanPtr plan_drop_processor;

static void drop_stale(StaleConsumer *c);

/*
 * Check the consumers, warn about the stale ones not warned about during
 * the last spool.max_retention, and drop them when so configured.  Called
 * by the promoter before segment retention, so that what a dropped consumer
 * held is released in the same pass.
 */
void
spool_stale_consumers(void)
{
	MemoryContext old_cxt = stale_cxt;
	MemoryContext caller = CurrentMemoryContext;
	List	   *now_stale = NIL;
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;

	if (spool_max_retention_s <= 0)
	{
		if (old_cxt)
			MemoryContextDelete(old_cxt);
		stale_cxt = NULL;
		warned = NIL;
		return;
	}
	stale_cxt = AllocSetContextCreate(TopMemoryContext, "spool stale consumers",
									  ALLOCSET_SMALL_SIZES);

	spool_begin_txn("looking for stale spool consumers");
	spool_plan(&plan_stale,
			   "SELECT kind, name, cursor, lag,"
			   " (now() - greatest(moved_at, behind_since))::text"
			   " FROM spool.consumer_status WHERE stale ORDER BY kind, name",
			   0, NULL);
	(void) spool_exec(plan_stale, NULL, NULL, true, SPI_OK_SELECT);
	MemoryContextSwitchTo(stale_cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		StaleConsumer *c = palloc0(sizeof(StaleConsumer));
		bool		isnull;

		c->kind = SPI_getvalue(tup, desc, 1);
		c->name = SPI_getvalue(tup, desc, 2);
		c->cursor = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		c->lag = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		c->idle = SPI_getvalue(tup, desc, 5);
		now_stale = lappend(now_stale, c);
	}
	MemoryContextSwitchTo(caller);
	spool_end_txn();

	foreach(lc, now_stale)
	{
		StaleConsumer *c = lfirst(lc);
		ListCell   *lw;

		foreach(lw, warned)
		{
			StaleConsumer *w = lfirst(lw);

			if (strcmp(w->kind, c->kind) == 0 && strcmp(w->name, c->name) == 0 &&
				now - w->warned_at < (int64) spool_max_retention_s * USECS_PER_SEC)
				c->warned_at = w->warned_at;
		}
		if (c->warned_at == 0)
		{
			c->warned_at = now;
			ereport(WARNING,
					(errcode(ERRCODE_WARNING),
					 errmsg("spool %s \"%s\" is stale: its cursor " INT64_FORMAT " has not moved for %s, " INT64_FORMAT " entries behind",
							c->kind, c->name, c->cursor, c->idle, c->lag),
					 errdetail("It holds back every spool segment after its cursor."),
					 spool_max_retention_action == SPOOL_MAX_RETENTION_DROP ?
					 errhint("spool.max_retention_action is 'drop': it is dropped now.") :
					 errhint("Commit its cursor, drop it, or set spool.max_retention_action to 'drop'.")));
		}
		if (spool_max_retention_action == SPOOL_MAX_RETENTION_DROP)
			drop_stale(c);
	}
	warned = now_stale;
	if (old_cxt)
		MemoryContextDelete(old_cxt);
}

/*
 * Drop a stale consumer in a transaction of its own, unless its cursor moved
 * since it was found stale.
 */
static void
drop_stale(StaleConsumer *c)
{
	Datum		v[2] = {CStringGetTextDatum(c->name), Int64GetDatum(c->cursor)};
	bool		processor = strcmp(c->kind, "processor") == 0;
	uint64		n;

	spool_begin_txn("dropping a stale spool consumer");
	if (processor)
	{
		spool_plan(&plan_drop_processor,
				   "WITH d AS (DELETE FROM spool.consumers"
				   "            WHERE name = 'processor:' || $1 AND committed_cursor = $2"
				   "            RETURNING 1)"
				   " UPDATE spool.processors SET enabled = false, detached_at = now()"
				   "  WHERE name = $1 AND EXISTS (SELECT FROM d)",
				   2, (Oid[]) {TEXTOID, INT8OID});
		n = spool_exec(plan_drop_processor, v, NULL, false, SPI_OK_UPDATE);
	}
	else
	{
		spool_plan(&plan_drop_consumer,
				   "DELETE FROM spool.consumers WHERE name = $1 AND committed_cursor = $2",
				   2, (Oid[]) {TEXTOID, INT8OID});
		n = spool_exec(plan_drop_consumer, v, NULL, false, SPI_OK_DELETE);
	}
	spool_end_txn();
	if (n == 0)
		return;
	if (processor)
		spool_wake_launcher();
	ereport(WARNING,
			(errcode(ERRCODE_WARNING),
			 errmsg("spool %s \"%s\" dropped by spool.max_retention at cursor " INT64_FORMAT,
					c->kind, c->name, c->cursor),
			 processor ?
			 errdetail("The processor is stopped and detached from the spool; spool.start_processor refuses it until it is dropped and created again.") :
			 errdetail("The consumer's registration is removed; spool segments it held back are released.")));
}
