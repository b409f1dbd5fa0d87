/*-------------------------------------------------------------------------
 *
 * nonce_worker.c
 *	  A nonce service worker: takes the requests routed to its slot, groups
 *	  them by signer and commits each batch in one transaction, fenced by the
 *	  signer leases it holds as owner 'nonce-worker:<slot>:<pid>'.
 *
 * A signer served here belongs to the role of its first request (the column
 * role of spool.nonce_signer): requests of roles that are not members of it
 * fail with 42501, so no client can use up another role's nonces.
 *
 * A replacement worker takes a signer's lease over at once from any
 * 'nonce-worker:' owner that no running slot claims (a dead or replaced
 * worker), which bumps the token; a replaced worker that wakes up finds its
 * generation gone and exits, and any write it still attempts is rejected by
 * the fence.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "lease/lease.h"
#include "nonce/nonce.h"

PGDLLEXPORT void spool_nonce_worker_main(Datum main_arg);

/* A request copied out of shared memory for the batch being worked on. */
typedef struct BatchItem
{
	int			idx;
	int			pos;			/* arrival order within the batch */
	char	   *signer;
	SpoolReqKind kind;
	int64		arg;
	char	   *request_id;		/* NULL: a report on a nonce without one */
	bool		fresh_id;		/* request_id owns no nonce yet */
	bool		report_released;	/* REPORT_ALLOCATE: the report's outcome */
	char	   *report_rid;		/* ... and its allocation's request id */
	Oid			role;
	int64		nonce;
	int			sqlerrcode;
	char	   *errmsg;
} BatchItem;

/* Leases this worker believes it holds. */
typedef struct HeldLease
{
	char		signer[SPOOL_SIGNER_MAX];
	int64		token;
	TimestampTz expires_at;
	Oid			signer_role;	/* the role the signer belongs to, once known */
} HeldLease;

static int	my_slot = -1;
static uint32 my_generation = 0;
static char my_owner[SPOOL_OWNER_MAX];
static HTAB *held_leases = NULL;
static MemoryContext loop_cxt;
static BatchItem *batch_items;	/* the batch being served: queue_size of them */
static SPIPlanPtr plan_signer_role = NULL;

static void nonce_worker_attach(void);
static void nonce_worker_load(void);
static bool nonce_worker_step(void);
static void worker_detach(int code, Datum arg);
static bool worker_superseded_locked(void);
static int	worker_dequeue(BatchItem *items, int max);
static void worker_process(BatchItem *items, int n);
static bool worker_run_groups(BatchItem *items, int n, bool isolate_errors);
static void serve_groups(BatchItem *items, int start, int end);
static void fail_items(BatchItem *items, int start, int end, ErrorData *edata);
static HeldLease *signer_lease(const char *signer);
static void worker_serve_signer(BatchItem *items, int n);
static void worker_complete(BatchItem *items, int n);
static void forget_leases(void);

static int
batch_item_cmp(const void *a, const void *b)
{
	const BatchItem *x = a;
	const BatchItem *y = b;
	int			c = strcmp(x->signer, y->signer);

	return c != 0 ? c : (x->pos - y->pos);
}

static bool
worker_superseded_locked(void)
{
	return spool_nonce_shared->workers[my_slot].generation != my_generation;
}

static void
worker_detach(int code, Datum arg)
{
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[my_slot];

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	if (!worker_superseded_locked())
	{
		slot->pid = 0;
		slot->latch = NULL;
		slot->owner[0] = '\0';
	}
	LWLockRelease(spool_nonce_shared->lock);
}

/*
 * Attach: signals, the connection, pinned settings, and the slot (unless
 * this worker was replaced before it got there).
 */
