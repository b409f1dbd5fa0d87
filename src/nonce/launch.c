/*-------------------------------------------------------------------------
 *
 * launch.c
 *	  The nonce service workers as a kind the launcher supervises: a fixed
 *	  number (spool.nonce_workers) of slots, one worker each.  A worker that
 *	  exits, or has pending requests and makes no progress for
 *	  spool.nonce_stall_timeout, loses its slot: the slot's generation is
 *	  bumped (the old process exits when it notices), its owner name is
 *	  forgotten (so its signer leases may be taken over), and its
 *	  in-progress requests are queued again for the replacement.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "nonce/nonce.h"

static void list_workers(SpoolSupervisor *s);
static char *worker_label(const SpoolUnit *u, int i);
static void prepare_worker(const SpoolUnit *u, int i, SpoolWorkerArgs *args);
static SpoolVerdict check_worker(const SpoolUnit *u, int i, TimestampTz now);
static void worker_gone(const SpoolUnit *u, int i, const char *why);
static void reclaim_all(void);
static void reclaim_worker(int w, const char *why);

const SpoolKindOps spool_nonce_worker_ops = {
	.list = list_workers,
	.label = worker_label,
	.prepare = prepare_worker,
	.check = check_worker,
	.gone = worker_gone,
	.reset = reclaim_all,
	.dropped = spool_nonce_queue_close,
};

static void
list_workers(SpoolSupervisor *s)
{
	int			w;

	for (w = 0; w < spool_nonce_shared->nworkers; w++)
		spool_want(s, "", 0, w, 1, 0);
}

static char *
worker_label(const SpoolUnit *u, int i)
{
	return psprintf("%d", u->index);
}

/* Worker w serves slot w, as of the slot's current generation. */
static void
prepare_worker(const SpoolUnit *u, int i, SpoolWorkerArgs *args)
{
	args->slot = u->index;
	LWLockAcquire(spool_nonce_shared->lock, LW_SHARED);
	args->generation = spool_nonce_shared->workers[u->index].generation;
	LWLockRelease(spool_nonce_shared->lock);
}

/* A worker with pending requests that makes no progress is replaced. */
static SpoolVerdict
check_worker(const SpoolUnit *u, int i, TimestampTz now)
{
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[u->index];
	TimestampTz heartbeat;
	int			pending;
	pid_t		pid;

	LWLockAcquire(spool_nonce_shared->lock, LW_SHARED);
	heartbeat = slot->heartbeat;
	pending = slot->nqueued + slot->ninprogress;
	pid = slot->pid;
	LWLockRelease(spool_nonce_shared->lock);
	if (pending == 0 || now - heartbeat <= (int64) spool_nonce_stall_timeout_ms * 1000)
		return SPOOL_KEEP;
	ereport(LOG,
			(errcode(ERRCODE_ADMIN_SHUTDOWN),
			 errmsg("spool nonce worker %d made no progress on %d requests for %d ms; replacing it",
					u->index, pending, spool_nonce_stall_timeout_ms)));
	if (pid != 0)
		kill(pid, SIGTERM);		/* acts when it resumes */
	reclaim_worker(u->index, "it stalled");
	return SPOOL_REPLACE;
}

static void
worker_gone(const SpoolUnit *u, int i, const char *why)
{
	reclaim_worker(u->index, why);
}

/*
 * Workers of a previous launcher keep running; we cannot watch them through
 * handles, so hand their slots to fresh workers.
 */
static void
reclaim_all(void)
{
	int			w;

	for (w = 0; w < spool_nonce_shared->nworkers; w++)
		if (spool_nonce_shared->workers[w].pid != 0)
			reclaim_worker(w, "the launcher restarted");
	/* Requests are taken again (spool_nonce_queue_close refused them). */
	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	spool_nonce_shared->closed = false;
	LWLockRelease(spool_nonce_shared->lock);
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
	spool_worker_owner_revoke(slot->pid);
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
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("spool nonce worker %d: re-queued %d in-progress requests because %s",
						w, requeued, why)));
}
