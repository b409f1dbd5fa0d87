/*-------------------------------------------------------------------------
 *
 * core.h
 *	  The door to src/core: what every subsystem of spool_ext shares.  Error
 *	  codes, limits, settings, the core's shared memory, worker plumbing and
 *	  supervision, transactions and SPI, argument and option checks, and the
 *	  privilege rules (the door SQL functions go through, the box user code
 *	  runs in, and session locks in a keyspace of our own).
 *
 *	  core includes no other folder of src/.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_CORE_H
#define SPOOL_CORE_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "port/atomics.h"
#include "postmaster/bgworker.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

/* PostgreSQL 16 has it; 15 does not. */
#ifndef TimestampTzPlusMicroseconds
#define TimestampTzPlusMicroseconds(tz, us) ((tz) + (us))
#endif

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
#define ERRCODE_SPOOL_NONDETERMINISTIC		MAKE_SQLSTATE('S','P','0','1','1')

/* Longest resource/owner/signer/request id we accept (bytes). */
#define SPOOL_NAME_MAX		200
#define SPOOL_ERRMSG_MAX	256
#define SPOOL_OWNER_MAX		96		/* "processor:<name>/<replica>:<pid>" fits */
/* A signer's lease is 'signer:' || signer, which must fit SPOOL_NAME_MAX. */
#define SPOOL_SIGNER_NAME_MAX (SPOOL_NAME_MAX - 7)
/* Longest name of a source, processor or target (part of worker names). */
#define SPOOL_PROC_NAME_MAX 48

/*
 * Settings (guc.c).  Every spool.* setting is defined in one place so that
 * postgresql.conf reads like one list; each subsystem reads its own.
 */
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
extern int	spool_test_kafka_commit_pause_ms;
extern int	spool_segment_size;
extern int	spool_min_retention_s;
extern int	spool_outbox_segment_size;
extern int	spool_outbox_poll_interval_ms;
extern int	spool_outbox_close_timeout_ms;
extern char *spool_kafka_allowed_brokers;
extern int	spool_dead_letters_retention_s;
extern int	spool_gaps_retention_s;
extern int	spool_outbox_dead_retention_s;
extern int	spool_nonce_history_retention_s;
extern int	spool_operations_retention_s;
extern int	spool_retention_batch_size;
extern int	spool_retention_interval_ms;
extern int	spool_max_retention_s;
extern int	spool_max_retention_action;
extern bool spool_standby_processors;
extern bool spool_allow_drop_with_nonces;

/* spool.max_retention_action */
#define SPOOL_MAX_RETENTION_WARN 0
#define SPOOL_MAX_RETENTION_DROP 1

/* The upper bound of spool.nonce_workers (and of the nonce worker slots). */
#define SPOOL_MAX_NONCE_WORKERS 64

extern void spool_define_gucs(void);

/*
 * Shared memory (shmem.c).  Each subsystem declares its own area
 * (spool_<subsystem>_shmem, attached from spool_ext.c); the core's area
 * holds what the launcher publishes to every worker.
 */
typedef struct SpoolCoreShared
{
	LWLock	   *lock;			/* guards the fields below but the atomic */
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	Oid			database_oid;	/* where the launcher runs, once known */
	pg_atomic_uint32 launcher_generation;	/* bumped by each launcher start */
} SpoolCoreShared;

extern SpoolCoreShared *spool_core_shared;

/* The lease owner name a worker registered (worker.c), per backend. */
typedef struct SpoolIdentity
{
	pid_t		pid;
	char		owner[SPOOL_OWNER_MAX];
} SpoolIdentity;

extern SpoolIdentity *spool_identities;	/* [MaxBackends], under the core lock */

/*
 * A subsystem's shared area: a header struct, then count elements, each part
 * MAXALIGNed (either may be absent).  shmem.c sizes and attaches every area
 * and publishes its addresses in *header and *elements; then attach (NULL:
 * nothing to do) is told whether the area already existed (a new one is
 * zeroed).  A locked area has one LWLock, in a tranche named as the area.
 */
typedef struct SpoolShmemArea
{
	const char *name;
	bool		locked;
	Size		header_size;
	void	  **header;
	Size		element_size;
	const int  *count;
	void	  **elements;
	void		(*attach) (bool found);
} SpoolShmemArea;