static void
nonce_worker_attach(void)
{
	SpoolNonceWorkerSlot *slot;

	spool_worker_attach(InvalidOid, NULL);
	my_slot = spool_worker_args()->slot;
	my_generation = spool_worker_args()->generation;
	strlcpy(my_owner, spool_worker_owner("nonce-worker", psprintf("%d", my_slot)), sizeof(my_owner));
	slot = &spool_nonce_shared->workers[my_slot];
	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	if (worker_superseded_locked())
	{
		LWLockRelease(spool_nonce_shared->lock);
		proc_exit(0);
	}
	slot->pid = MyProcPid;
	slot->latch = MyLatch;
	slot->heartbeat = GetCurrentTimestamp();
	slot->started_at = slot->heartbeat;
	strlcpy(slot->owner, my_owner, sizeof(slot->owner));
	LWLockRelease(spool_nonce_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);
}

/* Load: the worker's own state (it has no definition to read). */
static void
nonce_worker_load(void)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = SPOOL_SIGNER_MAX;
	ctl.entrysize = sizeof(HeldLease);
	held_leases = hash_create("spool held leases", 64, &ctl, HASH_ELEM | HASH_STRINGS);

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "spool nonce worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	batch_items = MemoryContextAlloc(TopMemoryContext,
									 sizeof(BatchItem) * spool_nonce_shared->queue_size);
	ereport(LOG, (errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				  errmsg("spool nonce worker %d started as \"%s\"", my_slot, my_owner)));
}

/*
 * One step: serve what is queued.  Returns false when nothing was (the
 * loop then waits); exits when this worker was replaced.
 */
static bool
nonce_worker_step(void)
{
	int			n = worker_dequeue(batch_items, Min(spool_nonce_batch_max, spool_nonce_shared->queue_size));

	if (n < 0)
	{
		ereport(LOG,
				(errcode(ERRCODE_ADMIN_SHUTDOWN),
				 errmsg("spool nonce worker %d (\"%s\") was replaced; exiting",
						my_slot, my_owner)));
		proc_exit(0);
	}
	if (n == 0)
		return false;
	worker_process(batch_items, n);
	return true;
}

