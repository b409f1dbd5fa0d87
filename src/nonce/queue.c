/*-------------------------------------------------------------------------
 *
 * nonce_queue.c
 *	  Worker-queue mode, caller side: spool.nonce_request routes a request by
 *	  a stable hash of the signer to one nonce service worker through shared
 *	  memory and sleeps on a condition variable until the nonce is committed.
 *	  Also the shared queue primitives the workers and the launcher use, and
 *	  the spool.nonce_workers status function.
 *
 * All request and worker-slot fields are guarded by spool_nonce_shared->lock.
 * Every request carries a request id (callers without one get an 'auto:' id)
 * so that a request re-queued after its worker was replaced returns the
 * nonce the old worker may already have committed, instead of a second one.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "nonce/nonce.h"

SpoolNonceShared *spool_nonce_shared = NULL;
SpoolNonceReq *spool_requests = NULL;

PG_FUNCTION_INFO_V1(spool_nonce_request);
PG_FUNCTION_INFO_V1(spool_nonce_report);
PG_FUNCTION_INFO_V1(spool_nonce_report_and_request);
PG_FUNCTION_INFO_V1(spool_nonce_worker_status);

static uint64 auto_request_counter = 0;

static void request_abandon(int code, Datum arg);
static void check_queue_mode(void);
static int	request_submit(int w, const char *signer, SpoolReqKind kind, int64 arg,
						   const char *request_id, bool fresh_id,
						   const SpoolQueuedReport *report);
static void request_wait(SpoolNonceReq *req);
static void nonce_attach(bool found);

/* Stable routing: the same signer always goes to the same worker slot. */
int
spool_route_signer(const char *signer, int nworkers)
{
	return (int) (hash_bytes((const unsigned char *) signer, strlen(signer)) %
				  (uint32) nworkers);
}

/* Return request idx to the free list.  Caller holds queue_lock. */
void
spool_request_free(int idx)
{
	SpoolNonceReq *req = &spool_requests[idx];

	req->state = REQ_FREE;
	req->in_queue = false;
	req->next = spool_nonce_shared->free_head;
	spool_nonce_shared->free_head = idx;
}

/* Append request idx to worker w's queue.  Caller holds queue_lock. */
void
spool_request_enqueue(int w, int idx, bool at_head)
{
	SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[w];
	SpoolNonceReq *req = &spool_requests[idx];

	req->state = REQ_QUEUED;
	req->worker = w;
	req->in_queue = true;
	req->fresh_id = false;		/* queued before: its batch may have committed */
	if (slot->nqueued == 0 && slot->ninprogress == 0)
		slot->heartbeat = GetCurrentTimestamp();	/* stall clock starts now */
	if (slot->head < 0)
	{
		req->next = -1;
		slot->head = slot->tail = idx;
	}
	else if (at_head)
	{
		req->next = slot->head;
		slot->head = idx;
	}
	else
	{
		req->next = -1;
		spool_requests[slot->tail].next = idx;
		slot->tail = idx;
	}
	slot->nqueued++;
}

/*
 * Give up on a request after a timeout or an error.  A queued or in-progress
 * request is left for its worker to free; a finished one is freed here.
 * Caller holds queue_lock.
 */
static void
request_abandon_locked(int idx)
{
	SpoolNonceReq *req = &spool_requests[idx];

	if (req->state == REQ_DONE || req->state == REQ_FAILED)
		spool_request_free(idx);
	else if (req->state == REQ_QUEUED || req->state == REQ_INPROGRESS)
		req->state = REQ_ABANDONED;
}

static void
request_abandon(int code, Datum arg)
{
	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	request_abandon_locked(DatumGetInt32(arg));
	LWLockRelease(spool_nonce_shared->lock);
}

/* A request id of this backend's own, unique for its lifetime. */
static char *
auto_request_id(void)
{
	return psprintf("auto:%d.%ld.%lu", (int) MyProcPid, (long) MyStartTimestamp,
					(unsigned long) ++auto_request_counter);
}

/*
 * SQL: spool.nonce_request(signer, request_id) RETURNS bigint
 */
Datum
spool_nonce_request(PG_FUNCTION_ARGS)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	char	   *request_id = spool_arg_name_opt(fcinfo, 1, "request_id");

	check_queue_mode();
	PG_RETURN_INT64(spool_nonce_queue_call(signer, SPOOL_REQ_ALLOCATE, -1,
										   request_id ? request_id : auto_request_id(),
										   request_id == NULL, NULL));
}

