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

/* One worker-queue nonce request; lives in a shared pool. */
typedef struct SpoolNonceReq
{
	SpoolReqState state;
	int			worker;			/* routed to this worker slot */
	uint32		generation;		/* worker generation that took it */
	int			next;			/* queue / free list link, -1 = end */
	bool		in_queue;		/* linked in a worker's FIFO */
	char		signer[SPOOL_SIGNER_MAX];
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
									   int64 *nonces, Oid role);

/* queue.c */
extern int	spool_route_signer(const char *signer, int nworkers);
extern void spool_request_free(int idx);
extern void spool_request_enqueue(int w, int idx, bool at_head);

/* launch.c */
extern const SpoolKindOps spool_nonce_worker_ops;

#endif							/* SPOOL_NONCE_H */
