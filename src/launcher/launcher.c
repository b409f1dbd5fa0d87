/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The spool launcher: a static background worker in the database named by
 *	  spool.database.  Once the extension exists there, it starts and
 *	  supervises the dynamic workers: the promoter, one ingest worker per
 *	  enabled source, and the nonce service workers.  A worker that exits is
 *	  restarted with backoff (no crash loop while a broker is down); a nonce
 *	  worker that makes no progress on pending requests for
 *	  spool.nonce_stall_timeout is replaced (its requests are re-queued for
 *	  the replacement, which takes the signer leases over).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"
#include "launcher/launcher.h"
#include "nonce/nonce.h"
#include "outbox/outbox.h"
#include "processor/processor.h"

PGDLLEXPORT void spool_launcher_main(Datum main_arg);

#define LAUNCHER_NAPTIME_MS			250
#define EXTENSION_CHECK_MS			2000
#define SOURCE_CHECK_MS				1000
#define MAX_SOURCES					256


static WorkerTrack tracks[SPOOL_MAX_NONCE_WORKERS];
static WorkerTrack promoter_track;
static WorkerTrack source_tracks[MAX_SOURCES];
static int	nsource_tracks = 0;

static void launcher_detach(int code, Datum arg);
static bool extension_installed(void);
static void supervise_worker(int w, TimestampTz now);
static void start_worker(int w, TimestampTz now);
static void supervise_promoter(TimestampTz now);
static void supervise_sources(TimestampTz now, bool refresh);
static void reclaim_worker(int w, const char *why);
static void stop_all_workers(void);
static void reset_staging(void);

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

static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(spool_core_shared->lock, LW_EXCLUSIVE);
	if (spool_core_shared->launcher_pid == MyProcPid)
	{
		spool_core_shared->launcher_pid = 0;
		spool_core_shared->launcher_latch = NULL;
	}
	LWLockRelease(spool_core_shared->lock);
}

void
spool_launcher_main(Datum main_arg)
{
	TimestampTz next_check = 0;
	TimestampTz next_source_check = 0;
	bool		installed = false;
	MemoryContext loop_cxt;
	int			w;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(spool_database, NULL, 0);
	spool_worker_pin_settings();

	/* Workers of an earlier launcher see the new generation and exit. */
	pg_atomic_fetch_add_u32(&spool_core_shared->launcher_generation, 1);
	LWLockAcquire(spool_core_shared->lock, LW_EXCLUSIVE);
	spool_core_shared->launcher_pid = MyProcPid;
	spool_core_shared->launcher_latch = MyLatch;
	spool_core_shared->database_oid = MyDatabaseId;
	LWLockRelease(spool_core_shared->lock);
	before_shmem_exit(launcher_detach, (Datum) 0);

	/*
	 * Workers of a previous launcher incarnation keep running; we cannot
	 * watch them through handles, so hand their slots to fresh workers.
	 */
	for (w = 0; w < spool_nonce_shared->nworkers; w++)
		if (spool_nonce_shared->workers[w].pid != 0)
			reclaim_worker(w, "the launcher restarted");

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "spool launcher loop",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TimestampTz now;
		int			rc;
		bool		refresh;

		/* Names and messages built in a pass are freed with it. */
		spool_worker_pass(loop_cxt, false);

		now = GetCurrentTimestamp();
		if (now >= next_check)
		{
			bool		was = installed;

			installed = extension_installed();
			next_check = TimestampTzPlusMilliseconds(now, EXTENSION_CHECK_MS);
			if (was && !installed)
				stop_all_workers();
			if (!was && installed)
				reset_staging();
		}
		if (installed)
		{
			supervise_promoter(now);
			refresh = now >= next_source_check;
			supervise_sources(now, refresh);
			spool_supervise_processors(now, refresh);
			spool_supervise_dispatchers(now, refresh);
			if (refresh)
				next_source_check = TimestampTzPlusMilliseconds(now, SOURCE_CHECK_MS);
			for (w = 0; w < spool_nonce_shared->nworkers; w++)
				supervise_worker(w, now);
		}

		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   LAUNCHER_NAPTIME_MS, PG_WAIT_EXTENSION);
		if (rc & WL_LATCH_SET)
		{
			/* A wakeup: CREATE EXTENSION, or a source started or stopped. */
			if (!installed)
				next_check = 0;
			next_source_check = 0;
		}
		ResetLatch(MyLatch);
	}
}

static bool
extension_installed(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		found;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "checking for spool_ext");
	found = OidIsValid(get_extension_oid("spool_ext", true));
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return found;
}