void
spool_nonce_worker_main(Datum main_arg)
{
	nonce_worker_attach();
	nonce_worker_load();
	for (;;)
	{
		spool_worker_pass(loop_cxt, false);
		if (nonce_worker_step())
			continue;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1000L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * Move up to max queued requests into items.  Returns -1 when this worker
 * was replaced (it must not touch the queue any more).
 */
static int
worker_dequeue(BatchItem *items, int max)
{
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[my_slot];
	int			n = 0;

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	if (worker_superseded_locked())
	{
		LWLockRelease(spool_nonce_shared->lock);
		return -1;
	}
	slot->heartbeat = GetCurrentTimestamp();
	while (slot->head >= 0 && n < max)
	{
		int			idx = slot->head;
		SpoolNonceReq *req = &spool_requests[idx];

		slot->head = req->next;
		if (slot->head < 0)
			slot->tail = -1;
		slot->nqueued--;
		req->in_queue = false;
		if (req->state == REQ_ABANDONED)
		{
			spool_request_free(idx);
			continue;
		}
		req->state = REQ_INPROGRESS;
		req->generation = my_generation;
		items[n].idx = idx;
		items[n].pos = n;
		items[n].signer = pstrdup(req->signer);
		items[n].kind = req->kind;
		items[n].arg = req->arg;
		items[n].request_id = req->has_request_id ? pstrdup(req->request_id) : NULL;
		items[n].fresh_id = req->fresh_id;
		items[n].report_released = req->report_released;
		items[n].report_rid = req->report_has_rid ? pstrdup(req->report_rid) : NULL;
		items[n].role = req->role;
		items[n].nonce = -1;
		items[n].sqlerrcode = 0;
		items[n].errmsg = NULL;
		n++;
	}
	slot->ninprogress = n;
	LWLockRelease(spool_nonce_shared->lock);
	return n;
}

/*
 * Serve a batch: first all signers in one transaction; if that fails, each
 * signer in a transaction of its own so one bad signer fails only its own
 * requests.
 */
static void
worker_process(BatchItem *items, int n)
{
	qsort(items, n, sizeof(BatchItem), batch_item_cmp);
	if (!worker_run_groups(items, n, false))
		(void) worker_run_groups(items, n, true);
	worker_complete(items, n);
}

/*
 * Serve the signer groups of items[start, end) in one transaction.  In the
 * caller's PG_TRY: an error aborts all of it.
 */
static void
serve_groups(BatchItem *items, int start, int end)
{
	int			g = start;

	/* Alive and working: a bounded lock wait below is not a stall. */
	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	spool_nonce_shared->workers[my_slot].heartbeat = GetCurrentTimestamp();
	LWLockRelease(spool_nonce_shared->lock);

	spool_begin_txn("serving nonce requests");
	while (g < end)
	{
		int			ge = g + 1;

		while (ge < end && strcmp(items[ge].signer, items[g].signer) == 0)
			ge++;
		worker_serve_signer(items + g, ge - g);
		g = ge;
	}
	spool_test_pause();
	spool_end_txn();
}

/*
 * Run every signer group of the sorted batch.  With isolate_errors, each
 * group gets its own transaction and a failing group records its error in
 * its items; otherwise one transaction covers all and false is returned on
 * failure (nothing committed).
 */
static bool
worker_run_groups(BatchItem *items, int n, bool isolate_errors)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			start = 0;

	while (start < n)
	{
		int			end = isolate_errors ? start + 1 : n;

		if (isolate_errors)
			while (end < n && strcmp(items[end].signer, items[start].signer) == 0)
				end++;
		PG_TRY();
		{
			serve_groups(items, start, end);
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			AbortCurrentTransaction();
			MemoryContextSwitchTo(cxt);
			pgstat_report_activity(STATE_IDLE, NULL);
			forget_leases();
			if (edata->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN ||
				edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
				ReThrowError(edata);
			if (!isolate_errors)
			{
				ereport(LOG,
						(errcode(edata->sqlerrcode),
						 errmsg("spool nonce worker %d: batch of %d failed, retrying per signer: %s",
								my_slot, n, edata->message)));
				FreeErrorData(edata);
				fail_items(items, 0, n, NULL);
				return false;
			}
			fail_items(items, start, end, edata);
			FreeErrorData(edata);
		}
		PG_END_TRY();
		start = end;
	}
	return true;
}

/* items[start, end) got no nonce; with edata, it says why. */
static void
fail_items(BatchItem *items, int start, int end, ErrorData *edata)
{
	int			i;

	for (i = start; i < end; i++)
	{
		items[i].nonce = -1;
		items[i].sqlerrcode = 0;
		items[i].errmsg = NULL;
		if (edata)
		{
			items[i].sqlerrcode = edata->sqlerrcode;
			items[i].errmsg = pstrdup(edata->message);
		}
	}
}

/*
 * The role signer belongs to; a signer nobody claimed yet becomes first's.
 * In the worker's transaction, with the signer's lease held.
 */
static Oid
signer_role(const char *signer, Oid first)
{
	Datum		v[2] = {CStringGetTextDatum(signer), ObjectIdGetDatum(first)};
	bool		isnull;

	spool_plan_generic(&plan_signer_role,
					   "UPDATE spool.nonce_signer SET role = coalesce(role, $2)"
					   " WHERE signer = $1 RETURNING role",
					   2, (Oid[]) {TEXTOID, OIDOID});
	if (spool_exec(plan_signer_role, v, NULL, false, SPI_OK_UPDATE_RETURNING) != 1)
		elog(ERROR, "signer \"%s\" has no row", signer);
	return DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
										  &isnull));
}

/*
 * The lease of signer, (re)acquired when this worker does not hold it or it
 * expires within half its TTL.  Raises SP009 when the previous holder's
 * stalled transaction still locks it (the request is then retried), SP008
 * when another owner holds it.
 */