extern const SpoolShmemArea spool_core_shmem;
extern Size spool_shmem_size(const SpoolShmemArea *area);
extern void spool_shmem_attach(const SpoolShmemArea *area);
extern LWLock *spool_shmem_lock(const char *tranche);
extern void spool_require_shmem(void);
extern void spool_require_pipeline_database(const char *what);

/* Options: one table-driven parser for jsonb options (options.c). */
#include "core/options.h"

/*
 * Argument checks, SPI and transactions (util.c)
 */
extern char *spool_arg_name(FunctionCallInfo fcinfo, int argno, const char *what);
extern char *spool_arg_signer(FunctionCallInfo fcinfo, int argno);
extern Jsonb *spool_arg_jsonb(FunctionCallInfo fcinfo, int argno, const char *message,
							  const char *hint);
extern char *spool_arg_name_opt(FunctionCallInfo fcinfo, int argno, const char *what);
extern int64 spool_arg_int64(FunctionCallInfo fcinfo, int argno, const char *what,
							 bool nonnegative);
extern int64 spool_arg_ttl(FunctionCallInfo fcinfo, int argno);
extern Datum spool_ttl_datum(int64 ttl_us);
extern bool spool_str_in_list(const char *s, const char *const *list);
extern bool spool_object_next(JsonbIterator **it, char **key, JsonbValue *value);
extern void spool_check_object_name(const char *name, const char *what);
extern bool spool_name_chars_ok(const char *s);
extern Oid	spool_check_run_as(Oid caller, const char *run_as, const char *object,
							   const char *code);
extern void spool_test_pause(void);
extern void spool_begin_txn(const char *activity);
extern void spool_start_txn(int isolation);
extern void spool_snapshot_txn(const char *activity);
extern void spool_end_txn(void);
extern void spool_abort_txn(void);
extern SPIPlanPtr spool_plan(SPIPlanPtr *cache, const char *sql, int nargs,
							 Oid *argtypes);
extern SPIPlanPtr spool_plan_generic(SPIPlanPtr *cache, const char *sql, int nargs,
									 Oid *argtypes);
extern uint64 spool_exec(SPIPlanPtr plan, Datum *values, const char *nulls,
						 bool read_only, int expected);
extern void spool_text_param(Datum *values, char *nulls, int i, const char *s);

/*
 * Stage histograms in shared memory (hist.c).  Bucket i counts values up to
 * first * 2^i (i < SPOOL_HIST_BUCKETS), the last bucket the rest; quantiles
 * read from them are bucket bounds.  Writers hold their area's lock.
 */
#define SPOOL_HIST_BUCKETS	20

typedef struct SpoolHist
{
	double		first;			/* upper bound of bucket 0 */
	uint64		counts[SPOOL_HIST_BUCKETS + 1];
	uint64		count;
	double		sum;
	double		max;
	double		last;
	TimestampTz last_at;
} SpoolHist;

struct ReturnSetInfo;
extern void spool_hist_init(SpoolHist *h, double first);
extern void spool_hist_add(SpoolHist *h, double v, TimestampTz now);
extern void spool_hist_bucket_add(uint64 *hist, int nb, double v, double first);
extern double spool_hist_quantile(const uint64 *hist, int nb, double first, double q,
								  double max);
extern Datum spool_hist_array(const uint64 *hist, int nb);
extern void spool_hist_put(struct ReturnSetInfo *rsinfo, const char *stage,
						   const char *object, int replica, const char *name,
						   const char *unit, const SpoolHist *h);

/*
 * Workers (worker.c): what every background worker of spool_ext shares.
 * A worker learns what to work on from its arguments, which the supervisor
 * puts in bgw_extra.
 */
typedef struct SpoolWorkerArgs
{
	uint32		launcher_generation;	/* see spool_exit_if_orphaned */
	uint32		generation;		/* of its slot, where the kind keeps one */
	int32		slot;			/* its kind's shared-memory slot; -1: none */
	int32		index;			/* its number within its unit (replica) */
	char		name[NAMEDATALEN];	/* its source, processor or target */
	Oid			extension;		/* pg_extension oid it works for */
} SpoolWorkerArgs;

