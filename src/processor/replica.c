/*-------------------------------------------------------------------------
 *
 * processor.c
 *	  A processor replica: a background worker that folds the spool through
 *	  the processor's handler.  Every replica computes the same state; only
 *	  the one holding the output gate (role active) commits outputs.
 *
 *	  The gate is a lease on 'processor:<name>' plus the checkpoint row.  At
 *	  takeover the new active writes its token into the checkpoint row; each
 *	  batch commits its outputs, the new committed cursor and (every
 *	  checkpoint_every entries) a state snapshot in one transaction that
 *	  fences the lease (FOR KEY SHARE) and compare-and-sets the checkpoint row
 *	  on (token, committed_cursor).  A replica whose gate was taken fails the
 *	  compare-and-set, rolls back and becomes a standby.
 *
 *	  Standbys ("shadow") apply the spool up to the committed cursor and no
 *	  further, so at takeover the new active emits exactly the outputs after
 *	  it.  An exiting active clears active_pid in shared memory and wakes the
 *	  standbys; one of them takes the session advisory lock and then the
 *	  lease (stealing it, since its holder is gone).  A stalled active keeps
 *	  both until its lease expires.  See docs/processors.md.
 *
 *	  alter_processor: the launcher publishes the stored options' version in
 *	  shared memory and a replica with another one re-reads batch_size,
 *	  lease_ttl and checkpoint_every in place.  rewind_processor (rewind.c)
 *	  bumps the checkpoint's epoch and takes the gate's lease: a replica
 *	  commits only in the epoch it loaded (the compare-and-set checks it),
 *	  and one that sees a newer epoch, in shared memory or when it claims the
 *	  gate, reloads the checkpoint and replays from it.
 *
 *	  On a hot standby (spool.standby_processors) replicas are shadows that
 *	  write nothing: nobody publishes the gate there, so each one reads the
 *	  replicated checkpoint row (committed cursor, snapshot, epoch) and
 *	  publishes it into shared memory itself, follows it, compares state
 *	  hashes at the snapshot cursor, and never claims the gate.  When
 *	  recovery ends it is a shadow like any other: the old primary's lease
 *	  holder is no live worker here, so one of them takes the gate at once
 *	  and has at most what was committed since its last look to catch up.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "ingest/ingest.h"
#include "lease/lease.h"
#include "outbox/outbox.h"
#include "processor/processor.h"
#include "processor/handler.h"

PGDLLEXPORT void spool_processor_main(Datum main_arg);

#define IDLE_SNAPSHOT_MS	1000	/* snapshot a changed state after this idle time */
#define STANDBY_POLL_MS		250
#define RECOVERY_POLL_MS	100 /* on a hot standby: read the checkpoint row */
#define PROMOTION_POLL_MS	5	/* on a hot standby: look for the promotion */
#define GATE_FREE_POLL_MS	10
#define READ_CHUNK			4096	/* rows per fetch: small, large fields stay toasted */
#define BATCH_MAX_BYTES		(64 * 1024 * 1024)	/* of the entries of one batch */


/* The processor, as loaded at start. */
static char proc_name[NAMEDATALEN];
static Oid	handler_oid;
static Oid	run_as;
static Oid	proc_owner;		/* outputs are written with its rights */
static ArrayType *sources;		/* NULL: every source */
static int	batch_size;
static int64 lease_ttl_ms;
static int64 checkpoint_every;
static Jsonb *handler_settings;
static uint32 options_loaded;	/* version of the options read */
static uint32 options_acted;	/* the last published version acted upon */
static const SpoolNativeHandler *native;	/* a built-in handler, or NULL */

static MemoryContext loop_cxt;
static int	my_slot;
static int	my_replica;			/* 0-based */
static SpoolProcessorSlot *ps;
static SpoolReplicaSlot *rs;
static char lease_resource[NAMEDATALEN + 16];
static char lease_owner[NAMEDATALEN + 48];

/* The state, as of cursor. */
static MemoryContext state_cxt;
static Jsonb *state;			/* generic handlers */
static void *native_config;
static void *native_state;
static int64 cursor;
static int64 my_epoch;			/* of the checkpoint the state comes from */

/* The gate, while active. */
static int64 token;
static TimestampTz next_renew;
static bool have_advisory;
static TimestampTz takeover_from;	/* when the gate became free, for latency */
static int64 since_snapshot;	/* entries applied since the last snapshot */
static TimestampTz last_snapshot_at;
static int64 last_checked_snapshot = -1;

/* What a replica did before its first takeover, for the log. */
static TimestampTz mark_at;		/* its start, or the promotion it saw */
static const char *mark_what = "its start";
static int64 applied_since_mark;
static bool followed_in_recovery;	/* it runs on a hot standby */
static bool saw_promotion;		/* it ran on one that was promoted */

static SPIPlanPtr plan_read_entries = NULL;
static SPIPlanPtr plan_read_rows = NULL;
static SPIPlanPtr plan_spool_end = NULL;
static SPIPlanPtr plan_commit = NULL;
static SPIPlanPtr plan_consumer = NULL;

/* One batch read from the spool. */
typedef struct Batch
{
	int			n;
	int64		end;			/* cursor the batch brings the state to */
	Datum		entries;		/* generic: spool.entries[] */
	SpoolEntry *native_entries;	/* native handlers */
} Batch;

/* What applying a batch produced. */
typedef struct StepResult
{
	Jsonb	   *state;			/* generic: the new state */
	int			noutputs;
	Datum		outputs;		/* spool.output[] */
} StepResult;

/* The processor's gate and progress, as shared memory shows them. */
typedef struct GateView
{
	pid_t		active_pid;		/* 0: no active replica */
	TimestampTz active_gone_at;
	TimestampTz lease_expires_at;
	int64		committed_cursor;
	int64		snapshot_cursor;
	int64		epoch;
	uint32		options_wanted;
} GateView;

/* A batch being read: what read_batch needs per row, set up once. */
typedef struct BatchReader
{
	Batch	   *b;
	Size		bytes;			/* raw size of the rows taken */
	int64		last;			/* cursor of the last row taken */
	int			n;
	/* generic handlers: the spool.entries composites for the array */
	Oid			rowtype;
	TupleDesc	rowdesc;
	int		   *map;			/* rowdesc attribute -> result column, 0: dropped */
	Datum	   *elems;
	Datum	   *fields;
	bool	   *fnulls;
	Datum	   *cols;			/* a result row, deformed */
	bool	   *colnulls;
} BatchReader;