/*
 * One index probe of relation relid through index idxname (schema spool)
 * with nkeys equality keys (columns attnos of the relation), under snapshot;
 * returns a copy of the tuple found (NULL: none) and the relation's
 * descriptor.
 */
static HeapTuple
probe_row(Oid relid, Oid nsp, const char *idxname, Snapshot snapshot,
		  int nkeys, const AttrNumber *attnos, const Oid *eqfuncs, const Datum *keys,
		  TupleDesc *desc)
{
	Relation	rel = table_open(relid, AccessShareLock);
	ScanKeyData sk[2];
	SysScanDesc scan;
	HeapTuple	tup;
	int			i;

	for (i = 0; i < nkeys; i++)
		ScanKeyInit(&sk[i], attnos[i], BTEqualStrategyNumber, eqfuncs[i], keys[i]);
	scan = systable_beginscan(rel, get_relname_relid(idxname, nsp), true, snapshot, nkeys, sk);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		tup = heap_copytuple(tup);
	systable_endscan(scan);
	*desc = CreateTupleDescCopy(RelationGetDescr(rel));
	table_close(rel, AccessShareLock);
	return tup;
}

/*
 * nonce_report's look-up, in the latest committed state (not the caller's
 * snapshot: a repeatable read transaction must find the nonce a worker
 * committed for it after its snapshot was taken): the nonce (by_nonce) or
 * the request id.  Returns whether it has a row, and then its nonce and
 * request id (NULL: none).  Index probes without the executor: this runs in
 * every reporting backend.
 */
static bool
report_lookup(Oid nsp, const char *signer, bool by_nonce, int64 nonce,
			  const char *request_id, int64 *found, char **rid)
{
	Oid			store_rel = get_relname_relid("nonce_store", nsp);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	Datum		keys[2] = {CStringGetTextDatum(signer),
	by_nonce ? Int64GetDatum(nonce) : CStringGetTextDatum(request_id)};
	TupleDesc	desc;
	HeapTuple	tup;
	bool		isnull;
	Datum		d;

	tup = probe_row(store_rel, nsp, by_nonce ? "nonce_store_pkey" : "nonce_store_request",
					snapshot, 2,
					(AttrNumber[]) {get_attnum(store_rel, "signer"),
					get_attnum(store_rel, by_nonce ? "nonce" : "request_id")},
					(Oid[]) {F_TEXTEQ, by_nonce ? F_INT8EQ : F_TEXTEQ}, keys, &desc);
	UnregisterSnapshot(snapshot);
	if (!HeapTupleIsValid(tup))
		return false;
	*found = DatumGetInt64(heap_getattr(tup, get_attnum(store_rel, "nonce"), desc, &isnull));
	d = heap_getattr(tup, get_attnum(store_rel, "request_id"), desc, &isnull);
	*rid = isnull ? NULL : TextDatumGetCString(d);
	return true;
}

/*
 * The role signer belongs to (InvalidOid: none, or no such signer), in the
 * latest committed state.
 */
static Oid
signer_role_lookup(Oid nsp, const char *signer)
{
	Oid			signer_rel = get_relname_relid("nonce_signer", nsp);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	Datum		key = CStringGetTextDatum(signer);
	TupleDesc	desc;
	HeapTuple	tup;
	bool		isnull = true;
	Datum		d = (Datum) 0;

	tup = probe_row(signer_rel, nsp, "nonce_signer_pkey", snapshot, 1,
					(AttrNumber[]) {get_attnum(signer_rel, "signer")},
					(Oid[]) {F_TEXTEQ}, &key, &desc);
	UnregisterSnapshot(snapshot);
	if (HeapTupleIsValid(tup))
		d = heap_getattr(tup, get_attnum(signer_rel, "role"), desc, &isnull);
	return isnull ? InvalidOid : DatumGetObjectId(d);
}

/*
 * A report's arguments (outcome, nonce, and the request id, named rid_arg,
 * at positions 1..3 of both reporting functions) into rep; SP001 for bad
 * input.  *by_request_id is the request id named, or NULL when the nonce
 * was.
 */