static HeldLease *
signer_lease(const char *signer)
{
	int64		ttl_us = (int64) spool_nonce_lease_ttl_ms * 1000;
	HeldLease  *hl;
	bool		found;
	SpoolLease	lease;

	hl = hash_search(held_leases, signer, HASH_ENTER, &found);
	if (found && hl->expires_at - GetCurrentTimestamp() >= ttl_us / 2)
		return hl;
	lease = spool_lease_acquire_internal(spool_signer_resource(signer), my_owner,
										 ttl_us, spool_owner_is_gone,
										 SPOOL_LEASE_INTERNAL);
	if (!lease.held)
	{
		hash_search(held_leases, signer, HASH_REMOVE, NULL);
		if (lease.blocked)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_LEASE_BLOCKED),
					 errmsg("signer \"%s\" is still locked by a stalled transaction of its previous holder",
							signer)));
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SIGNER_LEASED),
				 errmsg("signer \"%s\" is leased by another owner", signer),
				 errhint("Serve a signer either through spool.nonce_request or through a client holding its lease, not both.")));
	}
	if (lease.took_over)
	{
		LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
		spool_nonce_shared->workers[my_slot].takeovers++;
		LWLockRelease(spool_nonce_shared->lock);
	}
	hl->token = lease.token;
	hl->expires_at = lease.expires_at;
	hl->signer_role = InvalidOid;
	return hl;
}

/*
 * Messages kept in items are copied to loop_cxt: what is allocated here
 * belongs to SPI and is gone once the transaction ends, before
 * worker_complete reads them.
 *
 * Serve one signer's requests, (re)acquiring its lease when needed: first
 * the set_next calls, then the reports (so a nonce given back is handed out
 * at once), then the allocations, all with the kernel basic mode uses.  A
 * report's own error (SP005, SP006) fails only that report; a
 * REPORT_ALLOCATE request whose report fails gets no allocation.
 */
static void
worker_serve_signer(BatchItem *items, int n)
{
	const char *signer = items[0].signer;
	const char **ids = palloc(sizeof(char *) * n);
	bool	   *fresh = palloc(sizeof(bool) * n);
	int64		locked_released = -1;
	int64	   *nonces = palloc(sizeof(int64) * n);
	int		   *at = palloc(sizeof(int) * n);
	SpoolNonceReport *reports = palloc0(sizeof(SpoolNonceReport) * n);
	HeldLease  *hl = signer_lease(signer);
	bool	   *allowed = palloc(sizeof(bool) * n);
	int			nallowed = 0;
	int			nreports = 0;
	int			i;

	if (!OidIsValid(hl->signer_role))
		hl->signer_role = signer_role(signer, items[0].role);

	/* Only requests of members of the signer's role are served. */
	for (i = 0; i < n; i++)
	{
		allowed[i] = spool_role_is_member(items[i].role, hl->signer_role);
		if (!allowed[i])
		{
			items[i].sqlerrcode = ERRCODE_INSUFFICIENT_PRIVILEGE;
			items[i].errmsg = MemoryContextStrdup(loop_cxt,
												  psprintf("signer \"%s\" belongs to another role",
														   signer));
		}
	}

	for (i = 0; i < n; i++)
		if (allowed[i] && items[i].kind == SPOOL_REQ_SET_NEXT)
			items[i].nonce = spool_nonce_set_next_kernel(signer, items[i].arg, my_owner,
														 hl->token, SPOOL_LEASE_INTERNAL);

	for (i = 0; i < n; i++)
		if (allowed[i] && (items[i].kind == SPOOL_REQ_USED ||
						   items[i].kind == SPOOL_REQ_RECYCLABLE))
		{
			reports[nreports].nonce = items[i].arg;
			reports[nreports].request_id = items[i].request_id;
			reports[nreports].match_request = true;
			reports[nreports].to_released = (items[i].kind == SPOOL_REQ_RECYCLABLE);
			at[nreports++] = i;
		}
		else if (allowed[i] && items[i].kind == SPOOL_REQ_REPORT_ALLOCATE)
		{
			reports[nreports].nonce = items[i].arg;
			reports[nreports].request_id = items[i].report_rid;
			reports[nreports].match_request = true;
			reports[nreports].to_released = items[i].report_released;
			at[nreports++] = i;
		}
	if (nreports > 0)
	{
		locked_released = spool_nonce_report_batch(signer, my_owner, hl->token,
												   SPOOL_LEASE_INTERNAL, nreports, reports);
		for (i = 0; i < nreports; i++)
		{
			BatchItem  *it = &items[at[i]];

			if (reports[i].sqlerrcode == 0)
			{
				if (it->kind != SPOOL_REQ_REPORT_ALLOCATE)
					it->nonce = reports[i].nonce;
			}
			else
			{
				it->sqlerrcode = reports[i].sqlerrcode;
				it->errmsg = MemoryContextStrdup(loop_cxt, reports[i].errmsg);
			}
		}
	}

	for (i = 0; i < n; i++)
		if (allowed[i] && (items[i].kind == SPOOL_REQ_ALLOCATE ||
						   (items[i].kind == SPOOL_REQ_REPORT_ALLOCATE &&
							items[i].sqlerrcode == 0)))
		{
			ids[nallowed] = items[i].request_id;
			fresh[nallowed] = items[i].fresh_id;
			at[nallowed++] = i;
		}
	if (nallowed == 0)
		return;
	spool_nonce_allocate_batch(signer, my_owner, hl->token, nallowed, ids, fresh, nonces,
							   SPOOL_LEASE_INTERNAL, locked_released);
	for (i = 0; i < nallowed; i++)
		items[at[i]].nonce = nonces[i];
}

