/*-------------------------------------------------------------------------
 *
 * nonce.h
 *	  The door to src/nonce: the per-signer nonce allocator (nonce.c), the
 *	  worker-queue mode's request pool (queue.c) and its workers (worker.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_NONCE_H
#define SPOOL_NONCE_H

#include "core/core.h"
#include "lease/lease.h"

#include "storage/condition_variable.h"

/* Fixed-size copies kept in shared memory for worker-queue requests. */
#define SPOOL_SIGNER_MAX	(SPOOL_NAME_MAX + 1)
#define SPOOL_REQID_MAX		(SPOOL_NAME_MAX + 1)

typedef enum SpoolReqState
{
	REQ_FREE = 0,
	REQ_QUEUED,
	REQ_INPROGRESS,
	REQ_DONE,
	REQ_FAILED,
	REQ_ABANDONED
} SpoolReqState;

/* What a worker-queue request asks for. */
typedef enum SpoolReqKind
{
	SPOOL_REQ_ALLOCATE = 0,		/* nonce_request */
	SPOOL_REQ_USED,				/* nonce_report(..., 'used') */
	SPOOL_REQ_RECYCLABLE,		/* nonce_report(..., 'recyclable') */
	SPOOL_REQ_SET_NEXT,			/* nonce_set_next without owner and token */
	SPOOL_REQ_REPORT_ALLOCATE	/* nonce_report_and_request: a report, then
								 * an allocation if the report holds */
} SpoolReqKind;

/* The report that a SPOOL_REQ_REPORT_ALLOCATE request makes first. */
typedef struct SpoolQueuedReport
{
	int64		nonce;
	const char *request_id;		/* the reported allocation's; NULL: none */
	bool		to_released;
} SpoolQueuedReport;

/* One worker-queue nonce request; lives in a shared pool. */
typedef struct SpoolNonceReq
{
	SpoolReqState state;
	int			worker;			/* routed to this worker slot */
	uint32		generation;		/* worker generation that took it */
	int			next;			/* queue / free list link, -1 = end */
	bool		in_queue;		/* linked in a worker's FIFO */
	char		signer[SPOOL_SIGNER_MAX];
	SpoolReqKind kind;
	int64		arg;			/* reports: the nonce; set_next: the chain's */
	bool		has_request_id; /* reports: false when the nonce has none */
	/* REPORT_ALLOCATE: the report (arg is its nonce; request_id the new one) */
	bool		report_released;
	bool		report_has_rid;
	char		report_rid[SPOOL_REQID_MAX];
	bool		fresh_id;		/* request_id was made for this call and was
								 * never queued before: no nonce has it yet */
	char		request_id[SPOOL_REQID_MAX];
	Oid			role;			/* who asked: the signer must be its role's */
	int64		nonce;
	int			sqlerrcode;
	char		errmsg[SPOOL_ERRMSG_MAX];
	ConditionVariable cv;
} SpoolNonceReq;

/* One nonce service worker slot (the process in it may be replaced). */
typedef struct SpoolNonceWorkerSlot
{
	pid_t		pid;
	uint32		generation;		/* bumped when the launcher replaces it */
	Latch	   *latch;
	TimestampTz heartbeat;
	int			head;			/* FIFO of QUEUED requests */
	int			tail;
	int			nqueued;
	int			ninprogress;
	char		owner[SPOOL_OWNER_MAX];	/* lease owner name while running */
	uint64		served;
	uint64		batches;
	uint64		takeovers;
	int			last_batch;
	TimestampTz started_at;
} SpoolNonceWorkerSlot;

typedef struct SpoolNonceShared
{
	LWLock	   *lock;			/* guards requests and worker slots */
	int			free_head;
	int			nworkers;
	int			queue_size;
	bool		closed;			/* the extension was dropped: no new requests */
	SpoolNonceWorkerSlot workers[SPOOL_MAX_NONCE_WORKERS];
} SpoolNonceShared;

extern SpoolNonceShared *spool_nonce_shared;
extern SpoolNonceReq *spool_requests;

extern const SpoolShmemArea spool_nonce_shmem;

/* nonce.c */
extern const SpoolLeaseGuard spool_signer_guard;
extern char *spool_signer_resource(const char *signer);
extern void spool_nonce_allocate_batch(const char *signer, const char *owner,
									   int64 token, int n,
									   const char **request_ids,
									   const bool *fresh_ids,
									   int64 *nonces, Oid role,
									   int64 locked_released);

/*
 * One report on a nonce (nonce.c's state machine): in, the nonce, the
 * allocation's request id when match_request, the target state; out, an
 * SQLSTATE (0: applied or a harmless repeat) and the message parts.
 */
typedef struct SpoolNonceReport
{
	int64		nonce;
	const char *request_id;
	bool		match_request;
	bool		to_released;
	int			sqlerrcode;
	char	   *errmsg;
	char	   *errdetail;
	char	   *errhint;
} SpoolNonceReport;

extern int64 spool_nonce_report_batch(const char *signer, const char *owner,
									  int64 token, Oid role, int n,
									  SpoolNonceReport *reports);
extern void spool_nonce_report_raise(const SpoolNonceReport *rep);
extern int64 spool_nonce_set_next_kernel(const char *signer, int64 next,
										 const char *owner, int64 token, Oid role);

/* queue.c */
extern int64 spool_nonce_queue_call(const char *signer, SpoolReqKind kind, int64 arg,
									const char *request_id, bool fresh_id,
									const SpoolQueuedReport *report);
extern int	spool_route_signer(const char *signer, int nworkers);
extern void spool_request_free(int idx);
extern void spool_request_enqueue(int w, int idx, bool at_head);
extern void spool_nonce_queue_close(void);
extern int64 spool_nonce_signers_in_use(void);

/* launch.c */
extern const SpoolKindOps spool_nonce_worker_ops;

#endif							/* SPOOL_NONCE_H */