StaticAssertDecl(sizeof(SpoolWorkerArgs) <= BGW_EXTRALEN,
				 "SpoolWorkerArgs must fit in bgw_extra");

extern const SpoolWorkerArgs *spool_worker_args(void);
extern void spool_worker_attach(Oid database, pqsigfunc on_sigterm);
extern void spool_worker_keep_memory(size_t mmap_threshold, size_t trim_threshold);
extern void spool_exit_if_orphaned(void);
extern void spool_worker_check_extension(void);
extern void spool_worker_pass(MemoryContext cxt, bool orphanable);
extern void spool_wake_launcher(void);

/*
 * Workers' lease owner names: one format, "<kind>:<instance>:<pid>", and one
 * liveness check.  A name is live while its worker runs and the launcher has
 * not revoked it (a replaced worker's name is revoked at once).
 */
extern const char *spool_worker_owner(const char *kind, const char *instance);
extern void spool_worker_owner_revoke(pid_t pid);
extern bool spool_owner_is_gone(const char *holder);

/*
 * Supervision (supervise.c): "N workers of kind K wanted".  Each subsystem
 * describes its kind of worker; the launcher keeps every kind's units
 * running: it claims their slots, starts them, restarts them with backoff,
 * replaces stale ones and stops what is no longer wanted.
 */
#define SPOOL_UNIT_MAX_WORKERS 8

/* A worker the supervisor keeps running. */
typedef struct WorkerTrack
{
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
	TimestampTz next_start;
	int			backoff_ms;
} WorkerTrack;

/* One thing a kind wants workers for: a source, a processor, a target shard. */
typedef struct SpoolUnit
{
	char		name[NAMEDATALEN];
	int64		id;				/* with name and index: the unit's identity */
	int			index;			/* target shard, nonce worker number; else 0 */
	int			nworkers;		/* how many (processor replicas) */
	uint32		version;		/* of its definition (target options) */
	int			slot;			/* claimed shared-memory slot; -1: none */
	bool		wanted;
	WorkerTrack w[SPOOL_UNIT_MAX_WORKERS];
} SpoolUnit;

/* What to do about a running worker (SpoolWorkerKind.check). */
typedef enum SpoolVerdict
{
	SPOOL_KEEP,					/* leave it running */
	SPOOL_RESTART,				/* terminate it; start it again once stopped */
	SPOOL_REPLACE				/* start another now: the kind made it leave */
} SpoolVerdict;

struct SpoolSupervisor;

/*
 * What a kind does for the supervisor, written by its subsystem; a NULL
 * callback means what its comment says.
 */
typedef struct SpoolKindOps
{
	/* Call spool_want for each unit wanted now. */
	void		(*list) (struct SpoolSupervisor *s);
	/* Instance name of worker i, after type in bgw_name; NULL: none. */
	char	   *(*label) (const SpoolUnit *u, int i);
	/* Fill in what worker i is told besides the unit (generation). */
	void		(*prepare) (const SpoolUnit *u, int i, SpoolWorkerArgs *args);
	/* Did worker i exit on an error?  NULL: back off unless it ran long. */
	bool		(*failed) (const SpoolUnit *u, int i);
	/* Is running worker i still right?  NULL: always. */
	SpoolVerdict (*check) (const SpoolUnit *u, int i, TimestampTz now);
	/* Worker i is gone or abandoned, because why; NULL: nothing to do. */
	void		(*gone) (const SpoolUnit *u, int i, const char *why);
	/* The extension was found installed; nothing of this kind runs yet. */
	void		(*reset) (void);
	/* The extension was dropped: forget what the old catalog left here. */
	void		(*dropped) (void);
} SpoolKindOps;

/*
 * A kind's shared slots, one per unit (processors, dispatcher shards): an
 * array of max_units slots of size bytes, each with a bool in_use at offset
 * in_use, guarded by lock.  The supervisor claims a free one for a new unit
 * (fill resets it for the unit) and frees it when the unit is forgotten.
 * The subsystem describes them (spool_slots_attach) when it attaches its
 * shared memory.
 */