static void replica_attach(void);
static void replica_detach(int code, Datum arg);
static bool replica_step(void);
static bool standby_pass(void);
static bool follow_replicated(void);
static void note_promotion(void);
static void read_gate(GateView *g);
static void load_processor(void);
static void reload_options(void);
static void check_run_as(void);
static void publish_progress(int64 committed, int64 at, int64 hash, bool hash_null);
static void load_checkpoint(bool publish);
static void state_reset(Jsonb *snapshot, int64 at);
static int64 spool_end(void);
static void read_batch(int64 after, int64 upto, Batch *b);
static SPIPlanPtr reader_open(BatchReader *r, Batch *b);
static void reader_map(BatchReader *r, TupleDesc desc);
static bool reader_add(BatchReader *r, HeapTuple tup, TupleDesc desc);
static void apply_batch(Batch *b, StepResult *res, bool want_outputs);
static void apply_native(Batch *b, StepResult *res, bool want_outputs);
static void apply_handler(Batch *b, StepResult *res);
static Jsonb *state_stage(StepResult *res);
static void state_adopt(Jsonb *staged, int64 end);
static uint64 state_hash(Jsonb **as_jsonb);
static bool active_step(void);
static bool active_read(Batch *b, bool *snapshot);
static uint64 snapshot_of(StepResult *res, Jsonb **snap);
static void advance_consumer(int64 end);
static bool gate_commit(Batch *b, StepResult *res, Jsonb *snap, uint64 hash);
static void active_committed(Batch *b, Jsonb *staged, bool snapshot, uint64 hash,
							 int noutputs);
static void standby_step(int64 target);
static bool try_takeover(void);
static int64 claim_gate(TimestampTz now, TimestampTz expires, SpoolLease *lease,
						int64 *epoch);
static void catch_up(int64 committed, bool took_over);
static void become_standby(const char *why);
static bool renew_lease(void);
static bool advisory_lock(bool take);
static void leave_gate(bool exiting);
static HeapTuple read_own_row(const char *activity, const char *sql, TupleDesc *desc);
static void wait_for_work(void);
static void record_error(void);
static void check_snapshot_hash(void);
static void note_batch(int64 n, TimestampTz t0, double handler_ms, double commit_ms,
					   double snapshot_ms);


/* ---------------------------------------------------------------------
 * Start and exit
 * ---------------------------------------------------------------------
 */

static void
replica_detach(int code, Datum arg)
{
	leave_gate(true);
}

/*
 * Leave the output gate: clear it if it is ours, and our slot and owner
 * name with it when exiting (else we stay on as a standby).  Release the
 * advisory lock before waking the standbys (exit would release it only
 * later), so the first one to try gets it and takes over at once; they
 * notice a clean exit at once.
 */
static void
leave_gate(bool exiting)
{
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	if (!exiting)
	{
		rs->role = ROLE_STANDBY;
		rs->token = 0;
	}
	else if (rs->pid == MyProcPid)
	{
		rs->pid = 0;
		rs->role = ROLE_NONE;
	}
	if (ps->active_pid == MyProcPid)
	{
		ps->active_pid = 0;
		ps->active_gone_at = GetCurrentTimestamp();
	}
	LWLockRelease(spool_processor_shared->lock);
	/* Our lease is free for the taking once our owner name is gone. */
	if (exiting)
		spool_worker_owner_revoke(MyProcPid);
	if (have_advisory)
	{
		advisory_lock(false);
		have_advisory = false;
	}
	ConditionVariableBroadcast(&ps->cv);
}

/*
 * Attach: signals, the connection, pinned settings, and this replica's slot
 * (unless the processor is gone or another one took the slot).
 */
static void
replica_attach(void)
{
	spool_worker_attach(spool_core_shared->database_oid, NULL);
	my_slot = spool_worker_args()->slot;
	my_replica = spool_worker_args()->index;
	strlcpy(proc_name, spool_worker_args()->name, NAMEDATALEN);
	ps = &spool_processor_shared->processors[my_slot];
	rs = &ps->replicas[my_replica];
	snprintf(lease_resource, sizeof(lease_resource), "processor:%s", proc_name);
	strlcpy(lease_owner, spool_worker_owner("processor", psprintf("%s/%d", proc_name, my_replica + 1)),
			sizeof(lease_owner));

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	if (!ps->in_use || strcmp(ps->name, proc_name) != 0)
	{
		LWLockRelease(spool_processor_shared->lock);
		proc_exit(0);
	}
	rs->pid = MyProcPid;
	rs->role = ROLE_STARTING;
	rs->exit_error = false;
	rs->token = 0;
	rs->started_at = GetCurrentTimestamp();
	LWLockRelease(spool_processor_shared->lock);
	before_shmem_exit(replica_detach, (Datum) 0);

	state_cxt = AllocSetContextCreate(TopMemoryContext, "spool processor state",
									  ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "spool processor loop",
									 ALLOCSET_DEFAULT_SIZES);
}

static void
read_gate(GateView *g)
{
	LWLockAcquire(spool_processor_shared->lock, LW_SHARED);
	g->active_pid = ps->active_pid;
	g->active_gone_at = ps->active_gone_at;
	g->lease_expires_at = ps->lease_expires_at;
	g->committed_cursor = ps->committed_cursor;
	g->snapshot_cursor = ps->snapshot_cursor;
	g->epoch = ps->epoch;
	g->options_wanted = ps->options_wanted;
	LWLockRelease(spool_processor_shared->lock);
}

/*
 * A step as a standby (or a starting replica): follow the committed cursor,
 * stopping at the active's snapshot cursor to compare state hashes; once
 * caught up, check the hash and take the gate if it is free.  Returns false
 * when there was nothing to do.
 */
static bool
standby_pass(void)
{
	GateView	g;
	int64		committed;
	bool		recovering = RecoveryInProgress();

	if (recovering && !follow_replicated())
		return true;
	if (!recovering && followed_in_recovery)
		note_promotion();
	read_gate(&g);
	if (g.epoch != my_epoch)
	{
		/* Rewound: the state comes from the new checkpoint. */
		load_checkpoint(false);
		return true;
	}
	committed = g.committed_cursor;
	if (g.snapshot_cursor > cursor && g.snapshot_cursor < committed)
		committed = g.snapshot_cursor;
	if (cursor < committed)
	{
		standby_step(committed);
		return true;
	}
	/* Caught up: from now on a takeover needs at most one batch. */
	if (rs->role == ROLE_STARTING)
		rs->role = ROLE_STANDBY;
	check_snapshot_hash();
	/* A hot standby writes nothing: the gate waits for the promotion. */
	if (recovering)
		return false;
	return try_takeover();
}

/*
 * On a hot standby, where no active replica publishes the gate: read the
 * replicated checkpoint row and publish its committed cursor and snapshot
 * into shared memory, as an active's commits would.  Another epoch than
 * ours (the processor was rewound on the primary) reloads the checkpoint:
 * then false.  Exits when the processor's checkpoint is gone (dropped).
 */
static bool
follow_replicated(void)
{
	bool		isnull;
	bool		hash_null;
	HeapTuple	tup;
	TupleDesc	desc;
	int64		committed;
	int64		at;
	int64		hash;
	int64		epoch;

	followed_in_recovery = true;
	tup = read_own_row("following the replicated checkpoint",
					   "SELECT committed_cursor, state_cursor, state_hash, epoch"
					   " FROM spool.processor_checkpoints WHERE processor = $1", &desc);
	if (tup == NULL)
	{
		spool_end_txn();
		ereport(LOG, (errcode(ERRCODE_ADMIN_SHUTDOWN),
					  errmsg("processor \"%s\" no longer exists; replica exiting", proc_name)));
		proc_exit(0);
	}
	committed = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	at = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	hash = DatumGetInt64(SPI_getbinval(tup, desc, 3, &hash_null));
	epoch = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
	spool_end_txn();
	if (epoch != my_epoch)
	{
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("processor \"%s\" replica %d reloads its checkpoint: the processor was rewound on the primary (epoch " INT64_FORMAT ")",
						proc_name, my_replica + 1, epoch)));
		load_checkpoint(false);
		return false;
	}
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	if (ps->epoch == epoch)
		publish_progress(committed, at, hash, hash_null);
	LWLockRelease(spool_processor_shared->lock);
	return true;
}

