/*-------------------------------------------------------------------------
 *
 * processor_launch.c
 *	  The launcher's side of processors: one shared-memory slot per enabled
 *	  processor and one background worker per replica.  A replica that was
 *	  terminated is restarted at once; one that exited on an error (a handler
 *	  error, say) is restarted with a backoff doubling from 1 s to 30 s.  A
 *	  replica whose processor was stopped or dropped is terminated.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "processor/processor.h"

SpoolProcessorShared *spool_processor_shared = NULL;

typedef struct ProcTrack
{
	char		name[NAMEDATALEN];
	int			slot;
	int			replicas;
	bool		wanted;
	WorkerTrack r[SPOOL_MAX_REPLICAS];
} ProcTrack;

static ProcTrack procs[SPOOL_MAX_PROCESSORS];
static int	nprocs = 0;

static void refresh_wanted(void);
static int	claim_slot(const char *name);
static void release_slot(int slot);
static void start_replica(ProcTrack *p, int r, TimestampTz now);

/* Re-read the enabled processors; new ones get a track and a slot. */
static void
refresh_wanted(void)
{
	uint64		n;
	int			i;

	for (i = 0; i < nprocs; i++)
		procs[i].wanted = false;
	spool_begin_txn("reading spool.processors");
	if (OidIsValid(get_extension_oid("spool_ext", true)))
	{
		if (SPI_execute("SELECT name, (options->>'replicas')::int FROM spool.processors"
						" WHERE enabled ORDER BY name", true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read spool.processors");
		for (n = 0; n < SPI_processed; n++)
		{
			char	   *name = SPI_getvalue(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 1);
			bool		isnull;
			int			replicas = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[n],
															   SPI_tuptable->tupdesc, 2, &isnull));

			for (i = 0; i < nprocs; i++)
				if (strcmp(procs[i].name, name) == 0)
					break;
			if (i == nprocs)
			{
				int			slot;

				if (nprocs == SPOOL_MAX_PROCESSORS || (slot = claim_slot(name)) < 0)
				{
					ereport(WARNING,
							(errmsg("more than %d enabled processors; \"%s\" is not started",
									SPOOL_MAX_PROCESSORS, name)));
					continue;
				}
				memset(&procs[i], 0, sizeof(ProcTrack));
				strlcpy(procs[i].name, name, NAMEDATALEN);
				procs[i].slot = slot;
				nprocs++;
			}
			procs[i].replicas = Min(Max(replicas, 1), SPOOL_MAX_REPLICAS);
			procs[i].wanted = true;
		}
	}
	spool_end_txn();
}

/* A free shared-memory slot for processor name, reset; -1 if none. */
static int
claim_slot(const char *name)
{
	int			i;
	int			found = -1;

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < SPOOL_MAX_PROCESSORS && found < 0; i++)
	{
		SpoolProcessorSlot *ps = &spool_processor_shared->processors[i];
		int			r;

		if (ps->in_use)
			continue;
		ps->in_use = true;
		strlcpy(ps->name, name, NAMEDATALEN);
		ps->active_pid = 0;
		ps->active_gone_at = 0;
		ps->lease_expires_at = 0;
		ps->committed_cursor = 0;
		ps->snapshot_cursor = 0;
		ps->snapshot_hash = 0;
		for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
		{
			memset(&ps->replicas[r], 0, sizeof(SpoolReplicaSlot));
			ps->replicas[r].state_hash_cursor = -1;
			ps->replicas[r].last_takeover_ms = -1;
		}
		found = i;
	}
	LWLockRelease(spool_processor_shared->lock);
	return found;
}

static void
release_slot(int slot)
{
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	spool_processor_shared->processors[slot].in_use = false;
	LWLockRelease(spool_processor_shared->lock);
}

static void
start_replica(ProcTrack *p, int r, TimestampTz now)
{
	BackgroundWorker bgw;

	spool_fill_worker(&bgw, "spool_processor_main",
					  psprintf("spool processor %s/%d", p->name, r + 1));
	bgw.bgw_main_arg = Int64GetDatum(DatumGetInt64(bgw.bgw_main_arg) | (p->slot << 4) | r);
	strlcpy(bgw.bgw_extra, p->name, BGW_EXTRALEN);
	(void) spool_track_start(&p->r[r], &bgw, now);
}

/*
 * Keep every replica of every enabled processor running.  With refresh,
 * re-read which processors are enabled first.
 */
void
spool_supervise_processors(TimestampTz now, bool refresh)
{
	int			i;
	int			r;

	if (refresh)
		refresh_wanted();
	for (i = 0; i < nprocs; i++)
	{
		ProcTrack  *p = &procs[i];
		bool		running = false;

		for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
		{
			WorkerTrack *t = &p->r[r];
			char	   *what = psprintf("spool processor %s/%d", p->name, r + 1);
			bool		error_exit;

			LWLockAcquire(spool_processor_shared->lock, LW_SHARED);
			error_exit = spool_processor_shared->processors[p->slot].replicas[r].exit_error;
			LWLockRelease(spool_processor_shared->lock);
			if (t->handle != NULL && !error_exit)
			{
				pid_t		pid;
				BgwHandleStatus st = GetBackgroundWorkerPid(t->handle, &pid);

				/* Terminated, not failed: back at once, no crash-loop backoff. */
				if (st == BGWH_STOPPED)
				{
					pfree(t->handle);
					t->handle = NULL;
					t->backoff_ms = 0;
					t->next_start = now;
				}
			}
			(void) spool_track_exited(t, now, what);
			if (!p->wanted || r >= p->replicas)
			{
				if (t->handle != NULL)
				{
					TerminateBackgroundWorker(t->handle);
					running = true;
				}
				continue;
			}
			running = true;
			if (t->handle == NULL && now >= t->next_start)
				start_replica(p, r, now);
		}
		if (!p->wanted && !running)
		{
			release_slot(p->slot);
			procs[i] = procs[--nprocs];
			i--;
		}
	}
}

/* The extension is gone: stop every replica and forget the processors. */
void
spool_stop_processors(void)
{
	int			i;
	int			r;

	for (i = 0; i < nprocs; i++)
	{
		for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
			if (procs[i].r[r].handle)
				TerminateBackgroundWorker(procs[i].r[r].handle);
		release_slot(procs[i].slot);
	}
	nprocs = 0;
}

/* Shared memory: one slot per processor. */
Size
spool_processor_shmem_size(void)
{
	return MAXALIGN(sizeof(SpoolProcessorShared));
}

void
spool_processor_shmem_init(void)
{
	bool		found;
	int			i;

	spool_processor_shared = spool_shmem_area("spool_ext processor",
											  spool_processor_shmem_size(), &found);
	if (found)
		return;
	spool_processor_shared->lock = spool_shmem_lock("spool_ext processor");
	for (i = 0; i < SPOOL_MAX_PROCESSORS; i++)
		ConditionVariableInit(&spool_processor_shared->processors[i].cv);
}
