/*-------------------------------------------------------------------------
 *
 * spool.h
 *	  Declarations shared by the spool_ext sources: SQLSTATEs, GUCs, shared
 *	  memory layout, and the internal lease and nonce entry points.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_H
#define SPOOL_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "utils/timestamp.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "postmaster/bgworker.h"

#include "outbox.h"

/*
 * SQLSTATEs of class SP (documented in docs/sql-reference.md; stable).
 */
#define ERRCODE_SPOOL_INVALID_ARGUMENT		MAKE_SQLSTATE('S','P','0','0','1')
#define ERRCODE_SPOOL_LEASE_NOT_HELD		MAKE_SQLSTATE('S','P','0','0','2')
#define ERRCODE_SPOOL_FENCE_REJECTED		MAKE_SQLSTATE('S','P','0','0','3')
#define ERRCODE_SPOOL_UNKNOWN_OBJECT		MAKE_SQLSTATE('S','P','0','0','4')
#define ERRCODE_SPOOL_UNKNOWN_NONCE			MAKE_SQLSTATE('S','P','0','0','5')
#define ERRCODE_SPOOL_NONCE_TRANSITION		MAKE_SQLSTATE('S','P','0','0','6')
#define ERRCODE_SPOOL_SERVICE_UNAVAILABLE	MAKE_SQLSTATE('S','P','0','0','7')
#define ERRCODE_SPOOL_SIGNER_LEASED			MAKE_SQLSTATE('S','P','0','0','8')
#define ERRCODE_SPOOL_LEASE_BLOCKED			MAKE_SQLSTATE('S','P','0','0','9')
#define ERRCODE_SPOOL_DUPLICATE_OBJECT		MAKE_SQLSTATE('S','P','0','1','0')

/* Longest resource/owner/signer/request id we accept (bytes). */
#define SPOOL_NAME_MAX		200
/* A signer's lease is 'signer:' || signer, which must fit SPOOL_NAME_MAX. */
#define SPOOL_SIGNER_NAME_MAX (SPOOL_NAME_MAX - 7)
/* Fixed-size copies kept in shared memory for worker-queue requests. */
#define SPOOL_SIGNER_MAX	(SPOOL_NAME_MAX + 1)
#define SPOOL_REQID_MAX		(SPOOL_NAME_MAX + 1)
#define SPOOL_ERRMSG_MAX	256
#define SPOOL_OWNER_MAX		64
#define SPOOL_FENCES_PER_BACKEND 4
#define SPOOL_MAX_NONCE_WORKERS 64
#define SPOOL_MAX_PROCESSORS 32
#define SPOOL_MAX_REPLICAS	8
#define SPOOL_PROC_NAME_MAX 48

/* GUCs (guc.c) */
extern char *spool_database;
extern int	spool_nonce_workers;
extern int	spool_nonce_queue_size;
extern int	spool_nonce_batch_max;
extern int	spool_nonce_lease_ttl_ms;
extern int	spool_nonce_request_timeout_ms;
extern int	spool_nonce_stall_timeout_ms;
extern int	spool_lease_wait_timeout_ms;
extern int	spool_lease_max_ttl_s;
extern int	spool_test_worker_pause_ms;
extern int	spool_segment_size;
extern int	spool_min_retention_s;
extern int	spool_outbox_segment_size;
extern int	spool_outbox_poll_interval_ms;
extern int	spool_outbox_close_timeout_ms;

extern void spool_define_gucs(void);

/*
 * Shared memory (shmem.c)
 */

/* What one backend has fenced in its current transaction. */
typedef struct SpoolFenceSlot
{
	slock_t		mutex;
	pid_t		pid;
	int			nfences;
	uint32		reshash[SPOOL_FENCES_PER_BACKEND];
	int64		token[SPOOL_FENCES_PER_BACKEND];
} SpoolFenceSlot;

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

typedef enum SpoolReplicaRole
{
	ROLE_NONE = 0,				/* no process */
	ROLE_STARTING,				/* loading the checkpoint, replaying */
	ROLE_STANDBY,				/* shadow: computes, emits nothing */
	ROLE_ACTIVE					/* holds the output gate */
} SpoolReplicaRole;

/*
 * One replica of a processor.  Written by the replica's own process (and
 * cleared by its exit callback); read by spool.processor_status.
 */
typedef struct SpoolReplicaSlot
{
	pid_t		pid;
	SpoolReplicaRole role;
	int64		cursor;			/* state is as of this cursor */
	int64		token;			/* gate token while active */
	uint64		state_hash;
	int64		state_hash_cursor;	/* -1: none yet */
	uint64		takeovers;
	TimestampTz last_takeover_at;
	double		last_takeover_ms;
	uint64		entries;
	uint64		batches;
	uint64		outputs;
	uint64		hash_checks;
	uint64		hash_mismatches;
	uint64		errors;
	bool		exit_error;		/* the last process exited on an error */
	char		last_error[SPOOL_ERRMSG_MAX];
	TimestampTz last_error_at;
	TimestampTz started_at;
} SpoolReplicaSlot;

/*
 * A processor the launcher runs.  The active replica publishes each commit
 * (and its state snapshots) here and broadcasts cv, which the standbys wait
 * on; an exiting active clears active_pid and broadcasts too, so a clean exit
 * is noticed at once.
 */
typedef struct SpoolProcessorSlot
{
	bool		in_use;
	char		name[NAMEDATALEN];
	pid_t		active_pid;
	TimestampTz active_gone_at; /* when the last active exited */
	TimestampTz lease_expires_at;	/* of the active's lease, as last renewed */
	int64		committed_cursor;
	int64		snapshot_cursor;
	uint64		snapshot_hash;
	ConditionVariable cv;
	SpoolReplicaSlot replicas[SPOOL_MAX_REPLICAS];
} SpoolProcessorSlot;