/*
 * Move the processor's published committed and snapshot cursors forward
 * to those read from the checkpoint row (never back).  Under the
 * processor lock, in the epoch they were read in.
 */
static void
publish_progress(int64 committed, int64 at, int64 hash, bool hash_null)
{
	if (committed > ps->committed_cursor)
		ps->committed_cursor = committed;
	if (!hash_null && at > ps->snapshot_cursor)
	{
		ps->snapshot_cursor = at;
		ps->snapshot_hash = (uint64) hash;
	}
}

/*
 * Recovery has ended under a replica that followed on the hot standby:
 * from now on it is a shadow like any other.  Its first takeover reports
 * what it did since.
 */
static void
note_promotion(void)
{
	followed_in_recovery = false;
	mark_at = GetCurrentTimestamp();
	mark_what = "the promotion";
	saw_promotion = true;
	applied_since_mark = 0;
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("processor \"%s\" replica %d saw the end of recovery at cursor " INT64_FORMAT,
					proc_name, my_replica + 1, cursor)));
}

/*
 * One step of the replica in its role; false when there was nothing to do
 * (the loop then waits).
 */
static bool
replica_step(void)
{
	GateView	g;

	read_gate(&g);
	if (g.options_wanted != 0 && g.options_wanted != options_loaded &&
		g.options_wanted != options_acted)
	{
		options_acted = g.options_wanted;
		reload_options();
	}
	if (rs->role == ROLE_ACTIVE && g.epoch != my_epoch)
	{
		become_standby("the processor was rewound");
		return true;
	}
	if (rs->role != ROLE_ACTIVE)
		return standby_pass();
	if (GetCurrentTimestamp() >= next_renew && !renew_lease())
	{
		become_standby("its lease was lost");
		return true;
	}
	return active_step();
}

void
spool_processor_main(Datum main_arg)
{
	replica_attach();
	mark_at = GetCurrentTimestamp();
	PG_TRY();
	{
		load_processor();
		load_checkpoint(true);
	}
	PG_CATCH();
	{
		record_error();
		PG_RE_THROW();
	}
	PG_END_TRY();

	for (;;)
	{
		spool_worker_pass(loop_cxt, true);
		PG_TRY();
		{
			if (!replica_step())
				wait_for_work();
		}
		PG_CATCH();
		{
			record_error();
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
}

/* Note the error for processor_status; the process then exits. */
static void
record_error(void)
{
	MemoryContext old = MemoryContextSwitchTo(ErrorContext);
	ErrorData  *edata = CopyErrorData();

	MemoryContextSwitchTo(old);
	/* The error may have come while we held it; the abort would release it. */
	LWLockReleaseAll();
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	rs->errors++;
	/* A query cancelled by a recovery conflict is not the handler's fault. */
	rs->exit_error = !(RecoveryInProgress() &&
					   edata->sqlerrcode == ERRCODE_T_R_SERIALIZATION_FAILURE);
	rs->last_error_at = GetCurrentTimestamp();
	snprintf(rs->last_error, SPOOL_ERRMSG_MAX, "at cursor " INT64_FORMAT ": %s",
			 cursor, edata->message ? edata->message : "unknown error");
	LWLockRelease(spool_processor_shared->lock);
	FreeErrorData(edata);
}


/*
 * The handler still runs as an existing role, and the processor's owner
 * may still run code as it.
 */
static void
check_run_as(void)
{
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(run_as)))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("the role processor \"%s\" runs as (oid %u) no longer exists", proc_name, run_as),
				 errhint("Drop and create the processor again with an existing role.")));
	if (!spool_role_is_member(proc_owner, run_as))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the owner of processor \"%s\" is no longer a member of the role its handler runs as",
						proc_name),
				 errhint("Grant the role back to the owner, or drop and create the processor again.")));
}

/*
 * In a new transaction (spool_begin_txn), the one row sql returns for $1 =
 * this processor's name, or NULL if there is none.
 */
static HeapTuple
read_own_row(const char *activity, const char *sql, TupleDesc *desc)
{
	Datum		v[1];

	spool_begin_txn(activity);
	v[0] = CStringGetTextDatum(proc_name);
	if (SPI_execute_with_args(sql, 1, (Oid[]) {TEXTOID}, v, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not run \"%s\"", sql);
	if (SPI_processed != 1)
		return NULL;
	*desc = SPI_tuptable->tupdesc;
	return SPI_tuptable->vals[0];
}

/* Read the processor's definition; exit if it is gone or disabled. */
static void
load_processor(void)
{
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;
	Datum		d;
	MemoryContext top;

	tup = read_own_row("loading processor",
					   "SELECT handler::oid, run_as::oid, enabled,"
					   " (SELECT array_agg(s) FROM jsonb_array_elements_text("
					   "    CASE jsonb_typeof(options->'sources') WHEN 'array'"
					   "    THEN options->'sources' END) s),"
					   " (options->>'batch_size')::int, (options->>'lease_ttl')::bigint,"
					   " (options->>'checkpoint_every')::bigint, options->'handler', owner::oid,"
					   " options::text"
					   " FROM spool.processors WHERE name = $1", &desc);
	if (tup == NULL)
		ereport(LOG, (errcode(ERRCODE_ADMIN_SHUTDOWN),
					  errmsg("processor \"%s\" no longer exists; replica exiting", proc_name)));
	if (tup == NULL || !DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull)))
	{
		spool_end_txn();
		proc_exit(0);
	}
	top = MemoryContextSwitchTo(TopMemoryContext);
	handler_oid = DatumGetObjectId(SPI_getbinval(tup, desc, 1, &isnull));
	run_as = DatumGetObjectId(SPI_getbinval(tup, desc, 2, &isnull));
	d = SPI_getbinval(tup, desc, 4, &isnull);
	sources = isnull ? NULL : DatumGetArrayTypePCopy(d);
	batch_size = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
	lease_ttl_ms = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
	checkpoint_every = DatumGetInt64(SPI_getbinval(tup, desc, 7, &isnull));
	d = SPI_getbinval(tup, desc, 8, &isnull);
	handler_settings = isnull ? NULL : DatumGetJsonbPCopy(d);
	spool_handler_context_set(my_replica + 1, handler_settings);
	proc_owner = DatumGetObjectId(SPI_getbinval(tup, desc, 9, &isnull));
	options_loaded = spool_processor_options_hash(SPI_getvalue(tup, desc, 10));
	check_run_as();
	native = spool_native_handler(handler_oid);
	if (native)
		native_config = native->configure(handler_settings);
	MemoryContextSwitchTo(top);
	spool_end_txn();
}