/* Whatever we believed about our leases may be wrong after an error. */
static void
forget_leases(void)
{
	HASH_SEQ_STATUS st;
	HeldLease  *hl;

	hash_seq_init(&st, held_leases);
	while ((hl = hash_seq_search(&st)) != NULL)
		(void) hash_search(held_leases, hl->signer, HASH_REMOVE, NULL);
}


/* Hand results back to the callers and wake them. */
static void
worker_complete(BatchItem *items, int n)
{
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[my_slot];
	int			i;

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	if (worker_superseded_locked())
	{
		/* The launcher gave these requests to our replacement. */
		LWLockRelease(spool_nonce_shared->lock);
		return;
	}
	for (i = 0; i < n; i++)
	{
		SpoolNonceReq *req = &spool_requests[items[i].idx];

		if (req->state == REQ_ABANDONED)
		{
			spool_request_free(items[i].idx);
			continue;
		}
		if (items[i].sqlerrcode == ERRCODE_SPOOL_LEASE_BLOCKED)
		{
			/* Retry once the stalled holder is gone; the caller keeps waiting. */
			spool_request_enqueue(my_slot, items[i].idx, false);
			items[i].idx = -1;
			continue;
		}
		req->nonce = items[i].nonce;
		if (items[i].nonce >= 0)
			req->state = REQ_DONE;
		else
		{
			req->state = REQ_FAILED;
			req->sqlerrcode = items[i].sqlerrcode ? items[i].sqlerrcode
				: ERRCODE_INTERNAL_ERROR;
			strlcpy(req->errmsg, items[i].errmsg ? items[i].errmsg : "nonce allocation failed",
					sizeof(req->errmsg));
		}
	}
	slot->ninprogress = 0;
	slot->served += n;
	slot->batches++;
	slot->last_batch = n;
	slot->heartbeat = GetCurrentTimestamp();
	LWLockRelease(spool_nonce_shared->lock);

	for (i = 0; i < n; i++)
		if (items[i].idx >= 0)
			ConditionVariableBroadcast(&spool_requests[items[i].idx].cv);
}
