/*-------------------------------------------------------------------------
 *
 * launch.c
 *	  Outbox dispatchers as a kind the launcher supervises: one
 *	  shared-memory slot and one background worker per target shard.  A
 *	  terminated shard worker is back at once; one that exited on an error
 *	  is restarted with a backoff; the workers of a dropped target are
 *	  stopped.  Also spool.outbox_runtime(),
 *	  which reads the slots for spool.outbox_status.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "outbox/outbox.h"

SpoolOutboxShared *spool_outbox_shared = NULL;
pg_atomic_uint64 *spool_outbox_lowest = NULL;

PG_FUNCTION_INFO_V1(spool_outbox_runtime);

static void list_shards(SpoolSupervisor *s);
static void fill_slot(void *slot, const SpoolUnit *u);
static char *shard_label(const SpoolUnit *u, int i);
static bool shard_failed(const SpoolUnit *u, int i);
static SpoolVerdict check_shard(const SpoolUnit *u, int i, TimestampTz now);
static void outbox_attach(bool found);

/* One slot per target shard, claimed by the supervisor. */
SpoolSlots	spool_dispatcher_slots;

const SpoolKindOps spool_dispatcher_ops = {
	.list = list_shards,
	.label = shard_label,
	.failed = shard_failed,
	.check = check_shard,
	.dropped = spool_outbox_forget_catalog,
};

/* The slot of a target's shard, or NULL (caller may hold the outbox lock). */
SpoolDispatchSlot *
spool_dispatch_slot_of(int target_id, int shard)
{
	int			i;

	for (i = 0; i < SPOOL_MAX_DISPATCHERS; i++)
	{
		SpoolDispatchSlot *ds = &spool_outbox_shared->dispatchers[i];

		if (ds->in_use && ds->target_id == target_id && ds->shard == shard)
			return ds;
	}
	return NULL;
}

/*
 * One unit per shard of every target: (name, target id, shard), at the
 * version of the target's options.
 */
static void
list_shards(SpoolSupervisor *s)
{
	uint64		n;

	if (SPI_execute("SELECT t.id, s, t.name, t.options::text"
					" FROM spool.targets t,"
					" generate_series(0, (t.options->>'shards')::int - 1) s ORDER BY t.id, s",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	for (n = 0; n < SPI_processed; n++)
	{
		HeapTuple	tup = SPI_tuptable->vals[n];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		spool_want(s, SPI_getvalue(tup, desc, 3),
				   DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull)),
				   DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull)), 1,
				   spool_outbox_options_hash(SPI_getvalue(tup, desc, 4)));
	}
}

/* Keep the atomics initialised; reset everything else. */
static void
fill_slot(void *slot, const SpoolUnit *u)
{
	SpoolDispatchSlot *ds = slot;

	memset(&ds->position, 0, sizeof(SpoolDispatchSlot) - offsetof(SpoolDispatchSlot, position));
	ds->target_id = (int) u->id;
	ds->shard = u->index;
	strlcpy(ds->target, u->name, NAMEDATALEN);
	ds->pid = 0;
	ds->latch = NULL;
	pg_atomic_write_u64(&ds->committed, 0);
	pg_atomic_write_u32(&ds->retry_dirty, 0);
}

static char *
shard_label(const SpoolUnit *u, int i)
{
	return psprintf("%s/%d", u->name, u->index);
}

/* A shard worker that exited on an error backs off; a terminated one is back at once. */
static bool
shard_failed(const SpoolUnit *u, int i)
{
	return spool_slot_flag(spool_outbox_shared->lock,
						   &spool_outbox_shared->dispatchers[u->slot].exit_error);
}

/*
 * alter_target: a worker running with older options delivers what it holds,
 * exits, and is back with the new options.
 */
static SpoolVerdict
check_shard(const SpoolUnit *u, int i, TimestampTz now)
{
	SpoolDispatchSlot *ds = &spool_outbox_shared->dispatchers[u->slot];
	uint32		loaded;

	LWLockAcquire(spool_outbox_shared->lock, LW_SHARED);
	loaded = ds->pid != 0 ? ds->options_hash : 0;
	LWLockRelease(spool_outbox_shared->lock);
	return (loaded != 0 && loaded != u->version) ? SPOOL_RESTART : SPOOL_KEEP;
}

static const char *
state_name(DispatchState st)
{
	switch (st)
	{
		case DS_STOPPED:
			return "stopped";
		case DS_IDLE:
			return "idle";
		case DS_DELIVERING:
			return "delivering";
		case DS_BARRIER:
			return "barrier";
		case DS_RETRYING:
			return "retrying";
		case DS_ERROR:
			return "error";
	}
	return "?";
}