/*
 * alter_processor changed the stored options: take the ones that may change
 * (the others cannot: see admin.c).  Exit if the processor is gone.
 */
static void
reload_options(void)
{
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;
	TimestampTz renew_by;

	tup = read_own_row("reloading options",
					   "SELECT (options->>'batch_size')::int, (options->>'lease_ttl')::bigint,"
					   " (options->>'checkpoint_every')::bigint, options::text"
					   " FROM spool.processors WHERE name = $1", &desc);
	if (tup == NULL)
	{
		spool_end_txn();
		proc_exit(0);
	}
	batch_size = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
	lease_ttl_ms = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	checkpoint_every = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	options_loaded = spool_processor_options_hash(SPI_getvalue(tup, desc, 4));
	spool_end_txn();
	/* A shorter lease must be renewed sooner. */
	renew_by = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), lease_ttl_ms / 3);
	if (rs->role == ROLE_ACTIVE && next_renew > renew_by)
		next_renew = renew_by;
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("processor \"%s\" replica %d now runs with batch_size %d, lease_ttl " INT64_FORMAT " ms, checkpoint_every " INT64_FORMAT,
					proc_name, my_replica + 1, batch_size, lease_ttl_ms, checkpoint_every)));
}

/*
 * Load the latest snapshot and its cursor (the state is replayed from
 * there), in the checkpoint's epoch.  Another epoch than shared memory shows
 * (a rewind) replaces what is published there; with publish, also make the
 * committed cursor of the same epoch known to the others.
 */
static void
load_checkpoint(bool publish)
{
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;
	Datum		d;
	Jsonb	   *snap = NULL;
	int64		committed;
	int64		at;
	int64		hash;
	bool		hash_null;
	int64		epoch;
	bool		newer = false;

	tup = read_own_row("loading checkpoint",
					   "SELECT committed_cursor, state, state_cursor, state_hash, epoch"
					   " FROM spool.processor_checkpoints WHERE processor = $1", &desc);
	if (tup == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("the checkpoint of processor \"%s\" is missing", proc_name)));
	committed = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	d = SPI_getbinval(tup, desc, 2, &isnull);
	if (!isnull)
	{
		MemoryContext old = MemoryContextSwitchTo(state_cxt);

		snap = DatumGetJsonbPCopy(d);
		MemoryContextSwitchTo(old);
	}
	at = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	hash = DatumGetInt64(SPI_getbinval(tup, desc, 4, &hash_null));
	epoch = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
	spool_end_txn();

	state_reset(snap, at);
	my_epoch = epoch;
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	if (epoch != ps->epoch)
	{
		/*
		 * Epochs only grow, so a newer one is a rewind.  An older one means
		 * the processor was dropped and created again under the same name:
		 * the table is the truth either way.
		 */
		newer = true;
		ps->epoch = epoch;
		ps->committed_cursor = committed;
		ps->snapshot_cursor = hash_null ? 0 : at;
		ps->snapshot_hash = hash_null ? 0 : (uint64) hash;
	}
	else if (publish && epoch == ps->epoch)
		publish_progress(committed, at, hash, hash_null);
	LWLockRelease(spool_processor_shared->lock);
	if (newer)
		ConditionVariableBroadcast(&ps->cv);
}

/* Replace the state with snapshot (NULL: the initial state) as of cursor at. */
static void
state_reset(Jsonb *snapshot, int64 at)
{
	if (native)
	{
		if (native_state)
			native->destroy(native_state);
		native_state = native->create(native_config, snapshot, TopMemoryContext);
	}
	else
	{
		MemoryContext old = MemoryContextSwitchTo(state_cxt);

		state = snapshot ? snapshot
			: DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
		MemoryContextSwitchTo(old);
	}
	cursor = at;
	rs->cursor = at;
	since_snapshot = 0;
	last_snapshot_at = GetCurrentTimestamp();
	last_checked_snapshot = -1;
}

/* ---------------------------------------------------------------------
 * Reading and applying batches
 * ---------------------------------------------------------------------
 */

/*
 * The last committed spool cursor (all entries up to it are visible), read
 * in the transaction's snapshot, the one read_batch reads the entries in: a
 * fresh snapshot here could see a promotion that the entries' read does not,
 * and the empty batch would move the committed cursor past entries that
 * were never handled.
 */