static void
report_args(FunctionCallInfo fcinfo, const char *rid_arg, SpoolQueuedReport *rep,
			char **by_request_id)
{
	char	   *outcome = spool_arg_name(fcinfo, 1, "outcome");
	bool		by_nonce = !PG_ARGISNULL(2);
	char	   *request_id = spool_arg_name_opt(fcinfo, 3, rid_arg);

	rep->nonce = by_nonce ? spool_arg_int64(fcinfo, 2, "nonce", true) : -1;
	rep->request_id = NULL;
	if (strcmp(outcome, "used") == 0)
		rep->to_released = false;
	else if (strcmp(outcome, "recyclable") == 0)
		rep->to_released = true;
	else
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("unknown nonce outcome \"%s\"", outcome),
				 errhint("Use 'used' (the transaction was sent) or 'recyclable' (it was not).")));
	if (by_nonce == (request_id != NULL))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("give exactly one of nonce and %s", rid_arg),
				 errhint("Name the nonce, or the request_id it was requested with.")));
	*by_request_id = request_id;
}

/*
 * Find the allocation a report names, by its nonce (by_request_id NULL) or
 * by the request id, and complete rep with its nonce and request id.
 * Returns false when the signer has no such allocation.
 */
static bool
report_resolve(Oid nsp, const char *signer, const char *by_request_id,
			   SpoolQueuedReport *rep)
{
	char	   *rid = NULL;

	if (!report_lookup(nsp, signer, by_request_id == NULL, rep->nonce, by_request_id,
					   &rep->nonce, &rid))
		return false;
	rep->request_id = rid;
	return true;
}

/*
 * Raise the error for a report that found no allocation.  A nonce that is
 * found goes to the worker, which checks the caller's role like for every
 * request (42501, nothing changed); only a miss reads the signer here, so
 * that another role's signer answers 42501 rather than saying which nonces
 * it has.  No SQL runs here, so the caller's user and search_path stay as
 * they are (the probes check no privileges).
 */
static void
report_missing(Oid nsp, const char *signer, const char *by_request_id, int64 nonce)
{
	Oid			role = signer_role_lookup(nsp, signer);

	if (OidIsValid(role) && !spool_role_is_member(GetUserId(), role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("signer \"%s\" belongs to another role", signer)));
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_UNKNOWN_NONCE),
			 by_request_id == NULL ?
			 errmsg("nonce " INT64_FORMAT " of signer \"%s\" was never allocated", nonce, signer) :
			 errmsg("request id \"%s\" of signer \"%s\" holds no nonce", by_request_id, signer),
			 errhint("Only nonces returned by spool.nonce_request can be reported; a nonce given back and handed out again no longer belongs to its first request id.")));
}

/*
 * SQL: spool.nonce_report(signer, outcome, nonce, request_id) RETURNS bigint
 *
 * The caller names the allocation it reports on by its nonce or request id;
 * here both are looked up, so the worker applies the report to exactly that
 * allocation: a report re-queued after a worker replacement, whose first
 * application committed and whose nonce was then handed out again, is a
 * harmless repeat instead of giving back the new holder's nonce.
 */
Datum
spool_nonce_report(PG_FUNCTION_ARGS)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	SpoolQueuedReport rep;
	char	   *by_request_id;
	Oid			nsp;

	report_args(fcinfo, "request_id", &rep, &by_request_id);
	check_queue_mode();
	nsp = get_namespace_oid("spool", false);
	if (!report_resolve(nsp, signer, by_request_id, &rep))
		report_missing(nsp, signer, by_request_id, rep.nonce);
	PG_RETURN_INT64(spool_nonce_queue_call(signer,
										   rep.to_released ? SPOOL_REQ_RECYCLABLE : SPOOL_REQ_USED,
										   rep.nonce, rep.request_id, false, NULL));
}

/*
 * SQL: spool.nonce_report_and_request(signer, outcome, nonce,
 *		reported_request_id, request_id) RETURNS bigint
 *
 * nonce_report, then nonce_request, as one queued request: the worker
 * applies the report and, only if it holds (applied or a harmless repeat),
 * allocates, in the same transaction, so the caller waits for one commit
 * instead of two.  A report that fails fails the call and hands out no
 * nonce.  A request id that already holds a nonce means that this call was
 * committed before (its report and its allocation commit together): the
 * call then answers like nonce_request(signer, request_id) and does not
 * report again.  That is checked after the report's look-up: should the
 * first attempt of a retried call commit between the two, the look-up saw
 * the reported allocation as it was before (which the worker then finds
 * given back or consumed: a repeat) and the check sees the commit; never
 * is a nonce's next holder reported on.
 */