typedef struct SpoolSlots
{
	LWLock	   *lock;
	void	   *array;
	Size		size;
	Size		in_use;
	void		(*fill) (void *slot, const SpoolUnit *u);
} SpoolSlots;

/* A kind of worker: one row of the launcher's table of kinds. */
typedef struct SpoolWorkerKind
{
	const char *type;			/* bgw_type: "spool processor" */
	const char *function;		/* its entry point in spool_ext */
	const char *what;			/* in messages: "enabled processors" */
	int			max_units;
	bool		reads_catalog;	/* list runs in a transaction */
	const SpoolKindOps *ops;	/* from its subsystem */
	SpoolSlots *slots;			/* NULL: its units need none */
} SpoolWorkerKind;

typedef struct SpoolSupervisor
{
	const SpoolWorkerKind *kind;
	Oid			extension;		/* what its workers are started for */
	bool		extension_gone; /* a refresh found it dropped */
	int			nunits;
	SpoolUnit  *units;			/* kind->max_units of them */
} SpoolSupervisor;

extern SpoolSupervisor *spool_supervisor_create(const SpoolWorkerKind *kind);
extern void spool_want(struct SpoolSupervisor *s, const char *name, int64 id,
					   int index, int nworkers, uint32 version);
extern void spool_supervise(SpoolSupervisor *s, TimestampTz now, bool refresh);
extern void spool_supervise_stop(SpoolSupervisor *s, const char *why);
extern int	spool_supervise_drain(SpoolSupervisor *s, TimestampTz now);
extern void spool_supervise_reset(SpoolSupervisor *s);
extern void spool_slots_attach(SpoolSlots *slots, LWLock *lock, void *array, Size size,
							   Size in_use, void (*fill) (void *slot, const SpoolUnit *u));
extern bool spool_slot_flag(LWLock *lock, const bool *flag);

/*
 * Who is calling, and what that role may do: the door every SQL function
 * goes through (privs.c).
 */
typedef struct SpoolCaller
{
	Oid			role;			/* privileges are checked against this role */
	Oid			save_user;
	int			save_sec;
	int			nestlevel;
} SpoolCaller;

/* The role the extension's own work runs as (workers and SQL functions). */
#define SPOOL_INTERNAL_ROLE BOOTSTRAP_SUPERUSERID

/* The only search_path internal SQL and user code ever run with. */
#define SPOOL_SAFE_SEARCH_PATH "pg_catalog, pg_temp"

extern void spool_enter(SpoolCaller *c);
extern void spool_leave(SpoolCaller *c);
extern bool spool_role_is_member(Oid role, Oid owner);
extern void spool_check_owner(Oid role, Oid owner, const char *kind, const char *name);
extern HeapTuple spool_owned_row(const char *kind, const char *name, int ownercol,
								 Oid role);
extern void spool_change_owned(const char *table, const char *kind, const char *name,
							   const char *sql);
extern bool spool_may_signal(Oid role, int pid);
extern void spool_worker_pin_settings(void);

/*
 * The one place where user code runs: processor handlers and sql target
 * functions, inside a box (usercode.c).
 */
typedef struct SpoolBox
{
	Oid			save_user;
	int			save_sec;
	int			nestlevel;
	bool		open;
} SpoolBox;

extern void spool_box_open(SpoolBox *box, Oid role, bool read_only);
extern void spool_box_close(SpoolBox *box);
extern void spool_box_abandon(SpoolBox *box);

/*
 * Session locks in a keyspace of spool_ext's own (internal_lock.c).  The
 * kind is part of the tag, so kinds never collide.
 */
typedef enum SpoolLockKind
{
	SPOOL_LOCK_INGEST = 1,		/* one ingest worker per source */
	SPOOL_LOCK_PROCESSOR = 2,	/* the active replica of a processor */
	SPOOL_LOCK_DISPATCH = 3,	/* one worker per target shard */
	SPOOL_LOCK_PROMOTER = 4		/* one promoter */
} SpoolLockKind;

extern bool spool_internal_lock(SpoolLockKind kind, const char *name, uint32 key);
extern void spool_internal_unlock(SpoolLockKind kind, const char *name, uint32 key);
extern void spool_internal_locks_recheck(void);

#endif							/* SPOOL_CORE_H */