static int64
spool_end(void)
{
	bool		isnull;

	spool_plan(&plan_spool_end, "SELECT next_cursor - 1 FROM spool.spool_state WHERE id = 1",
			   0, NULL);
	if (spool_exec(plan_spool_end, NULL, NULL, true, SPI_OK_SELECT) != 1)
		elog(ERROR, "spool.spool_state is empty");
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * A row read with "e.*" (its columns deformed into cols/colnulls, desc): what
 * it weighs once its fields are detoasted and decompressed, which costs
 * nothing to find out (large fields are still toast pointers).
 */
static Size
row_raw_size(HeapTuple tup, TupleDesc desc, const Datum *cols, const bool *colnulls)
{
	Size		size = tup->t_len;
	int			i;

	for (i = 0; i < desc->natts; i++)
		if (!colnulls[i] && TupleDescAttr(desc, i)->attlen == -1)
			size += toast_raw_datum_size(cols[i]);
	return size;
}

/*
 * The spool.entries composite (rowdesc) of those columns, its fields
 * detoasted: what the handler gets in its array.  map[i] is the column of
 * rowdesc's attribute i (0: dropped); values and isnull have room for
 * rowdesc's attributes.
 */
static Datum
entry_datum(TupleDesc rowdesc, const int *map, const Datum *cols, const bool *colnulls,
			Datum *values, bool *isnull)
{
	int			i;

	for (i = 0; i < rowdesc->natts; i++)
	{
		isnull[i] = map[i] == 0 || colnulls[map[i] - 1];
		values[i] = isnull[i] ? (Datum) 0 : cols[map[i] - 1];
	}
	return HeapTupleGetDatum(heap_form_tuple(rowdesc, values, isnull));
}

/* Set up reading into b; returns the kept plan that reads the entries. */
static SPIPlanPtr
reader_open(BatchReader *r, Batch *b)
{
	Oid			t[4] = {INT8OID, INT8OID, TEXTARRAYOID, INT4OID};

	memset(r, 0, sizeof(BatchReader));
	memset(b, 0, sizeof(Batch));
	r->b = b;
	if (native)
	{
		b->native_entries = palloc(sizeof(SpoolEntry) * batch_size);
		return spool_plan(&plan_read_rows,
						  "SELECT cursor, value, kafka_ts, source, kafka_partition, kafka_offset"
						  " FROM spool.entries WHERE cursor > $1 AND cursor <= $2"
						  " AND ($3::text[] IS NULL OR source = ANY ($3))"
						  " ORDER BY cursor LIMIT $4", 4, t);
	}
	r->elems = palloc(sizeof(Datum) * batch_size);
	r->rowtype = get_rel_type_id(get_relname_relid("entries", get_namespace_oid("spool", false)));
	r->rowdesc = lookup_rowtype_tupdesc(r->rowtype, -1);
	r->fields = palloc(sizeof(Datum) * r->rowdesc->natts);
	r->fnulls = palloc(sizeof(bool) * r->rowdesc->natts);
	return spool_plan(&plan_read_entries,
					  "SELECT e.* FROM spool.entries e WHERE e.cursor > $1 AND e.cursor <= $2"
					  " AND ($3::text[] IS NULL OR e.source = ANY ($3))"
					  " ORDER BY e.cursor LIMIT $4", 4, t);
}

/* Generic handlers, at the first chunk: where each attribute of the row type is. */
static void
reader_map(BatchReader *r, TupleDesc desc)
{
	int			a;

	r->map = palloc0(sizeof(int) * r->rowdesc->natts);
	for (a = 0; a < r->rowdesc->natts; a++)
		if (!TupleDescAttr(r->rowdesc, a)->attisdropped)
			r->map[a] = SPI_fnumber(desc, NameStr(TupleDescAttr(r->rowdesc, a)->attname));
	r->cols = palloc(sizeof(Datum) * desc->natts);
	r->colnulls = palloc(sizeof(bool) * desc->natts);
}

/*
 * Take a row into the batch, unless it would bring the batch over
 * BATCH_MAX_BYTES (a first row is always taken): then false, and the batch
 * is cut before it.  The row is weighed before its fields are detoasted.
 */
static bool
reader_add(BatchReader *r, HeapTuple tup, TupleDesc desc)
{
	bool		isnull;
	bool		novalue = true;
	Datum		value = (Datum) 0;
	Size		size;

	if (native)
	{
		value = SPI_getbinval(tup, desc, 2, &novalue);
		size = novalue ? 0 : toast_raw_datum_size(value);
	}
	else
	{
		heap_deform_tuple(tup, desc, r->cols, r->colnulls);
		size = row_raw_size(tup, desc, r->cols, r->colnulls);
	}
	if (r->n > 0 && r->bytes + size > BATCH_MAX_BYTES)
		return false;
	r->bytes += size;
	r->last = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	if (native)
	{
		SpoolEntry *e = &r->b->native_entries[r->n];
		Datum		ts = SPI_getbinval(tup, desc, 3, &isnull);

		e->cursor = r->last;
		e->value = novalue ? NULL : DatumGetJsonbP(value);
		e->has_ts = !isnull;
		e->kafka_ts = isnull ? 0 : DatumGetTimestampTz(ts);
		e->source = SPI_getvalue(tup, desc, 4);
		e->kafka_partition = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		e->kafka_offset = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
	}
	else
		r->elems[r->n] = entry_datum(r->rowdesc, r->map, r->cols, r->colnulls,
									 r->fields, r->fnulls);
	r->n++;
	return true;
}

/*
 * The entries of our sources in (after, upto], at most batch_size of them
 * and at most BATCH_MAX_BYTES of them (but at least one): the handler's
 * array must stay far below PostgreSQL's 1 GB limit, and the worker's memory
 * bounded, whatever the entries weigh.  Rows come through a cursor in chunks
 * and are weighed before their fields are detoasted.  The batch ends at upto
 * unless it was cut.  The caller is connected to SPI and upto is committed,
 * so every entry up to it is visible.
 */
static void
read_batch(int64 after, int64 upto, Batch *b)
{
	BatchReader r;
	Datum		v[4];
	char		nulls[4] = {' ', ' ', sources ? ' ' : 'n', ' '};
	Portal		portal;
	bool		cut = false;
	bool		drained = false;

	v[0] = Int64GetDatum(after);
	v[1] = Int64GetDatum(upto);
	v[2] = PointerGetDatum(sources);
	v[3] = Int32GetDatum(batch_size);
	portal = SPI_cursor_open(NULL, reader_open(&r, b), v, nulls, true);
	while (r.n < batch_size && !cut && !drained)
	{
		int			want = Min(batch_size - r.n, READ_CHUNK);
		uint64		i;

		SPI_cursor_fetch(portal, true, want);
		if (SPI_processed == 0)
			break;
		drained = SPI_processed < (uint64) want;	/* no need to ask again */
		if (!native && r.map == NULL)
			reader_map(&r, SPI_tuptable->tupdesc);
		for (i = 0; i < SPI_processed && !cut; i++)
			cut = !reader_add(&r, SPI_tuptable->vals[i], SPI_tuptable->tupdesc);
	}
	SPI_cursor_close(portal);
	if (r.rowdesc)
		ReleaseTupleDesc(r.rowdesc);

	b->n = r.n;
	b->end = (r.n == batch_size || cut) ? r.last : upto;
	if (!native && r.n > 0)
		b->entries = PointerGetDatum(construct_array(r.elems, r.n, r.rowtype, -1, false,
													 TYPALIGN_DOUBLE));
}

/* window_alert, natively on the kept state; its outputs are built only if wanted. */
static void
apply_native(Batch *b, StepResult *res, bool want_outputs)
{
	SpoolOutputs out = {0};
	int			i;

	for (i = 0; i < b->n; i++)
		native->apply(native_state, &b->native_entries[i], &out);
	res->noutputs = out.n;
	if (want_outputs && out.n > 0)
	{
		const char **targets = palloc(sizeof(char *) * out.n);

		for (i = 0; i < out.n; i++)
			targets[i] = native->target(native_config);
		res->outputs = spool_make_outputs(out.n, targets, out.keys, out.payloads);
	}
}

/*
 * A SQL handler, in the box (usercode.c): as the processor's role,
 * security-restricted, read-only, with its settings rolled back afterwards.
 * A handler that returns NULL, or a NULL state, breaks its contract: 38000.
 */
static void
apply_handler(Batch *b, StepResult *res)
{
	FmgrInfo	flinfo;
	LOCAL_FCINFO(fc, 2);
	Datum		result;
	HeapTupleHeader th;
	bool		isnull;
	Datum		d;
	SpoolBox	box = {0};

	fmgr_info(handler_oid, &flinfo);
	InitFunctionCallInfoData(*fc, &flinfo, 2, InvalidOid, NULL, NULL);
	fc->args[0].value = JsonbPGetDatum(state);
	fc->args[0].isnull = false;
	fc->args[1].value = b->entries;
	fc->args[1].isnull = false;
	spool_box_open(&box, run_as, true);
	PG_TRY();
	{
		result = FunctionCallInvoke(fc);
	}
	PG_CATCH();
	{
		spool_box_abandon(&box);
		PG_RE_THROW();
	}
	PG_END_TRY();
	spool_box_close(&box);
	if (fc->isnull)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("handler %s returned NULL", format_procedure(handler_oid)),
				 errhint("Return a spool.step: (state, outputs).")));
	th = DatumGetHeapTupleHeader(result);
	d = GetAttributeByNum(th, 1, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("handler %s returned a NULL state", format_procedure(handler_oid)),
				 errhint("Return the state unchanged, or '{}', never NULL.")));
	res->state = DatumGetJsonbP(d);
	d = GetAttributeByNum(th, 2, &isnull);
	if (!isnull)
	{
		ArrayType  *arr = DatumGetArrayTypeP(d);

		res->noutputs = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
		res->outputs = PointerGetDatum(arr);
	}
}