Datum
spool_nonce_report_and_request(PG_FUNCTION_ARGS)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	char	   *request_id = spool_arg_name_opt(fcinfo, 4, "request_id");
	SpoolQueuedReport rep;
	char	   *by_request_id;
	Oid			nsp;
	bool		found;
	int64		held;
	char	   *held_rid;

	report_args(fcinfo, "reported_request_id", &rep, &by_request_id);
	if (request_id && by_request_id && strcmp(request_id, by_request_id) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("the new request needs a request id of its own"),
				 errdetail("Request id \"%s\" names the reported allocation.", request_id)));
	check_queue_mode();
	nsp = get_namespace_oid("spool", false);
	found = report_resolve(nsp, signer, by_request_id, &rep);
	if (request_id && report_lookup(nsp, signer, false, -1, request_id, &held, &held_rid))
		PG_RETURN_INT64(spool_nonce_queue_call(signer, SPOOL_REQ_ALLOCATE, -1, request_id,
											   false, NULL));
	if (!found)
		report_missing(nsp, signer, by_request_id, rep.nonce);
	PG_RETURN_INT64(spool_nonce_queue_call(signer, SPOOL_REQ_REPORT_ALLOCATE, rep.nonce,
										   request_id ? request_id : auto_request_id(),
										   request_id == NULL, &rep));
}

/*
 * Queue one request of kind for signer's worker and wait until it is
 * committed; returns its nonce (set_next: the nonce handed out next).
 * report: the report of a SPOOL_REQ_REPORT_ALLOCATE request, else NULL.
 * Raises the worker's error for it, or SP007 after
 * spool.nonce_request_timeout.
 */
int64
spool_nonce_queue_call(const char *signer, SpoolReqKind kind, int64 arg,
					   const char *request_id, bool fresh_id,
					   const SpoolQueuedReport *report)
{
	SpoolNonceReq *req;
	SpoolReqState state;
	int			w;
	int			idx;
	int64		nonce = -1;
	int			sqlerrcode = 0;
	char		errmsg_buf[SPOOL_ERRMSG_MAX];

	check_queue_mode();
	w = spool_route_signer(signer, spool_nonce_shared->nworkers);
	idx = request_submit(w, signer, kind, arg, request_id, fresh_id, report);
	req = &spool_requests[idx];

	PG_ENSURE_ERROR_CLEANUP(request_abandon, Int32GetDatum(idx));
	request_wait(req);
	PG_END_ENSURE_ERROR_CLEANUP(request_abandon, Int32GetDatum(idx));

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	state = req->state;
	nonce = req->nonce;
	sqlerrcode = req->sqlerrcode;
	strlcpy(errmsg_buf, req->errmsg, sizeof(errmsg_buf));
	request_abandon_locked(idx);
	LWLockRelease(spool_nonce_shared->lock);

	if (state == REQ_FAILED)
		ereport(ERROR,
				(errcode(sqlerrcode),
				 errmsg("%s", errmsg_buf),
				 errdetail("Reported by nonce worker %d for signer \"%s\".", w, signer)));
	if (state != REQ_DONE && (kind == SPOOL_REQ_ALLOCATE || kind == SPOOL_REQ_REPORT_ALLOCATE))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SERVICE_UNAVAILABLE),
				 errmsg("timed out waiting for a nonce for signer \"%s\"", signer),
				 errdetail("Nonce worker %d did not answer within %d ms; request id \"%s\".",
						   w, spool_nonce_request_timeout_ms, request_id),
				 kind == SPOOL_REQ_ALLOCATE ?
				 errhint("Repeat the call with the same request_id: it returns the nonce if one was committed meanwhile.") :
				 errhint("Repeat the call with the same request_id: it returns the nonce if the call was committed meanwhile, and reports only if it was not.")));
	if (state != REQ_DONE)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SERVICE_UNAVAILABLE),
				 errmsg("timed out waiting for nonce worker %d to apply a %s for signer \"%s\"",
						w, kind == SPOOL_REQ_SET_NEXT ? "nonce_set_next" : "nonce_report", signer),
				 errdetail("It may still be applied."),
				 errhint("Repeat the call: applying it again is harmless.")));
	return nonce;
}

