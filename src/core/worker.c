/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  What every background worker of spool_ext shares: how the launcher
 *	  fills in a dynamic worker, how a worker notices that the launcher that
 *	  started it is gone, the start of each pass of a worker's loop, and the
 *	  restart-with-backoff bookkeeping of a worker the launcher keeps running.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "core/core.h"

#define RESTART_BACKOFF_MIN_MS		1000
#define RESTART_BACKOFF_MAX_MS		30000
#define HEALTHY_RUN_MS				10000

/* Wake the launcher: a source, processor or target was created or changed. */
void
spool_wake_launcher(void)
{
	Latch	   *latch;

	LWLockAcquire(spool_core_shared->lock, LW_SHARED);
	latch = spool_core_shared->launcher_latch;
	LWLockRelease(spool_core_shared->lock);
	if (latch)
		SetLatch(latch);
}

/*
 * A dynamic worker in our database, reporting its state changes to us.  Its
 * bgw_main_arg carries our generation in the high 32 bits (see
 * spool_exit_if_orphaned); callers may use the low 32 bits.
 */
void
spool_fill_worker(BackgroundWorker *bgw, const char *function, const char *name)
{
	memset(bgw, 0, sizeof(*bgw));
	bgw->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw->bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw->bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw->bgw_library_name, BGW_MAXLEN, "spool_ext");
	snprintf(bgw->bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(bgw->bgw_name, BGW_MAXLEN, "%s", name);
	snprintf(bgw->bgw_type, BGW_MAXLEN, "%s", name);
	bgw->bgw_notify_pid = MyProcPid;
	bgw->bgw_main_arg = Int64GetDatum((int64) pg_atomic_read_u32(&spool_core_shared->launcher_generation) << 32);
}

/*
 * The start of a pass of a worker's loop: interrupts, an exit if the
 * launcher that started the worker is gone (orphanable), a pending
 * configuration reload, and cxt (if any) reset and made current.
 */
void
spool_worker_pass(MemoryContext cxt, bool orphanable)
{
	if (cxt)
	{
		MemoryContextReset(cxt);
		MemoryContextSwitchTo(cxt);
	}
	CHECK_FOR_INTERRUPTS();
	if (orphanable)
		spool_exit_if_orphaned();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}

/*
 * Exit quietly when the launcher that started this worker is gone (a new
 * launcher has started its own workers, or will).  Called in worker loops.
 */
void
spool_exit_if_orphaned(void)
{
	uint32		mine = (uint32) (DatumGetInt64(MyBgworkerEntry->bgw_main_arg) >> 32);

	if (pg_atomic_read_u32(&spool_core_shared->launcher_generation) != mine)
	{
		ereport(LOG, (errmsg("%s: the launcher that started it is gone; exiting",
							 MyBgworkerEntry->bgw_name)));
		proc_exit(0);
	}
}

bool
spool_track_start(WorkerTrack *t, BackgroundWorker *bgw, TimestampTz now)
{
	/* The handle outlives the pass: allocate it where the loop reset cannot reach. */
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	bool		ok = RegisterDynamicBackgroundWorker(bgw, &t->handle);

	MemoryContextSwitchTo(old);
	if (!ok)
	{
		t->handle = NULL;
		t->next_start = TimestampTzPlusMilliseconds(now, RESTART_BACKOFF_MIN_MS * 5);
		ereport(WARNING,
				(errmsg("could not start %s", bgw->bgw_name),
				 errhint("Raise max_worker_processes: the launcher needs one slot for the promoter, one per enabled source, one per processor replica, one per outbox target shard and one per nonce worker (plus one per nonce worker being replaced).")));
		return false;
	}
	t->started_at = now;
	return true;
}

/*
 * If t's process has exited, forget it and schedule its restart: at once
 * after a healthy run, else with a backoff doubling from 1 s to 30 s.
 */
bool
spool_track_exited(WorkerTrack *t, TimestampTz now, const char *what)
{
	pid_t		pid;
	BgwHandleStatus status;
	bool		healthy;

	if (t->handle == NULL)
		return false;
	status = GetBackgroundWorkerPid(t->handle, &pid);
	if (status != BGWH_STOPPED && status != BGWH_POSTMASTER_DIED)
		return false;
	healthy = now - t->started_at >= (int64) HEALTHY_RUN_MS * 1000;
	pfree(t->handle);
	t->handle = NULL;
	t->backoff_ms = healthy ? 0 :
		Min(Max(t->backoff_ms * 2, RESTART_BACKOFF_MIN_MS), RESTART_BACKOFF_MAX_MS);
	t->next_start = TimestampTzPlusMilliseconds(now, t->backoff_ms);
	if (t->backoff_ms > 0)
		ereport(LOG,
				(errmsg("%s exited; restarting in %d ms", what, t->backoff_ms)));
	return true;
}

PG_FUNCTION_INFO_V1(spool_launcher_wakeup);

/*
 * SQL: spool._launcher_wakeup() — called at CREATE EXTENSION so the launcher
 * starts the workers at once instead of at its next periodic check.
 */
Datum
spool_launcher_wakeup(PG_FUNCTION_ARGS)
{
	if (spool_core_shared != NULL)
		spool_wake_launcher();
	PG_RETURN_VOID();
}