/* Run the handler over a non-empty batch (outputs are built only if wanted). */
static void
apply_batch(Batch *b, StepResult *res, bool want_outputs)
{
	memset(res, 0, sizeof(StepResult));
	if (native)
		apply_native(b, res, want_outputs);
	else
		apply_handler(b, res);
}

/*
 * Copy a batch's new state out of SPI memory, before the transaction ends
 * (NULL for window_alert, whose state is kept natively).
 */
static Jsonb *
state_stage(StepResult *res)
{
	MemoryContext old;
	Jsonb	   *copy;

	if (native || res->state == NULL)
		return NULL;
	old = MemoryContextSwitchTo(state_cxt);
	copy = DatumGetJsonbPCopy(JsonbPGetDatum(res->state));
	MemoryContextSwitchTo(old);
	return copy;
}

/* After the batch's transaction committed: the staged state becomes ours. */
static void
state_adopt(Jsonb *staged, int64 end)
{
	if (staged)
	{
		if (state)
			pfree(state);
		state = staged;
	}
	cursor = end;
	rs->cursor = end;
}

/*
 * Hash of the state (equal states, equal hashes); with as_jsonb, also the
 * state as jsonb for a snapshot.  window_alert hashes its native state.
 */
static uint64
state_hash(Jsonb **as_jsonb)
{
	if (native)
	{
		if (as_jsonb)
			*as_jsonb = native->snapshot(native_state, NULL);
		return native->hash(native_state);
	}
	if (as_jsonb)
		*as_jsonb = state;
	return DatumGetUInt64(DirectFunctionCall2(jsonb_hash_extended, JsonbPGetDatum(state),
											  Int64GetDatum(0)));
}

/* ---------------------------------------------------------------------
 * Active
 * ---------------------------------------------------------------------
 */

/*
 * Read the active's next batch (the caller's transaction).  Idle (nothing
 * new), it is an empty batch only when a changed state is due for a
 * snapshot, so replicas can compare and restart from it; otherwise false.
 */
static bool
active_read(Batch *b, bool *snapshot)
{
	int64		end = spool_end();

	*snapshot = false;
	if (end > cursor)
	{
		read_batch(cursor, end, b);
		return true;
	}
	if (since_snapshot == 0 ||
		!TimestampDifferenceExceeds(last_snapshot_at, GetCurrentTimestamp(), IDLE_SNAPSHOT_MS))
		return false;
	memset(b, 0, sizeof(Batch));
	b->end = cursor;
	*snapshot = true;
	return true;
}

/* The hash of the state a batch produced, and that state as jsonb (*snap). */
static uint64
snapshot_of(StepResult *res, Jsonb **snap)
{
	Jsonb	   *keep = state;
	uint64		hash;

	if (native || res->state == NULL)
		return state_hash(snap);
	state = res->state;
	hash = state_hash(snap);
	state = keep;
	return hash;
}

/* With a snapshot at end, the spool keeps only what a replay from it needs. */
static void
advance_consumer(int64 end)
{
	Datum		v[2];

	v[0] = CStringGetTextDatum(psprintf("processor:%s", proc_name));
	v[1] = Int64GetDatum(end);
	spool_plan(&plan_consumer,
			   "UPDATE spool.consumers SET committed_cursor = greatest(committed_cursor, $2),"
			   " updated_at = now(),"
			   " moved_at = CASE WHEN $2 > committed_cursor THEN now() ELSE moved_at END"
			   " WHERE name = $1",
			   2, (Oid[]) {TEXTOID, INT8OID});
	spool_exec(plan_consumer, v, NULL, false, SPI_OK_UPDATE);
}

/*
 * The gate, in the batch's transaction: fence the lease (a newer grant
 * waits for this transaction, then rejects its token), then compare-and-set
 * the checkpoint row on (token, committed cursor), with the snapshot if
 * there is one.  From the fence to commit is the only window in which a
 * stall delays a takeover (the grant terminates us; we die when resumed).
 * False when another replica holds the gate.
 */
static bool
gate_commit(Batch *b, StepResult *res, Jsonb *snap, uint64 hash)
{
	Datum		v[8];
	char		nulls[8];

	if (!spool_fence_lease(lease_resource, token, SPOOL_LEASE_INTERNAL, false))
		return false;
	spool_test_pause();
	spool_plan(&plan_commit,
			   "UPDATE spool.processor_checkpoints SET committed_cursor = $3,"
			   " outputs = outputs + $7, batches = batches + 1, updated_at = now(),"
			   " state = CASE WHEN $5 IS NULL THEN state ELSE $5 END,"
			   " state_cursor = CASE WHEN $5 IS NULL THEN state_cursor ELSE $3 END,"
			   " state_hash = CASE WHEN $5 IS NULL THEN state_hash ELSE $6 END"
			   " WHERE processor = $1 AND token = $2 AND committed_cursor = $4 AND epoch = $8",
			   8, (Oid[]) {TEXTOID, INT8OID, INT8OID, INT8OID, JSONBOID, INT8OID, INT4OID, INT8OID});
	memset(nulls, ' ', sizeof(nulls));
	v[0] = CStringGetTextDatum(proc_name);
	v[1] = Int64GetDatum(token);
	v[2] = Int64GetDatum(b->end);
	v[3] = Int64GetDatum(cursor);
	v[4] = snap ? JsonbPGetDatum(snap) : (Datum) 0;
	nulls[4] = snap ? ' ' : 'n';
	v[5] = Int64GetDatum((int64) hash);
	v[6] = Int32GetDatum(res->noutputs);
	v[7] = Int64GetDatum(my_epoch);
	return spool_exec(plan_commit, v, nulls, false, SPI_OK_UPDATE) == 1;
}

/* After the batch committed: adopt its state and publish the commit. */
static void
active_committed(Batch *b, Jsonb *staged, bool snapshot, uint64 hash, int noutputs)
{
	state_adopt(staged, b->end);
	since_snapshot = snapshot ? 0 : since_snapshot + b->n;
	if (snapshot)
		last_snapshot_at = GetCurrentTimestamp();

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	/* A rewind since our commit owns what is published now. */
	if (ps->epoch != my_epoch)
		snapshot = false;
	else
		ps->committed_cursor = b->end;
	if (snapshot)
	{
		ps->snapshot_cursor = b->end;
		ps->snapshot_hash = hash;
		rs->state_hash = hash;
		rs->state_hash_cursor = b->end;
	}
	rs->entries += b->n;
	rs->batches++;
	rs->outputs += noutputs;
	LWLockRelease(spool_processor_shared->lock);
	ConditionVariableBroadcast(&ps->cv);
}

/*
 * One batch as the active replica: read, apply, and commit the outputs with
 * the checkpoint under the gate.  Returns false when there was nothing to do.
 */
