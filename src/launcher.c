/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The spool launcher: a static background worker in the database named by
 *	  spool.database.  Once the extension exists there, it starts the nonce
 *	  service workers and supervises them: a worker that exits is restarted
 *	  with backoff, and a worker that makes no progress on pending requests
 *	  for spool.nonce_stall_timeout is replaced (its requests are re-queued
 *	  for the replacement, which takes the signer leases over).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "spool.h"

PGDLLEXPORT void spool_launcher_main(Datum main_arg);

#define LAUNCHER_NAPTIME_MS			250
#define EXTENSION_CHECK_MS			2000
#define RESTART_BACKOFF_MIN_MS		1000
#define RESTART_BACKOFF_MAX_MS		30000
#define HEALTHY_RUN_MS				10000

typedef struct WorkerTrack
{
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
	TimestampTz next_start;
	int			backoff_ms;
} WorkerTrack;

static WorkerTrack tracks[SPOOL_MAX_NONCE_WORKERS];

static void launcher_detach(int code, Datum arg);
static bool extension_installed(void);
static void supervise_worker(int w, TimestampTz now);
static void start_worker(int w, TimestampTz now);
static void reclaim_worker(int w, const char *why);
static void stop_all_workers(void);

void
spool_register_launcher(void)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 5;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "spool_ext");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "spool_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "spool launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "spool launcher");
	RegisterBackgroundWorker(&bgw);
}

void
spool_wake_launcher(void)
{
	Latch	   *latch;

	LWLockAcquire(spool_shared->queue_lock, LW_SHARED);
	latch = spool_shared->launcher_latch;
	LWLockRelease(spool_shared->queue_lock);
	if (latch)
		SetLatch(latch);
}

static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(spool_shared->queue_lock, LW_EXCLUSIVE);
	if (spool_shared->launcher_pid == MyProcPid)
	{
		spool_shared->launcher_pid = 0;
		spool_shared->launcher_latch = NULL;
	}
	LWLockRelease(spool_shared->queue_lock);
}

void
spool_launcher_main(Datum main_arg)
{
	TimestampTz next_check = 0;
	bool		installed = false;
	int			w;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(spool_database, NULL, 0);

	LWLockAcquire(spool_shared->queue_lock, LW_EXCLUSIVE);
	spool_shared->launcher_pid = MyProcPid;
	spool_shared->launcher_latch = MyLatch;
	spool_shared->database_oid = MyDatabaseId;
	LWLockRelease(spool_shared->queue_lock);
	before_shmem_exit(launcher_detach, (Datum) 0);

	/*
	 * Workers of a previous launcher incarnation keep running; we cannot
	 * watch them through handles, so hand their slots to fresh workers.
	 */
	for (w = 0; w < spool_shared->nworkers; w++)
		if (spool_shared->workers[w].pid != 0)
			reclaim_worker(w, "the launcher restarted");

	for (;;)
	{
		TimestampTz now;
		int			rc;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		now = GetCurrentTimestamp();
		if (now >= next_check)
		{
			bool		was = installed;

			installed = extension_installed();
			next_check = TimestampTzPlusMilliseconds(now, EXTENSION_CHECK_MS);
			if (was && !installed)
				stop_all_workers();
		}
		if (installed)
			for (w = 0; w < spool_shared->nworkers; w++)
				supervise_worker(w, now);

		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   LAUNCHER_NAPTIME_MS, PG_WAIT_EXTENSION);
		if ((rc & WL_LATCH_SET) && !installed)
			next_check = 0;		/* a wakeup (CREATE EXTENSION) checks at once */
		ResetLatch(MyLatch);
	}
}

static bool
extension_installed(void)
{
	bool		found;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "checking for spool_ext");
	found = OidIsValid(get_extension_oid("spool_ext", true));
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	return found;
}