typedef struct SpoolShared
{
	LWLock	   *queue_lock;		/* guards requests and worker slots */
	pid_t		launcher_pid;
	pg_atomic_uint32 launcher_generation;	/* bumped by each launcher start */
	Oid			database_oid;	/* where the launcher runs, once known */
	Latch	   *promoter_latch;
	pg_atomic_uint64 published_cursor;	/* highest committed cursor */
	pg_atomic_uint32 staging_active;	/* staging table the workers fill: 0/1 */
	pg_atomic_uint64 staged_msgs[2];	/* messages staged per table, upper bound */
	pg_atomic_uint64 staged_other[2];	/* dead-letter and gap rows staged per table */
	ConditionVariable spool_cv; /* broadcast after each promotion */
	Latch	   *launcher_latch;
	int			free_head;
	int			nworkers;
	int			queue_size;
	SpoolNonceWorkerSlot workers[SPOOL_MAX_NONCE_WORKERS];
	LWLock	   *processor_lock; /* guards processors[] */
	SpoolProcessorSlot processors[SPOOL_MAX_PROCESSORS];
	LWLock	   *outbox_lock;	/* guards dispatchers[] */
	pg_atomic_uint64 outbox_seen;	/* highest outbox id handed out (see outbox_enqueue.c) */
	pg_atomic_uint32 targets_generation;	/* bumped by create/drop_target */
	SpoolDispatchSlot dispatchers[SPOOL_MAX_DISPATCHERS];

	/*
	 * followed by SpoolFenceSlot[MaxBackends], SpoolNonceReq[queue_size] and
	 * pg_atomic_uint64 outbox_lowest[MaxBackends]
	 */
} SpoolShared;

extern SpoolShared *spool_shared;
extern SpoolFenceSlot *spool_fence_slots;
extern SpoolNonceReq *spool_requests;
extern pg_atomic_uint64 *spool_outbox_lowest;

extern void spool_shmem_request(void);
extern void spool_shmem_startup(void);
extern void spool_require_shmem(void);

/*
 * Argument checks and SPI helpers (util.c)
 */
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/jsonb.h"

extern char *spool_arg_name(FunctionCallInfo fcinfo, int argno, const char *what);
extern char *spool_arg_signer(FunctionCallInfo fcinfo, int argno);
extern char *spool_arg_name_opt(FunctionCallInfo fcinfo, int argno, const char *what);
extern int64 spool_arg_int64(FunctionCallInfo fcinfo, int argno, const char *what,
							 bool nonnegative);
extern int64 spool_arg_ttl(FunctionCallInfo fcinfo, int argno);
extern Datum spool_ttl_datum(int64 ttl_us);
extern bool spool_str_in_list(const char *s, const char *const *list);
extern bool spool_object_next(JsonbIterator **it, char **key, JsonbValue *value);
extern void spool_check_object_name(const char *name, const char *what);
extern Oid	spool_check_run_as(Oid caller, const char *run_as, const char *object,
							   const char *code);
extern void spool_test_pause(void);
extern void spool_begin_txn(const char *activity);
extern void spool_end_txn(void);
extern void spool_abort_txn(void);
extern SPIPlanPtr spool_plan(SPIPlanPtr *cache, const char *sql, int nargs,
							 Oid *argtypes);
extern uint64 spool_exec(SPIPlanPtr plan, Datum *values, const char *nulls,
						 bool read_only, int expected);

/*
 * Leases (lease.c)
 */
typedef struct SpoolLease
{
	bool		held;			/* false: another owner has it */
	bool		took_over;		/* newly granted; another owner had it before */
	bool		blocked;		/* not granted: the old holder's fenced
								 * transaction is still open */
	int64		token;
	TimestampTz expires_at;
} SpoolLease;

typedef bool (*spool_may_steal_fn) (const char *holder);

/* The role of the leases of spool_ext's own workers (lease_store.role). */
#define SPOOL_LEASE_INTERNAL InvalidOid

extern SpoolLease spool_lease_acquire_internal(const char *resource,
											   const char *owner,
											   int64 ttl_us,
											   spool_may_steal_fn may_steal,
											   Oid role);
extern void spool_lease_check_role(const char *resource, Oid lease_role, Oid role);
extern void spool_fence_register(const char *resource, int64 token);
extern bool spool_lease_extend(const char *resource, const char *owner,
							   int64 token, int64 ttl_us, TimestampTz *expires,
							   Oid role);
extern char *spool_signer_resource(const char *signer);
extern const char *spool_resource_signer(const char *resource);

/*
 * Nonces (nonce.c)
 */
extern void spool_nonce_allocate_batch(const char *signer, const char *owner,
									   int64 token, int n,
									   const char **request_ids,
									   int64 *nonces, Oid role);

/*
 * Workers (launcher.c, nonce_worker.c)
 */
extern int	spool_route_signer(const char *signer, int nworkers);
extern void spool_request_free(int idx);
extern void spool_request_enqueue(int w, int idx, bool at_head);
extern void spool_register_launcher(void);
extern void spool_wake_launcher(void);
extern bool spool_owner_is_stale_worker(const char *holder);
extern void spool_fill_worker(BackgroundWorker *bgw, const char *function,
							  const char *name);
extern void spool_exit_if_orphaned(void);
extern void spool_worker_pass(MemoryContext cxt, bool orphanable);

#endif							/* SPOOL_H */