/* SQL: spool.outbox_runtime() — one row per claimed dispatcher slot. */
Datum
spool_outbox_runtime(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	spool_require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; i < SPOOL_MAX_DISPATCHERS; i++)
	{
		SpoolDispatchSlot c;
		Datum		v[31];
		bool		n[31];
		int			k = 0;

		LWLockAcquire(spool_outbox_shared->lock, LW_SHARED);
		memcpy(&c, &spool_outbox_shared->dispatchers[i], sizeof(c));
		LWLockRelease(spool_outbox_shared->lock);
		if (!c.in_use)
			continue;
		memset(n, false, sizeof(n));
		v[k++] = Int32GetDatum(c.target_id);
		v[k++] = Int32GetDatum(c.shard);
		v[k] = Int32GetDatum(c.pid);
		n[k++] = c.pid == 0;
		v[k++] = CStringGetTextDatum(c.pid == 0 ? "stopped" : state_name(c.state));
		v[k++] = Int64GetDatum(c.delivered);
		v[k++] = Int64GetDatum(c.flushes[FLUSH_SIZE]);
		v[k++] = Int64GetDatum(c.flushes[FLUSH_INTERVAL]);
		v[k++] = Int64GetDatum(c.flushes[FLUSH_BARRIER]);
		v[k++] = Int64GetDatum(c.flushes[FLUSH_CLOSE]);
#define QUANT(h, nb, first, q, max) \
		do { double x_ = spool_hist_quantile((h), (nb), (first), (q), (max)); \
			 v[k] = Float8GetDatum(x_); n[k++] = x_ < 0; } while (0)
		QUANT(c.batch_hist, HIST_BATCH, 1, 0.5, (double) c.batch_max);
		QUANT(c.batch_hist, HIST_BATCH, 1, 0.99, (double) c.batch_max);
		v[k] = Int64GetDatum(c.batch_max);
		n[k++] = c.batch_sum == 0 && c.flushes[0] + c.flushes[1] + c.flushes[2] + c.flushes[3] == 0;
		QUANT(c.flush_hist, HIST_FLUSH, 0.25, 0.5, c.flush_ms_max);
		QUANT(c.flush_hist, HIST_FLUSH, 0.25, 0.99, c.flush_ms_max);
		v[k] = Float8GetDatum(c.flush_ms_max);
		n[k++] = c.flushes[0] + c.flushes[1] + c.flushes[2] + c.flushes[3] == 0;
		v[k++] = Int64GetDatum(c.barriers);
		v[k] = Float8GetDatum(c.drain_ms_last);
		n[k++] = c.barriers == 0;
		QUANT(c.drain_hist, HIST_DRAIN, 1, 0.5, c.drain_ms_max);
		v[k] = Float8GetDatum(c.drain_ms_max);
		n[k++] = c.barriers == 0;
#undef QUANT
		v[k++] = Int64GetDatum(c.retries);
		v[k++] = Int32GetDatum(c.blocked_keys);
		v[k] = CStringGetTextDatum(c.last_error);
		n[k++] = c.last_error[0] == '\0';
		v[k] = TimestampTzGetDatum(c.last_error_at);
		n[k++] = c.last_error_at == 0;
		v[k] = TimestampTzGetDatum(c.last_flush_at);
		n[k++] = c.last_flush_at == 0;
		v[k] = TimestampTzGetDatum(c.started_at);
		n[k++] = c.started_at == 0;
		v[k++] = spool_hist_array(c.batch_hist, HIST_BATCH);
		v[k++] = spool_hist_array(c.flush_hist, HIST_FLUSH);
		v[k++] = spool_hist_array(c.drain_hist, HIST_DRAIN);
		v[k++] = Int64GetDatum(c.batch_sum);
		v[k++] = Float8GetDatum(c.flush_ms_sum);
		v[k++] = Float8GetDatum(c.drain_ms_sum);
		Assert(k == 31);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
	}
	return (Datum) 0;
}

static void
outbox_attach(bool found)
{
	int			i;

	if (!found)
	{
		spool_outbox_shared->lock = spool_shmem_lock("spool_ext outbox");
		pg_atomic_init_u64(&spool_outbox_shared->outbox_seen, 0);
		pg_atomic_init_u32(&spool_outbox_shared->targets_generation, 0);
		for (i = 0; i < SPOOL_MAX_DISPATCHERS; i++)
		{
			pg_atomic_init_u64(&spool_outbox_shared->dispatchers[i].committed, 0);
			pg_atomic_init_u32(&spool_outbox_shared->dispatchers[i].retry_dirty, 0);
		}
		for (i = 0; i < MaxBackends; i++)
			pg_atomic_init_u64(&spool_outbox_lowest[i], 0);
	}
	spool_slots_attach(&spool_dispatcher_slots, spool_outbox_shared->lock, spool_outbox_shared->dispatchers,
					   sizeof(SpoolDispatchSlot), offsetof(SpoolDispatchSlot, in_use), fill_slot);
}

/* Shared memory: the dispatcher slots, then each backend's lowest open id. */
const SpoolShmemArea spool_outbox_shmem = {
	"spool_ext outbox", true, sizeof(SpoolOutboxShared), (void **) &spool_outbox_shared,
	sizeof(pg_atomic_uint64), &MaxBackends, (void **) &spool_outbox_lowest, outbox_attach
};