static void
supervise_worker(int w, TimestampTz now)
{
	WorkerTrack *t = &tracks[w];
	SpoolNonceWorkerSlot *slot = &spool_shared->workers[w];

	if (t->handle != NULL)
	{
		pid_t		pid;
		BgwHandleStatus status = GetBackgroundWorkerPid(t->handle, &pid);

		if (status == BGWH_STOPPED || status == BGWH_POSTMASTER_DIED)
		{
			bool		healthy = now - t->started_at >= (int64) HEALTHY_RUN_MS * 1000;

			pfree(t->handle);
			t->handle = NULL;
			t->backoff_ms = healthy ? 0 :
				Min(Max(t->backoff_ms * 2, RESTART_BACKOFF_MIN_MS), RESTART_BACKOFF_MAX_MS);
			t->next_start = TimestampTzPlusMilliseconds(now, t->backoff_ms);
			reclaim_worker(w, "it exited");
			if (t->backoff_ms > 0)
				ereport(LOG,
						(errmsg("spool nonce worker %d exited; restarting in %d ms",
								w, t->backoff_ms)));
		}
		else
		{
			TimestampTz heartbeat;
			int			pending;

			LWLockAcquire(spool_shared->queue_lock, LW_SHARED);
			heartbeat = slot->heartbeat;
			pending = slot->nqueued + slot->ninprogress;
			LWLockRelease(spool_shared->queue_lock);
			if (pending > 0 &&
				now - heartbeat > (int64) spool_nonce_stall_timeout_ms * 1000)
			{
				ereport(LOG,
						(errmsg("spool nonce worker %d made no progress on %d requests for %d ms; replacing it",
								w, pending, spool_nonce_stall_timeout_ms)));
				if (slot->pid != 0)
					kill(slot->pid, SIGTERM);	/* acts when it resumes */
				reclaim_worker(w, "it stalled");
				pfree(t->handle);
				t->handle = NULL;
				t->next_start = now;
			}
		}
	}
	if (t->handle == NULL && now >= t->next_start)
		start_worker(w, now);
}

/*
 * Take slot w away from its current process: bump the generation (the old
 * process exits when it notices), forget its owner name (so its leases may be
 * taken over), re-queue its in-progress requests at the head of the queue and
 * free the abandoned ones.
 */
static void
reclaim_worker(int w, const char *why)
{
	SpoolNonceWorkerSlot *slot = &spool_shared->workers[w];
	int			requeued = 0;
	int			i;

	LWLockAcquire(spool_shared->queue_lock, LW_EXCLUSIVE);
	slot->generation++;
	slot->pid = 0;
	slot->latch = NULL;
	slot->owner[0] = '\0';
	for (i = spool_shared->queue_size - 1; i >= 0; i--)
	{
		SpoolNonceReq *req = &spool_requests[i];

		if (req->worker != w || req->in_queue)
			continue;
		if (req->state == REQ_INPROGRESS)
		{
			spool_request_enqueue(w, i, true);
			requeued++;
		}
		else if (req->state == REQ_ABANDONED)
			spool_request_free(i);
	}
	slot->ninprogress = 0;
	/* The stall clock restarts for the replacement. */
	slot->heartbeat = GetCurrentTimestamp();
	LWLockRelease(spool_shared->queue_lock);
	if (requeued > 0)
		ereport(LOG,
				(errmsg("spool nonce worker %d: re-queued %d in-progress requests because %s",
						w, requeued, why)));
}

static void
start_worker(int w, TimestampTz now)
{
	BackgroundWorker bgw;
	uint32		generation;
	WorkerTrack *t = &tracks[w];

	LWLockAcquire(spool_shared->queue_lock, LW_SHARED);
	generation = spool_shared->workers[w].generation;
	LWLockRelease(spool_shared->queue_lock);

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "spool_ext");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "spool_nonce_worker_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "spool nonce worker %d", w);
	snprintf(bgw.bgw_type, BGW_MAXLEN, "spool nonce worker %d", w);
	bgw.bgw_main_arg = Int32GetDatum(w);
	memcpy(bgw.bgw_extra, &generation, sizeof(uint32));
	bgw.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&bgw, &t->handle))
	{
		t->handle = NULL;
		t->next_start = TimestampTzPlusMilliseconds(now, RESTART_BACKOFF_MIN_MS * 5);
		ereport(WARNING,
				(errmsg("could not start spool nonce worker %d", w),
				 errhint("Raise max_worker_processes: each nonce worker needs one slot, and a replaced, stalled worker keeps its slot until it exits.")));
		return;
	}
	t->started_at = now;
}

static void
stop_all_workers(void)
{
	int			w;

	for (w = 0; w < spool_shared->nworkers; w++)
	{
		if (tracks[w].handle == NULL)
			continue;
		TerminateBackgroundWorker(tracks[w].handle);
		pfree(tracks[w].handle);
		tracks[w].handle = NULL;
		reclaim_worker(w, "the extension was dropped");
	}
}