/* SP007 unless worker-queue mode serves this database. */
static void
check_queue_mode(void)
{
	spool_require_shmem();
	/* No worker runs on a hot standby: fail at once, not after the timeout. */
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("the nonce service does not run during recovery"),
				 errhint("Call it on the primary.")));
	if (spool_nonce_shared->nworkers == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SERVICE_UNAVAILABLE),
				 errmsg("worker-queue mode is disabled"),
				 errhint("Set spool.nonce_workers to a positive number and restart the server, or use spool.nonce_allocate.")));
	if (OidIsValid(spool_core_shared->database_oid) &&
		spool_core_shared->database_oid != MyDatabaseId)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SERVICE_UNAVAILABLE),
				 errmsg("worker-queue mode serves database \"%s\" only", spool_database),
				 errhint("Call spool.nonce_request in that database, set spool.database, or use spool.nonce_allocate here.")));
}

/*
 * Take a request from the pool, queue it for worker w and wake the worker;
 * returns its index.  SP007 when the pool is empty.
 */
static int
request_submit(int w, const char *signer, SpoolReqKind kind, int64 arg,
			   const char *request_id, bool fresh_id, const SpoolQueuedReport *report)
{
	SpoolNonceReq *req;
	Latch	   *latch;
	int			idx;

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	if (spool_nonce_shared->closed)
	{
		LWLockRelease(spool_nonce_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SERVICE_UNAVAILABLE),
				 errmsg("the nonce service is not running: the extension spool_ext was dropped"),
				 errhint("Retry once the launcher has started the nonce workers of the new extension.")));
	}
	idx = spool_nonce_shared->free_head;
	if (idx < 0)
	{
		LWLockRelease(spool_nonce_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_SERVICE_UNAVAILABLE),
				 errmsg("nonce request queue is full"),
				 errdetail("%d requests are already waiting.", spool_nonce_shared->queue_size),
				 errhint("Raise spool.nonce_queue_size, or check spool.nonce_workers for a stuck worker.")));
	}
	req = &spool_requests[idx];
	spool_nonce_shared->free_head = req->next;
	strlcpy(req->signer, signer, sizeof(req->signer));
	req->kind = kind;
	req->arg = arg;
	req->has_request_id = (request_id != NULL);
	strlcpy(req->request_id, request_id ? request_id : "", sizeof(req->request_id));
	req->report_released = report && report->to_released;
	req->report_has_rid = report && report->request_id;
	strlcpy(req->report_rid, req->report_has_rid ? report->request_id : "",
			sizeof(req->report_rid));
	req->role = GetUserId();
	req->nonce = -1;
	req->sqlerrcode = 0;
	req->errmsg[0] = '\0';
	spool_request_enqueue(w, idx, false);
	req->fresh_id = fresh_id;	/* enqueue cleared it: a re-queue is not fresh */
	latch = spool_nonce_shared->workers[w].latch;
	LWLockRelease(spool_nonce_shared->lock);
	if (latch)
		SetLatch(latch);
	return idx;
}