static void
supervise_worker(int w, TimestampTz now)
{
	WorkerTrack *t = &tracks[w];
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[w];

	if (t->handle != NULL)
	{
		if (spool_track_exited(t, now, psprintf("spool nonce worker %d", w)))
			reclaim_worker(w, "it exited");
		else
		{
			TimestampTz heartbeat;
			int			pending;

			LWLockAcquire(spool_nonce_shared->lock, LW_SHARED);
			heartbeat = slot->heartbeat;
			pending = slot->nqueued + slot->ninprogress;
			LWLockRelease(spool_nonce_shared->lock);
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
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[w];
	int			requeued = 0;
	int			i;

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	slot->generation++;
	slot->pid = 0;
	slot->latch = NULL;
	slot->owner[0] = '\0';
	for (i = spool_nonce_shared->queue_size - 1; i >= 0; i--)
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
	LWLockRelease(spool_nonce_shared->lock);
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

	LWLockAcquire(spool_nonce_shared->lock, LW_SHARED);
	generation = spool_nonce_shared->workers[w].generation;
	LWLockRelease(spool_nonce_shared->lock);

	spool_fill_worker(&bgw, "spool_nonce_worker_main", psprintf("spool nonce worker %d", w));
	bgw.bgw_main_arg = Int64GetDatum(DatumGetInt64(bgw.bgw_main_arg) | w);
	memcpy(bgw.bgw_extra, &generation, sizeof(uint32));
	(void) spool_track_start(t, &bgw, now);
}

static void
supervise_promoter(TimestampTz now)
{
	BackgroundWorker bgw;

	(void) spool_track_exited(&promoter_track, now, "spool promoter");
	if (promoter_track.handle != NULL || now < promoter_track.next_start)
		return;
	spool_fill_worker(&bgw, "spool_promoter_main", "spool promoter");
	(void) spool_track_start(&promoter_track, &bgw, now);
}

/*
 * Keep one ingest worker per enabled source.  With refresh, re-read the
 * enabled sources; a worker whose source was stopped or dropped is
 * terminated.
 */
static void
supervise_sources(TimestampTz now, bool refresh)
{
	int			i;

	if (refresh)
	{
		uint64		n;

		for (i = 0; i < nsource_tracks; i++)
			source_tracks[i].wanted = false;
		spool_begin_txn("reading spool.sources");
		/* The extension may have been dropped since the last check. */
		if (!OidIsValid(get_extension_oid("spool_ext", true)))
		{
			spool_end_txn();
			return;
		}
		if (SPI_execute("SELECT name FROM spool.sources WHERE enabled ORDER BY name",
						true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read spool.sources");
		for (n = 0; n < SPI_processed; n++)
		{
			char	   *name = SPI_getvalue(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 1);

			for (i = 0; i < nsource_tracks; i++)
				if (strcmp(source_tracks[i].name, name) == 0)
					break;
			if (i == nsource_tracks)
			{
				if (nsource_tracks == MAX_SOURCES)
				{
					ereport(WARNING, (errmsg("more than %d enabled sources; \"%s\" is not started",
											 MAX_SOURCES, name)));
					continue;
				}
				memset(&source_tracks[i], 0, sizeof(WorkerTrack));
				strlcpy(source_tracks[i].name, name, NAMEDATALEN);
				nsource_tracks++;
			}
			source_tracks[i].wanted = true;
		}
		spool_end_txn();
	}

	for (i = 0; i < nsource_tracks; i++)
	{
		WorkerTrack *t = &source_tracks[i];
		char	   *what = psprintf("spool ingest %s", t->name);

		(void) spool_track_exited(t, now, what);
		if (!t->wanted)
		{
			if (t->handle != NULL)
				TerminateBackgroundWorker(t->handle);
			if (t->handle == NULL)
			{
				/* forget it: move the last track here */
				source_tracks[i] = source_tracks[--nsource_tracks];
				i--;
			}
			continue;
		}
		if (t->handle == NULL && now >= t->next_start)
		{
			BackgroundWorker bgw;

			spool_fill_worker(&bgw, "spool_ingest_main", what);
			strlcpy(bgw.bgw_extra, t->name, BGW_EXTRALEN);
			(void) spool_track_start(t, &bgw, now);
		}
	}
}

/*
 * Before this launcher starts any worker: empty both staging tables and
 * reset the shared counters that describe them.  UNLOGGED tables survive a
 * clean restart while shared memory does not; staged rows are not durable
 * (their offsets were not stored), so the ingest workers read them from
 * Kafka again, exactly as after a crash.  The exclusive locks wait for any
 * worker of an earlier launcher still writing or promoting.
 */
static void
reset_staging(void)
{
	spool_begin_txn("emptying spool staging");
	if (SPI_execute("LOCK TABLE spool.staging_0, spool.staging_1 IN ACCESS EXCLUSIVE MODE;"
					" TRUNCATE spool.staging_0, spool.staging_1", false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not empty the staging tables");
	pg_atomic_write_u64(&spool_ingest_shared->staged_msgs[0], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_msgs[1], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_other[0], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_other[1], 0);
	pg_atomic_write_u32(&spool_ingest_shared->staging_active, 0);
	spool_end_txn();
}

static void
stop_all_workers(void)
{
	int			w;

	for (w = 0; w < spool_nonce_shared->nworkers; w++)
	{
		if (tracks[w].handle == NULL)
			continue;
		TerminateBackgroundWorker(tracks[w].handle);
		pfree(tracks[w].handle);
		tracks[w].handle = NULL;
		reclaim_worker(w, "the extension was dropped");
	}
	for (w = 0; w < nsource_tracks; w++)
		if (source_tracks[w].handle)
			TerminateBackgroundWorker(source_tracks[w].handle);
	nsource_tracks = 0;
	if (promoter_track.handle)
		TerminateBackgroundWorker(promoter_track.handle);
	promoter_track.handle = NULL;
	spool_stop_processors();
	spool_stop_dispatchers();
}