static bool
active_step(void)
{
	Batch		b;
	StepResult	res;
	bool		snapshot;
	Jsonb	   *snap = NULL;
	uint64		hash = 0;
	Jsonb	   *staged;
	int			noutputs;
	TimestampTz t0 = GetCurrentTimestamp();
	TimestampTz t_read;
	TimestampTz t_applied;
	TimestampTz t_snap;

	spool_begin_txn("processing");
	if (!active_read(&b, &snapshot))
	{
		spool_end_txn();
		return false;
	}
	t_read = GetCurrentTimestamp();
	memset(&res, 0, sizeof(res));
	if (b.n > 0)
		apply_batch(&b, &res, true);
	t_applied = GetCurrentTimestamp();
	if (since_snapshot + b.n >= checkpoint_every)
		snapshot = true;
	if (snapshot)
		hash = snapshot_of(&res, &snap);
	t_snap = GetCurrentTimestamp();
	/* The outputs first: the fenced part in gate_commit is kept as short as possible. */
	if (res.noutputs > 0)
		spool_outbox_insert_outputs(DatumGetArrayTypeP(res.outputs), proc_name, b.end, token,
									proc_owner);
	if (snap)
		advance_consumer(b.end);
	if (!gate_commit(&b, &res, snap, hash))
	{
		spool_abort_txn();
		if (native && b.n > 0)
			load_checkpoint(false); /* the native state already moved on */
		become_standby("another replica holds the output gate");
		return true;
	}
	staged = state_stage(&res);
	noutputs = res.noutputs;
	spool_end_txn();
	active_committed(&b, staged, snapshot, hash, noutputs);
	note_batch(b.n, t0, (double) (t_applied - t_read) / 1000.0,
			   (double) (GetCurrentTimestamp() - t_snap) / 1000.0,
			   snap ? (double) (t_snap - t_applied) / 1000.0 : -1);
	return true;
}

/*
 * A committed batch's numbers: entries, the whole batch, the handler, the
 * commit (< 0: none, as on a standby) and the snapshot (< 0: none).
 */
static void
note_batch(int64 n, TimestampTz t0, double handler_ms, double commit_ms, double snapshot_ms)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	spool_hist_add(&rs->batch_entries, (double) n, now);
	spool_hist_add(&rs->batch_ms, (double) (now - t0) / 1000.0, now);
	spool_hist_add(&rs->handler_ms, handler_ms, now);
	if (commit_ms >= 0)
		spool_hist_add(&rs->commit_ms, commit_ms, now);
	if (snapshot_ms >= 0)
		spool_hist_add(&rs->snapshot_ms, snapshot_ms, now);
	LWLockRelease(spool_processor_shared->lock);
}

/* ---------------------------------------------------------------------
 * Standby
 * ---------------------------------------------------------------------
 */

/* Apply one batch in shadow, up to target (a committed cursor); no outputs. */
static void
standby_step(int64 target)
{
	Batch		b;
	StepResult	res;
	Jsonb	   *staged;
	TimestampTz t0 = GetCurrentTimestamp();
	TimestampTz t_read;

	spool_begin_txn("following");
	read_batch(cursor, target, &b);
	t_read = GetCurrentTimestamp();
	memset(&res, 0, sizeof(res));
	if (b.n > 0)
		apply_batch(&b, &res, false);
	staged = state_stage(&res);
	spool_end_txn();
	state_adopt(staged, b.end);
	since_snapshot += b.n;		/* due for a snapshot once this replica is active */
	applied_since_mark += b.n;
	rs->entries += b.n;
	rs->batches++;
	note_batch(b.n, t0, (double) (GetCurrentTimestamp() - t_read) / 1000.0, -1, -1);
}

/*
 * At the active's snapshot cursor, compare our state's hash with the
 * snapshot's.  A mismatch means the handler is not deterministic: it is
 * reported, and the standby adopts the active's snapshot so that a takeover
 * does not emit outputs from a diverged state.
 */
static void
check_snapshot_hash(void)
{
	int64		snap_cursor;
	uint64		snap_hash;
	uint64		mine;

	LWLockAcquire(spool_processor_shared->lock, LW_SHARED);
	snap_cursor = ps->snapshot_cursor;
	snap_hash = ps->snapshot_hash;
	LWLockRelease(spool_processor_shared->lock);
	if (snap_cursor != cursor || snap_cursor == last_checked_snapshot || snap_cursor == 0)
		return;
	last_checked_snapshot = snap_cursor;
	spool_begin_txn("checking state hash");
	mine = state_hash(NULL);
	spool_end_txn();

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	rs->state_hash = mine;
	rs->state_hash_cursor = cursor;
	rs->hash_checks++;
	if (mine == snap_hash)
		since_snapshot = 0;
	else
	{
		rs->hash_mismatches++;
		rs->last_error_at = GetCurrentTimestamp();
		snprintf(rs->last_error, SPOOL_ERRMSG_MAX,
				 "state diverged from the active's at cursor " INT64_FORMAT
				 " (hash " INT64_FORMAT ", active's " INT64_FORMAT "): the handler is not deterministic",
				 cursor, (int64) mine, (int64) snap_hash);
	}
	LWLockRelease(spool_processor_shared->lock);
	if (mine != snap_hash)
	{
		ereport(WARNING,
				(errcode(ERRCODE_SPOOL_NONDETERMINISTIC),
				 errmsg("processor \"%s\" replica %d diverged from the active replica at cursor " INT64_FORMAT,
						proc_name, my_replica + 1, cursor),
				 errdetail("State hash " INT64_FORMAT ", the active's snapshot " INT64_FORMAT ".",
						   (int64) mine, (int64) snap_hash),
				 errhint("Handlers must be deterministic: see docs/processors.md.  This replica now continues from the active's snapshot.")));
		load_checkpoint(false);
	}
}

/*
 * Session lock on the processor (internal_lock.c): held by the active
 * replica, so that after a clean exit exactly one standby goes for the lease
 * at once.  Safety does not depend on it (the lease token does).
 */
static bool
advisory_lock(bool take)
{
	if (take)
		return spool_internal_lock(SPOOL_LOCK_PROCESSOR, proc_name, 0);
	spool_internal_unlock(SPOOL_LOCK_PROCESSOR, proc_name, 0);
	return true;
}

/*
 * In one transaction: take the lease (after a clean exit only the standby
 * holding the advisory lock goes for it) and write its token into the
 * checkpoint row, from where on the old active's commits fail.  Returns
 * the committed cursor (and the checkpoint's epoch), or -1 when the gate
 * was not taken.
 */