/* Sleep until req is answered, or for spool.nonce_request_timeout. */
static void
request_wait(SpoolNonceReq *req)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   spool_nonce_request_timeout_ms);

	ConditionVariablePrepareToSleep(&req->cv);
	for (;;)
	{
		SpoolReqState state;
		long		remaining;

		LWLockAcquire(spool_nonce_shared->lock, LW_SHARED);
		state = req->state;
		LWLockRelease(spool_nonce_shared->lock);
		if (state == REQ_DONE || state == REQ_FAILED)
			break;
		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (remaining <= 0)
			break;
		ConditionVariableTimedSleep(&req->cv, remaining, PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
}

/*
 * The extension was dropped (from the launcher): fail every queued and
 * in-progress request at once with SP007, so no caller waits for
 * spool.nonce_request_timeout; take every slot from its worker (its
 * generation moves, so an old worker touches no request) and refuse new
 * requests until the launcher finds the extension again (reclaim_all).
 * What an old worker committed is gone with the extension's tables.
 */
void
spool_nonce_queue_close(void)
{
	int		   *failed = palloc(sizeof(int) * spool_nonce_shared->queue_size);
	int			nfailed = 0;
	int			i;

	LWLockAcquire(spool_nonce_shared->lock, LW_EXCLUSIVE);
	spool_nonce_shared->closed = true;
	for (i = 0; i < spool_nonce_shared->queue_size; i++)
	{
		SpoolNonceReq *req = &spool_requests[i];

		if (req->state == REQ_QUEUED || req->state == REQ_INPROGRESS)
		{
			req->state = REQ_FAILED;
			req->in_queue = false;
			req->sqlerrcode = ERRCODE_SPOOL_SERVICE_UNAVAILABLE;
			strlcpy(req->errmsg,
					"the extension spool_ext was dropped while the request waited",
					sizeof(req->errmsg));
			failed[nfailed++] = i;
		}
		else if (req->state == REQ_ABANDONED)
			spool_request_free(i);
	}
	for (i = 0; i < SPOOL_MAX_NONCE_WORKERS; i++)
	{
		SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[i];

		slot->generation++;
		slot->head = slot->tail = -1;
		slot->nqueued = 0;
		slot->ninprogress = 0;
	}
	LWLockRelease(spool_nonce_shared->lock);
	for (i = 0; i < nfailed; i++)
		ConditionVariableBroadcast(&spool_requests[failed[i]].cv);
	if (nfailed > 0)
		ereport(LOG,
				(errcode(ERRCODE_ADMIN_SHUTDOWN),
				 errmsg("spool_ext was dropped: %d waiting nonce requests failed", nfailed)));
	pfree(failed);
}

/*
 * SQL: spool.nonce_worker_status() — one row per nonce worker slot.
 */
Datum
spool_nonce_worker_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			w;

	spool_require_shmem();
	InitMaterializedSRF(fcinfo, 0);

	for (w = 0; w < spool_nonce_shared->nworkers; w++)
	{
		SpoolNonceWorkerSlot *slot = &spool_nonce_shared->workers[w];
		SpoolNonceWorkerSlot copy;
		Datum		values[11];
		bool		nulls[11] = {0};

		LWLockAcquire(spool_nonce_shared->lock, LW_SHARED);
		copy = *slot;
		LWLockRelease(spool_nonce_shared->lock);

		values[0] = Int32GetDatum(w);
		values[1] = Int32GetDatum(copy.pid);
		nulls[1] = (copy.pid == 0);
		values[2] = Int64GetDatum(copy.generation);
		values[3] = CStringGetTextDatum(copy.owner);
		nulls[3] = (copy.owner[0] == '\0');
		values[4] = Int32GetDatum(copy.nqueued);
		values[5] = Int32GetDatum(copy.ninprogress);
		values[6] = Int64GetDatum((int64) copy.served);
		values[7] = Int64GetDatum((int64) copy.batches);
		values[8] = Int32GetDatum(copy.last_batch);
		values[9] = Int64GetDatum((int64) copy.takeovers);
		values[10] = TimestampTzGetDatum(copy.heartbeat);
		nulls[10] = (copy.heartbeat == 0);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

static void
nonce_attach(bool found)
{
	int			i;

	if (found)
		return;
	spool_nonce_shared->lock = spool_shmem_lock("spool_ext nonce");
	spool_nonce_shared->nworkers = spool_nonce_workers;
	spool_nonce_shared->queue_size = spool_nonce_queue_size;
	for (i = 0; i < SPOOL_MAX_NONCE_WORKERS; i++)
	{
		spool_nonce_shared->workers[i].head = -1;
		spool_nonce_shared->workers[i].tail = -1;
	}
	for (i = 0; i < spool_nonce_queue_size; i++)
	{
		spool_requests[i].state = REQ_FREE;
		spool_requests[i].next = (i + 1 < spool_nonce_queue_size) ? i + 1 : -1;
		ConditionVariableInit(&spool_requests[i].cv);
	}
	spool_nonce_shared->free_head = 0;
}

/* Shared memory: the worker slots, then the request pool. */
const SpoolShmemArea spool_nonce_shmem = {
	"spool_ext nonce", true, sizeof(SpoolNonceShared), (void **) &spool_nonce_shared,
	sizeof(SpoolNonceReq), &spool_nonce_queue_size, (void **) &spool_requests, nonce_attach
};
