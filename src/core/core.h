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

/* Longest resource/owner/signer/request id we accept (bytes). */
#define SPOOL_NAME_MAX		200
#define SPOOL_ERRMSG_MAX	256
#define SPOOL_OWNER_MAX		64
/* A signer's lease is 'signer:' || signer, which must fit SPOOL_NAME_MAX. */
#define SPOOL_SIGNER_NAME_MAX (SPOOL_NAME_MAX - 7)
/* Longest name of a processor or target (part of worker names). */
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
extern int	spool_segment_size;
extern int	spool_min_retention_s;
extern int	spool_outbox_segment_size;
extern int	spool_outbox_poll_interval_ms;
extern int	spool_outbox_close_timeout_ms;
extern char *spool_kafka_allowed_brokers;

/* The upper bound of spool.nonce_workers (and of the nonce worker slots). */
#define SPOOL_MAX_NONCE_WORKERS 64

extern void spool_define_gucs(void);

/*
 * Shared memory (shmem.c).  Each subsystem sizes and initialises its own
 * area (spool_<subsystem>_shmem_size/_init, called from spool_ext.c); the
 * core's area holds what the launcher publishes to every worker.
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

extern Size spool_core_shmem_size(void);
extern void spool_core_shmem_init(void);
extern void *spool_shmem_area(const char *name, Size size, bool *found);
extern LWLock *spool_shmem_lock(const char *tranche);
extern void spool_require_shmem(void);

/*
 * Argument checks, SPI and transactions (util.c)
 */
extern char *spool_arg_name(FunctionCallInfo fcinfo, int argno, const char *what);
extern char *spool_arg_signer(FunctionCallInfo fcinfo, int argno);
extern char *spool_arg_name_opt(FunctionCallInfo fcinfo, int argno, const char *what);
extern int64 spool_arg_int64(FunctionCallInfo fcinfo, int argno, const char *what,
							 bool nonnegative);
extern int64 spool_arg_ttl(FunctionCallInfo fcinfo, int argno);
extern Datum spool_ttl_datum(int64 ttl_us);
extern Interval *spool_parse_interval(const char *s, const char *what);
extern void spool_bad_option(const char *msg, const char *hint) pg_attribute_noreturn();
extern bool spool_str_in_list(const char *s, const char *const *list);
extern bool spool_object_next(JsonbIterator **it, char **key, JsonbValue *value);
extern int64 spool_option_int(JsonbValue *v, const char *what, int64 lo, int64 hi);
extern int64 spool_option_duration_us(JsonbValue *v, const char *what, int64 lo_us,
									  int64 hi_us);
extern char *spool_format_duration(int64 us);
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
 * Workers (worker.c): what every background worker of spool_ext shares.
 */
extern void spool_fill_worker(BackgroundWorker *bgw, const char *function,
							  const char *name);
extern void spool_exit_if_orphaned(void);
extern void spool_worker_pass(MemoryContext cxt, bool orphanable);
extern void spool_wake_launcher(void);

/* A dynamic worker the launcher keeps running. */
typedef struct WorkerTrack
{
	char		name[NAMEDATALEN];	/* source name, for ingest workers */
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
	TimestampTz next_start;
	int			backoff_ms;
	bool		wanted;
} WorkerTrack;

extern bool spool_track_exited(WorkerTrack *t, TimestampTz now, const char *what);
extern bool spool_track_start(WorkerTrack *t, BackgroundWorker *bgw, TimestampTz now);

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
	SPOOL_LOCK_DISPATCH = 3		/* one worker per target shard */
} SpoolLockKind;

extern bool spool_internal_lock(SpoolLockKind kind, const char *name, uint32 key);
extern void spool_internal_unlock(SpoolLockKind kind, const char *name, uint32 key);
extern void spool_internal_locks_recheck(void);

#endif							/* SPOOL_CORE_H */