static int64
claim_gate(TimestampTz now, TimestampTz expires, SpoolLease *lease, int64 *epoch)
{
	bool		got_lock = false;
	bool		isnull;
	int64		committed = -1;
	int			save_timeout = LockTimeout;

	spool_begin_txn("taking over");
	if (!have_advisory)
		have_advisory = got_lock = advisory_lock(true);
	if (!have_advisory && now < expires)
	{
		spool_end_txn();
		return -1;
	}
	*lease = spool_lease_acquire_internal(lease_resource, lease_owner,
										  lease_ttl_ms * 1000, spool_owner_is_gone,
										  SPOOL_LEASE_INTERNAL);
	if (lease->held)
	{
		Datum		v[2] = {CStringGetTextDatum(proc_name), Int64GetDatum(lease->token)};

		LockTimeout = spool_lease_wait_timeout_ms;
		PG_TRY();
		{
			if (SPI_execute_with_args("UPDATE spool.processor_checkpoints SET token = $2"
									  " WHERE processor = $1 AND token <= $2"
									  " RETURNING committed_cursor, epoch",
									  2, (Oid[]) {TEXTOID, INT8OID}, v, NULL, false, 0) == SPI_OK_UPDATE_RETURNING &&
				SPI_processed == 1)
			{
				committed = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														SPI_tuptable->tupdesc, 1, &isnull));
				*epoch = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 2, &isnull));
			}
		}
		PG_FINALLY();
		{
			LockTimeout = save_timeout;
		}
		PG_END_TRY();
	}
	spool_end_txn();
	if (committed < 0 && got_lock)
	{
		advisory_lock(false);
		have_advisory = false;
	}
	return committed;
}

/*
 * As a caught-up standby: take the gate if it is free (no active, or its
 * lease expired).  Returns true when we became the active replica.
 */
static bool
try_takeover(void)
{
	GateView	g;
	TimestampTz now = GetCurrentTimestamp();
	SpoolLease	lease;
	int64		committed;
	int64		epoch = 0;

	read_gate(&g);
	if (g.active_pid != 0 && now < g.lease_expires_at)
		return false;
	committed = claim_gate(now, g.lease_expires_at, &lease, &epoch);
	if (committed < 0)
		return false;
	/* Rewound since we loaded: our state is not the checkpoint's. */
	if (epoch != my_epoch)
		load_checkpoint(true);

	token = lease.token;
	next_renew = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), lease_ttl_ms / 3);
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	ps->active_pid = MyProcPid;
	ps->lease_expires_at = lease.expires_at;
	if (committed > ps->committed_cursor)
		ps->committed_cursor = committed;
	rs->role = ROLE_ACTIVE;
	rs->token = token;
	if (lease.took_over)
	{
		rs->takeovers++;
		rs->last_takeover_at = GetCurrentTimestamp();
		/*
		 * From the old active's exit, or from its lease's expiry after a
		 * stall, or from the promotion this replica saw on a hot standby.
		 */
		takeover_from = (g.active_pid == 0 && g.active_gone_at != 0) ?
			g.active_gone_at : g.lease_expires_at;
		if (takeover_from == 0 && saw_promotion && mark_at != 0)
			takeover_from = mark_at;
	}
	LWLockRelease(spool_processor_shared->lock);
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("processor \"%s\" replica %d is active with token " INT64_FORMAT " at cursor " INT64_FORMAT,
					proc_name, my_replica + 1, token, committed)));
	catch_up(committed, lease.took_over);
	return true;
}

/*
 * Outputs up to the committed cursor exist: catch up to it without
 * emitting, and note the takeover latency (from the gate becoming free to
 * ready to commit).
 */
static void
catch_up(int64 committed, bool took_over)
{
	if (committed < cursor)
		load_checkpoint(false);
	while (cursor < committed)
	{
		CHECK_FOR_INTERRUPTS();
		standby_step(committed);
	}
	if (took_over && takeover_from != 0)
	{
		LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
		rs->last_takeover_ms = (double) (GetCurrentTimestamp() - takeover_from) / 1000.0;
		LWLockRelease(spool_processor_shared->lock);
	}
	if (mark_at != 0)
	{
		/* The first time: what it took from its start, or from the promotion. */
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("processor \"%s\" replica %d is ready at cursor " INT64_FORMAT ": it applied " INT64_FORMAT " entries in %.1f ms since %s",
						proc_name, my_replica + 1, cursor, applied_since_mark,
						(double) (GetCurrentTimestamp() - mark_at) / 1000.0, mark_what)));
		mark_at = 0;
	}
}

static void
become_standby(const char *why)
{
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("processor \"%s\" replica %d is now a standby: %s",
					proc_name, my_replica + 1, why)));
	leave_gate(false);
	token = 0;
}

/* Renew the lease (every third of its TTL); false when it was lost. */
static bool
renew_lease(void)
{
	TimestampTz expires;
	bool		ok;

	spool_begin_txn("renewing lease");
	ok = spool_lease_extend(lease_resource, lease_owner, token, lease_ttl_ms * 1000, &expires,
							SPOOL_LEASE_INTERNAL);
	if (ok && !have_advisory)
		have_advisory = advisory_lock(true);
	spool_end_txn();
	if (!ok)
		return false;
	next_renew = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), lease_ttl_ms / 3);
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	ps->lease_expires_at = expires;
	LWLockRelease(spool_processor_shared->lock);
	return true;
}

/*
 * Sleep until there may be work: the active waits for the promoter's next
 * cursor, a standby for the active's next commit (or exit).  Both wake in
 * time to renew the lease or to notice that it expired.
 */
static void
wait_for_work(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		timeout;

	if (rs->role == ROLE_ACTIVE)
	{
		timeout = Min(TimestampDifferenceMilliseconds(now, next_renew), IDLE_SNAPSHOT_MS);
		if (pg_atomic_read_u64(&spool_ingest_shared->published_cursor) > (uint64) cursor)
			return;
		ConditionVariablePrepareToSleep(&spool_ingest_shared->spool_cv);
		if (pg_atomic_read_u64(&spool_ingest_shared->published_cursor) <= (uint64) cursor)
			(void) ConditionVariableTimedSleep(&spool_ingest_shared->spool_cv, Max(timeout, 1),
											   PG_WAIT_EXTENSION);
		ConditionVariableCancelSleep();
	}
	else if (RecoveryInProgress())
	{
		/*
		 * A hot standby: nothing wakes us when a commit is replayed, so look
		 * at the checkpoint row again soon, and for the promotion sooner.
		 */
		TimestampTz until = TimestampTzPlusMilliseconds(now, RECOVERY_POLL_MS);

		ConditionVariablePrepareToSleep(&ps->cv);
		while (RecoveryInProgress() && GetCurrentTimestamp() < until &&
			   ConditionVariableTimedSleep(&ps->cv, PROMOTION_POLL_MS, PG_WAIT_EXTENSION))
			;
		ConditionVariableCancelSleep();
	}
	else
	{
		GateView	g;

		read_gate(&g);
		if (g.committed_cursor > cursor)
			return;
		/* The gate is free and another replica is taking it: look again soon. */
		timeout = g.active_pid == 0 ? GATE_FREE_POLL_MS : STANDBY_POLL_MS;
		if (g.lease_expires_at > now)
			timeout = Min(timeout, TimestampDifferenceMilliseconds(now, g.lease_expires_at) + 1);
		ConditionVariablePrepareToSleep(&ps->cv);
		(void) ConditionVariableTimedSleep(&ps->cv, Max(timeout, 1), PG_WAIT_EXTENSION);
		ConditionVariableCancelSleep();
	}
}
