/*-------------------------------------------------------------------------
 *
 * outbox_dispatch.c
 *	  A dispatcher shard worker ("spool dispatch <target>/<shard>"): reads the
 *	  shard's rows below the commit-safe horizon in id order, holds them in a
 *	  batch, and flushes the batch (size, interval, barrier, close) by
 *	  delivering it and moving the shard's position in one transaction
 *	  (kafka: after the broker acknowledged it; a transactional kafka target
 *	  commits the batch and the position in a Kafka transaction first, and
 *	  reconciles with the position Kafka committed when it starts and after
 *	  a failure).
 *
 *	  An idempotent kafka target is pipelined: a flush produces the batch and
 *	  the shard reads and produces the next ones while the acknowledgements
 *	  come, up to KAFKA_PIPE_DEPTH batches in flight; batches are marked in
 *	  order, each once every message of it (and of the ones before it) was
 *	  acknowledged.  A failure of one drops the batches after it unmarked:
 *	  they are read and delivered again.
 *
 *	  Failed rows are parked in spool.outbox_retry with the later rows of
 *	  their key, retried with backoff, and dead-lettered after the limit.
 *	  Barriers: every shard stops before an undelivered barrier and reports
 *	  that it arrived; shard 0 delivers the barrier once all have arrived and
 *	  releases them.  Shard 0 also truncates ring slots that are delivered.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "common/hashfn.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "nodes/makefuncs.h"
#include "nodes/params.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/fmgroids.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "outbox/outbox.h"

PGDLLEXPORT void spool_dispatch_main(Datum main_arg);

#define BOUND_POLL_MS		5	/* while open transactions hold the horizon */
#define ROTATE_EVERY_MS		1000
#define ROTATE_LOCK_MS		50
#define ERROR_BACKOFF_MIN_MS 100
#define ERROR_BACKOFF_MAX_MS 30000
#define RETRY_ROWS_MAX		1000	/* parked rows tried per pass */
#define TXN_RETRY_ROWS_MAX	150		/* in a transactional target: their ids fit its offset's metadata */
#define STOP_WATCH_MS		100		/* how often an overdue stop is checked */
#define KEEP_MMAP_THRESHOLD	(4 * 1024 * 1024)	/* freed batch memory kept for reuse */
#define KEEP_TRIM_THRESHOLD	(8 * 1024 * 1024)

typedef struct BlockedKey
{
	uint64		hash;			/* of (isnull, key): the hash key */
	int			rows;			/* parked rows of the key */
} BlockedKey;

/* The target and this shard */
static OutboxTarget *target;
static int	my_shard;
static SpoolDispatchSlot *ds;
static char *store;				/* spool.outbox_t<id> */

/* Delivery state */
static int64 position;			/* committed: every row of mine <= it is handled */
static int64 read_upto;			/* every row of mine <= it is held or handled */
static bool more_rows;			/* the last read was cut by the batch size */
static int64 last_bound = -1;
static uint64 committed_seen;
static TimestampTz next_poll;
static MemoryContext batch_cxt;
static OutboxRow **held;
static int	nheld;
static TimestampTz first_held_at;

/* Barriers */
static int64 barrier_at;		/* the undelivered barrier we stop before; 0: none */
static TimestampTz barrier_seen_at;
static int	barrier_attempts;
static TimestampTz barrier_retry_at;

/* Parked rows */
static HTAB *blocked;
static int	nparked;
static int64 min_parked_id;
static TimestampTz next_retry_at;
static TimestampTz next_parked_reload;

/* Errors of the target as a whole, and shutdown */
static int	error_backoff_ms;
static TimestampTz error_until;
static TimestampTz next_rotation;
static MemoryContext loop_cxt;
static volatile TimestampTz stop_requested_at = 0;	/* see stop_requested */
static volatile sig_atomic_t close_timed_out = false;
static TimeoutId stop_watch_id;

/*
 * Idempotent kafka targets: the batches produced and not yet marked, oldest
 * first, in a ring whose index is also the batch's slot in deliver_kafka.c.
 */
typedef struct InflightBatch
{
	MemoryContext cxt;			/* holds its rows */
	OutboxRow **rows;			/* the rows it held, in id order */
	int			n;
	OutboxRow **send;			/* those produced (their key not parked) */
	int			nsend;
	int64		to;				/* its mark moves the position here */
	FlushReason reason;
	TimestampTz t0;				/* produced at */
	TimestampTz deadline;		/* every acknowledgement due by */
} InflightBatch;

static InflightBatch inflight[KAFKA_PIPE_DEPTH];
static int	inflight_head;
static int	inflight_n;

/* Transactional kafka targets: reconcile with Kafka before delivering again */
static bool need_reconcile;
static OutboxRow **meta_rows;	/* the rows the offset's metadata is about */
static int	meta_n;

static SPIPlanPtr plan_barrier;
static SPIPlanPtr plan_position;
static SPIPlanPtr plan_park;
static SPIPlanPtr plan_dead;
static SPIPlanPtr plan_retry_again;
static SPIPlanPtr plan_retry_done;

static void dispatch_attach(void);
static void dispatch_load(void);
static void dispatch_lock_shard(void);
static bool dispatch_pass(void);
static bool dispatch_step(TimestampTz now);
static void dispatch_close(void) pg_attribute_noreturn();
static void dispatch_failed(void);
static void dispatch_detach(int code, Datum arg);
static bool stop_requested(void);
static void stop_watch_handler(void);
static void watch_stop(bool on);
static void set_state(DispatchState st);
static void note_error(const char *msg, bool whole_target);
static uint64 key_hash(const char *key);
static bool key_blocked(const char *key);
static void block_key(const char *key, int delta);
static void load_parked(void);
static void reload_parked(void);
static bool retry_parked(TimestampTz now);
static int	due_rows(TimestampTz now, MemoryContext cxt, OutboxRow ***rows, int max);
static void settle_retried(OutboxRow **rows, int nrows);
static bool read_wanted(TimestampTz now);
static bool read_rows(TimestampTz now);
static int64 leader_position(void);
static bool find_barrier(int64 after, int64 bound, TimestampTz now);
static bool read_held(int64 limit_hi, int want, TimestampTz now);
static bool flush_due(void);
static void flush(FlushReason reason);
static int	flush_attempt(OutboxRow **send, int nsend, bool careful, int64 to);
static void reset_held(void);
static int	settle_rows(OutboxRow **rows, int n);
static bool pipelined(void);
static void pipe_push(FlushReason reason);
static bool pipe_settle(int keep);
static void pipe_abandon(void);
static TimestampTz kafka_deadline(TimestampTz now);
static void kafka_deliver(OutboxRow **rows, int n);
static void kafka_retry(OutboxRow **rows, int n);
static inline bool first_of_key(OutboxRow **rows, int i);
static bool txn_mode(void);
static void kafka_commit_pause(void);
static int64 txn_batch(int64 to);
static int	txn_retry(OutboxRow **rows, int nrows);
static void reconcile(void);
static void drop_held(void);
static bool barrier_step(TimestampTz now);
static bool barrier_arrive(void);
static bool deliver_barrier(TimestampTz now);
static void barrier_passed(void);
static void rotate(void);
static void rotate_slot(int s);
static void move_position(int64 to);
static void park_row(OutboxRow *r, int attempts, const char *error);
static void dead_row(OutboxRow *r, int attempts, const char *error);
static int64 backoff_us(int attempts);
static void deliver_local(OutboxRow **rows, int n, bool careful);
static bool deliver_in_subxact(OutboxRow *r);
static void note_flush(FlushReason reason, int n, double ms);
static void wait_for_work(TimestampTz now);
static TimestampTz batch_deadline(void);

/*
 * Has a stop been requested?  SIGTERM sets ShutdownRequestPending
 * (SignalHandlerForShutdownRequest) and the latch; repeated signals change
 * nothing (the postmaster signals each child twice at once: its pid, then
 * its process group).  The first time, note when: the close timeout counts
 * from there.  A request is seen within STOP_WATCH_MS of its arrival (the
 * stop watch looks that often while the worker works, and a sleeping worker
 * wakes on it), so it is dated that much earlier: the close timeout is
 * never exceeded, at worst it is STOP_WATCH_MS shorter.  Also called from
 * the stop watch, a signal handler.
 */
static bool
stop_requested(void)
{
	if (!ShutdownRequestPending)
		return false;
	if (stop_requested_at == 0)
		stop_requested_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), -STOP_WATCH_MS);
	return true;
}

/*
 * Every STOP_WATCH_MS while the worker works (watch_stop): once the close
 * timeout has passed since the stop request, hand the process to die(),
 * PostgreSQL's own SIGTERM handler, as if the SIGTERM came only now: it ends
 * at the next interrupt check (user code and the Kafka wait check often).
 * The transaction aborts and nothing of the batch is marked, so the next
 * worker delivers it.
 */
static void
stop_watch_handler(void)
{
	if (stop_requested() && spool_outbox_close_timeout_ms > 0 &&
		GetCurrentTimestamp() - stop_requested_at >= (int64) spool_outbox_close_timeout_ms * 1000)
	{
		close_timed_out = true;
		die(SIGTERM);
	}
}

/* Watch for an overdue stop while the worker works (not while it sleeps). */
static void
watch_stop(bool on)
{
	if (on)
		enable_timeout_every(stop_watch_id,
							 TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STOP_WATCH_MS),
							 STOP_WATCH_MS);
	else
		disable_timeout(stop_watch_id, false);
}

static void
dispatch_detach(int code, Datum arg)
{
	spool_deliver_shutdown();
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	if (ds->pid == MyProcPid)
	{
		ds->pid = 0;
		ds->latch = NULL;
		ds->arrived = 0;
		ds->state = DS_STOPPED;
		ds->exit_error = code != 0;
		if (close_timed_out)
		{
			snprintf(ds->last_error, sizeof(ds->last_error),
					 "stopping took longer than spool.outbox_close_timeout (%d ms); the %d rows held"
					 " and any delivery under way are left to the next worker",
					 spool_outbox_close_timeout_ms, nheld);
			ds->last_error_at = GetCurrentTimestamp();
		}
	}
	LWLockRelease(spool_outbox_shared->lock);
}


static void
set_state(DispatchState st)
{
	if (ds->state == st)
		return;
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	ds->state = st;
	LWLockRelease(spool_outbox_shared->lock);
}

/*
 * Show msg as the shard's last error.  A failure of the target as a whole
 * (or of a barrier) also sets the state and counts as a retry; a row's
 * failure leaves both to the parking that follows.
 */
static void
note_error(const char *msg, bool whole_target)
{
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	strlcpy(ds->last_error, msg ? msg : "error", sizeof(ds->last_error));
	ds->last_error_at = GetCurrentTimestamp();
	if (whole_target)
	{
		ds->state = DS_ERROR;
		ds->retries++;
	}
	LWLockRelease(spool_outbox_shared->lock);
}

/* ---- parked rows and blocked keys ---- */

static uint64
key_hash(const char *key)
{
	if (key == NULL)
		return UINT64CONST(0x9e3779b97f4a7c15);
	return hash_bytes_extended((const unsigned char *) key, strlen(key), 1);
}

static bool
key_blocked(const char *key)
{
	uint64		h;

	if (nparked == 0)
		return false;
	h = key_hash(key);
	return hash_search(blocked, &h, HASH_FIND, NULL) != NULL;
}

static void
block_key(const char *key, int delta)
{
	uint64		h = key_hash(key);
	bool		found;
	BlockedKey *b = hash_search(blocked, &h, HASH_ENTER, &found);

	if (!found)
		b->rows = 0;
	b->rows += delta;
	nparked += delta;
	if (b->rows <= 0)
		hash_search(blocked, &h, HASH_REMOVE, NULL);
}

/* Rebuild the blocked keys from spool.outbox_retry (in a transaction). */
static void
load_parked(void)
{
	HASHCTL		ctl;
	Datum		v[2] = {Int32GetDatum(target->id), Int32GetDatum(my_shard)};
	uint64		i;
	bool		isnull;

	if (blocked)
		hash_destroy(blocked);
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(BlockedKey);
	blocked = hash_create("spool blocked keys", 64, &ctl, HASH_ELEM | HASH_BLOBS);
	nparked = 0;
	min_parked_id = PG_INT64_MAX;
	next_retry_at = DT_NOEND;
	if (SPI_execute_with_args("SELECT key, count(*)::int, min(id),"
							  " (array_agg(next_attempt_at ORDER BY id))[1]"
							  " FROM spool.outbox_retry WHERE target_id = $1 AND shard = $2 GROUP BY key",
							  2, (Oid[]) {INT4OID, INT4OID}, v, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.outbox_retry");
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *key = SPI_getvalue(tup, desc, 1);
		int			n = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		int64		first = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		Datum		due = SPI_getbinval(tup, desc, 4, &isnull);

		block_key(key, n);
		min_parked_id = Min(min_parked_id, first);
		/* The head of a key: due at its next attempt, or now if it waited. */
		next_retry_at = Min(next_retry_at, isnull ? 0 : DatumGetTimestampTz(due));
	}
	pg_atomic_write_u32(&ds->retry_dirty, 0);
	next_parked_reload = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													 spool_outbox_poll_interval_ms);
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	ds->blocked_keys = (int) hash_get_num_entries(blocked);
	LWLockRelease(spool_outbox_shared->lock);
}

static int64
backoff_us(int attempts)
{
	double		us = (double) target->retry_backoff_us * pow(2.0, Max(attempts - 1, 0));

	us = Min(us, (double) target->retry_backoff_max_us);
	/* Jitter: up to half the delay, so that retries of many keys spread. */
	return (int64) (us * (1.0 - 0.5 * pg_prng_double(&pg_global_prng_state)));
}

/*
 * The columns parked rows and dead letters share: id, target, target_id,
 * shard, key, payload, barrier, processor, cursor, created_at (v[0..9]),
 * then attempts (v[10]) and the error (v[11]).
 */
#define ROW_COLUMNS 12
#define ROW_TYPES INT8OID, TEXTOID, INT4OID, INT4OID, TEXTOID, JSONBOID, BOOLOID, \
	TEXTOID, INT8OID, TIMESTAMPTZOID, INT4OID, TEXTOID

static void
row_values(OutboxRow *r, int attempts, const char *error, Datum *v, char *nulls)
{
	memset(nulls, ' ', ROW_COLUMNS);
	v[0] = Int64GetDatum(r->id);
	v[1] = CStringGetTextDatum(target->name);
	v[2] = Int32GetDatum(target->id);
	v[3] = Int32GetDatum(my_shard);
	v[4] = r->key ? CStringGetTextDatum(r->key) : (Datum) 0;
	nulls[4] = r->key ? ' ' : 'n';
	v[5] = JsonbPGetDatum(r->payload);
	v[6] = BoolGetDatum(r->barrier);
	v[7] = r->processor ? CStringGetTextDatum(r->processor) : (Datum) 0;
	nulls[7] = r->processor ? ' ' : 'n';
	v[8] = Int64GetDatum(r->cursor);
	nulls[8] = r->cursor < 0 ? 'n' : ' ';
	v[9] = TimestampTzGetDatum(r->created_at);
	v[10] = Int32GetDatum(attempts);
	v[11] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[11] = error ? ' ' : 'n';
}

/*
 * Park r: failed (attempts > 0, due after a backoff) or waiting behind its
 * key; its key is blocked from now on.  The in-memory view is updated with
 * the row; if the transaction aborts, load_parked rebuilds it.
 */
static void
park_row(OutboxRow *r, int attempts, const char *error)
{
	Datum		v[ROW_COLUMNS + 1];
	char		nulls[ROW_COLUMNS + 1];
	TimestampTz due = TimestampTzPlusMicroseconds(GetCurrentTimestamp(), backoff_us(attempts));

	row_values(r, attempts, error, v, nulls);
	v[ROW_COLUMNS] = TimestampTzGetDatum(due);
	nulls[ROW_COLUMNS] = attempts > 0 ? ' ' : 'n';
	spool_plan(&plan_park,
			   "INSERT INTO spool.outbox_retry (id, target, target_id, shard, key, payload, barrier,"
			   " processor, cursor, created_at, attempts, last_error, next_attempt_at, first_failed_at)"
			   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
			   " CASE WHEN $11 > 0 THEN now() END)",
			   ROW_COLUMNS + 1, (Oid[]) {ROW_TYPES, TIMESTAMPTZOID});
	spool_exec(plan_park, v, nulls, false, SPI_OK_INSERT);
	block_key(r->key, 1);
	min_parked_id = Min(min_parked_id, r->id);
	if (attempts > 0)
		next_retry_at = Min(next_retry_at, due);
}

/* Dead-letter r (which is not parked). */
static void
dead_row(OutboxRow *r, int attempts, const char *error)
{
	Datum		v[ROW_COLUMNS];
	char		nulls[ROW_COLUMNS];

	row_values(r, attempts, error ? error : "unknown error", v, nulls);
	spool_plan(&plan_dead,
			   "INSERT INTO spool.outbox_dead (id, target, target_id, shard, key, payload, barrier,"
			   " processor, cursor, created_at, attempts, last_error)"
			   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
			   ROW_COLUMNS, (Oid[]) {ROW_TYPES});
	spool_exec(plan_dead, v, nulls, false, SPI_OK_INSERT);
}

/* The compare-and-set of this shard's position, in the delivering transaction. */
static void
move_position(int64 to)
{
	Datum		v[4] = {Int32GetDatum(target->id), Int32GetDatum(my_shard),
	Int64GetDatum(to), Int64GetDatum(position)};

	spool_plan(&plan_position,
			   "UPDATE spool.outbox_positions SET position = $3, updated_at = now()"
			   " WHERE target_id = $1 AND shard = $2 AND position = $4",
			   4, (Oid[]) {INT4OID, INT4OID, INT8OID, INT8OID});
	if (spool_exec(plan_position, v, NULL, false, SPI_OK_UPDATE) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_FENCE_REJECTED),
				 errmsg("the position of %s moved under it", MyBgworkerEntry->bgw_name)));
}

/*
 * Deliver r in a subtransaction of its own; if it fails, mark it failed
 * with the error's message.  Returns false when it failed.
 */
static bool
deliver_in_subxact(OutboxRow *r)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		spool_deliver_row(r);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *ed;

		MemoryContextSwitchTo(cxt);
		ed = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		r->failed = true;
		r->error = MemoryContextStrdup(GetMemoryChunkContext(r),
									   ed->message ? ed->message : "error");
		FreeErrorData(ed);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return ok;
}

/*
 * Deliver rows of a sql or notify target in the current transaction.  Fast
 * path: no subtransactions, any error aborts the whole attempt.  Careful
 * path: one subtransaction per row, a failing row is marked failed and the
 * later rows of its key are not tried (sent = false).
 */
static void
deliver_local(OutboxRow **rows, int n, bool careful)
{
	int			i;
	int			j;
	uint64	   *failed_keys = careful ? palloc(sizeof(uint64) * n) : NULL;	/* key_hash */
	int			nfailed = 0;
	SpoolBox	box = {0};

	spool_deliver_box_open(&box);
	PG_TRY();
	{
		for (i = 0; i < n; i++)
		{
			OutboxRow  *r = rows[i];
			uint64		h;
			bool		behind = false;

			if (r->failed)
				continue;
			r->sent = true;
			if (!careful)
			{
				spool_deliver_row(r);
				continue;
			}
			/* A row behind a failed row of its key is not tried: it waits. */
			h = key_hash(r->key);
			for (j = 0; j < nfailed && !behind; j++)
				behind = failed_keys[j] == h;
			if (behind)
				r->sent = false;
			else if (!deliver_in_subxact(r))
				failed_keys[nfailed++] = h;
		}
	}
	PG_CATCH();
	{
		spool_box_abandon(&box);
		PG_RE_THROW();
	}
	PG_END_TRY();
	spool_box_close(&box);
}

/*
 * An outbox row from a query whose first columns are id, key, payload,
 * barrier, processor, cursor, created_at; allocated in cxt.
 */
#define ROW_TUPLE_MAX 16			/* columns of the queries row_from_tuple reads */
#define READ_COLS 7				/* the columns row_from_values reads */

static OutboxRow *
row_from_values(Datum *v, bool *n, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	OutboxRow  *r = palloc0(sizeof(OutboxRow));

	r->id = DatumGetInt64(v[0]);
	r->key = n[1] ? NULL : TextDatumGetCString(v[1]);
	r->payload = DatumGetJsonbPCopy(v[2]);
	r->barrier = DatumGetBool(v[3]);
	r->processor = n[4] ? NULL : TextDatumGetCString(v[4]);
	r->cursor = n[5] ? -1 : DatumGetInt64(v[5]);
	r->created_at = DatumGetTimestampTz(v[6]);
	MemoryContextSwitchTo(old);
	return r;
}

static OutboxRow *
row_from_tuple(HeapTuple tup, TupleDesc desc, MemoryContext cxt)
{
	Datum		v[ROW_TUPLE_MAX];
	bool		n[ROW_TUPLE_MAX];

	/* The columns at once (text, jsonb are varlena: no cached offsets). */
	Assert(desc->natts <= ROW_TUPLE_MAX);
	heap_deform_tuple(tup, desc, v, n);
	return row_from_values(v, n, cxt);
}

/* ---- reading ---- */

/*
 * Shard 0's position, up to which barriers are delivered: ours on shard 0,
 * else as shard 0 published it, or as stored while it does not run.  In
 * read_rows' transaction.
 */
static int64
leader_position(void)
{
	SpoolDispatchSlot *leader;
	int64		pos;
	Datum		v[1];
	bool		isnull;

	if (my_shard == 0)
		return position;
	leader = spool_dispatch_slot_of(target->id, 0);
	LWLockAcquire(spool_outbox_shared->lock, LW_SHARED);
	pos = leader && leader->pid != 0 ? leader->position : 0;
	LWLockRelease(spool_outbox_shared->lock);
	if (pos != 0)
		return pos;
	v[0] = Int32GetDatum(target->id);
	if (SPI_execute_with_args("SELECT position FROM spool.outbox_positions"
							  " WHERE target_id = $1 AND shard = 0",
							  1, (Oid[]) {INT4OID}, v, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
		pos = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	return pos;
}

/* The first undelivered barrier in (after, bound], if any, becomes barrier_at. */
static bool
find_barrier(int64 after, int64 bound, TimestampTz now)
{
	Datum		v[2] = {Int64GetDatum(after), Int64GetDatum(bound)};
	Datum		b;
	bool		isnull;

	if (plan_barrier == NULL)
		spool_plan(&plan_barrier,
				   psprintf("SELECT min(id) FROM %s WHERE shard = -1 AND id > $1 AND id <= $2", store),
				   2, (Oid[]) {INT8OID, INT8OID});
	if (spool_exec(plan_barrier, v, NULL, true, SPI_OK_SELECT) != 1)
		return false;
	b = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		return false;
	barrier_at = DatumGetInt64(b);
	barrier_seen_at = now;
	barrier_attempts = 0;
	barrier_retry_at = 0;
	return true;
}

/*
 * One partition (ring slot) of the target's outbox, read by read_held: an
 * index scan of its (shard, id) index, and where the columns row_from_values
 * wants are in its rows (by name: a partition's attribute numbers can differ
 * from its parent's).
 */
typedef struct PartScan
{
	Relation	heap;
	Relation	index;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	AttrNumber	att[READ_COLS];
	bool		has;			/* slot holds the next row */
	int64		id;				/* its id */
} PartScan;

static const char *const read_cols[READ_COLS] = {
	"id", "key", "payload", "barrier", "processor", "cursor", "created_at"
};

/* The partition's next row in id order into ps->slot; false at the end. */
static bool
part_next(PartScan *ps)
{
	bool		isnull;

	ps->has = index_getnext_slot(ps->scan, ForwardScanDirection, ps->slot);
	if (ps->has)
		ps->id = DatumGetInt64(slot_getattr(ps->slot, ps->att[0], &isnull));
	return ps->has;
}

/*
 * Open partition relid for read_held and start its scan of my rows in
 * (lo, hi]: the btree index on (shard, id), which every partition has (it
 * comes from spool.outbox_store's).
 */
static void
part_open(PartScan *ps, Oid relid, int64 lo, int64 hi)
{
	ScanKeyData keys[3];
	AttrNumber	shard_att;
	List	   *indexes;
	ListCell   *lc;
	int			i;

	ps->heap = table_open(relid, NoLock);	/* locked by find_inheritance_children */
	for (i = 0; i < READ_COLS; i++)
		if ((ps->att[i] = get_attnum(relid, read_cols[i])) == InvalidAttrNumber)
			elog(ERROR, "no column %s in %s", read_cols[i], RelationGetRelationName(ps->heap));
	shard_att = get_attnum(relid, "shard");
	ps->index = NULL;
	indexes = RelationGetIndexList(ps->heap);
	foreach(lc, indexes)
	{
		Relation	ix = index_open(lfirst_oid(lc), AccessShareLock);

		if (ix->rd_rel->relam == BTREE_AM_OID && ix->rd_index->indisvalid &&
			ix->rd_index->indnkeyatts == 2 && RelationGetIndexExpressions(ix) == NIL &&
			RelationGetIndexPredicate(ix) == NIL &&
			ix->rd_index->indkey.values[0] == shard_att &&
			ix->rd_index->indkey.values[1] == ps->att[0])
		{
			ps->index = ix;
			break;
		}
		index_close(ix, AccessShareLock);
	}
	list_free(indexes);
	if (ps->index == NULL)
		elog(ERROR, "no (shard, id) index on %s", RelationGetRelationName(ps->heap));
	ScanKeyInit(&keys[0], 1, BTEqualStrategyNumber, F_INT4EQ, Int32GetDatum(my_shard));
	ScanKeyInit(&keys[1], 2, BTGreaterStrategyNumber, F_INT8GT, Int64GetDatum(lo));
	ScanKeyInit(&keys[2], 2, BTLessEqualStrategyNumber, F_INT8LE, Int64GetDatum(hi));
	ps->slot = table_slot_create(ps->heap, NULL);
	ps->scan = index_beginscan(ps->heap, ps->index, GetActiveSnapshot(), 3, 0);
	index_rescan(ps->scan, keys, 3, NULL, 0);
	part_next(ps);
}

static void
part_close(PartScan *ps)
{
	index_endscan(ps->scan);
	ExecDropSingleTupleTableSlot(ps->slot);
	index_close(ps->index, NoLock);
	table_close(ps->heap, NoLock);
}

/*
 * Read up to want of my rows in (read_upto, limit_hi] into the batch, in id
 * order: the partitions' index scans merged.  What the query "... WHERE
 * shard = $1 AND id > $2 AND id <= $3 ORDER BY id LIMIT $4" on the
 * target's outbox gives, without the executor and without a plan (the
 * kept plan of it, over all eight partitions, ran as bitmap scans and a
 * top-N sort of every row in the range, for each batch: a batch cost
 * grew with the backlog).
 */
static bool
read_held(int64 limit_hi, int want, TimestampTz now)
{
	Oid			parent;
	List	   *parts;
	ListCell   *lc;
	PartScan   *ps;
	int			nparts = 0;
	int			count = 0;
	int			i;

	parent = RangeVarGetRelid(makeRangeVar("spool", psprintf("outbox_t%d", target->id), -1),
							  AccessShareLock, false);
	parts = find_inheritance_children(parent, AccessShareLock);
	ps = palloc0(sizeof(PartScan) * Max(list_length(parts), 1));
	foreach(lc, parts)
		part_open(&ps[nparts++], lfirst_oid(lc), read_upto, limit_hi);
	while (count < want)
	{
		PartScan   *best = NULL;
		Datum		v[READ_COLS];
		bool		n[READ_COLS];

		for (i = 0; i < nparts; i++)
			if (ps[i].has && (best == NULL || ps[i].id < best->id))
				best = &ps[i];
		if (best == NULL)
			break;
		slot_getallattrs(best->slot);
		for (i = 0; i < READ_COLS; i++)
		{
			v[i] = best->slot->tts_values[best->att[i] - 1];
			n[i] = best->slot->tts_isnull[best->att[i] - 1];
		}
		if (nheld == 0)
			first_held_at = now;
		held[nheld++] = row_from_values(v, n, batch_cxt);
		count++;
		part_next(best);
	}
	for (i = 0; i < nparts; i++)
		part_close(&ps[i]);
	pfree(ps);
	list_free(parts);
	more_rows = count == want;
	read_upto = more_rows ? held[nheld - 1]->id : limit_hi;
	return count > 0;
}

/*
 * Read more of my rows below the horizon, up to the next undelivered
 * barrier.  Returns true if rows were read or the barrier moved.
 */
static bool
read_rows(TimestampTz now)
{
	int64		bound = spool_outbox_safe_bound();
	int64		leader_pos;
	int64		limit_hi;
	int			want = target->batch_size - nheld;
	bool		got = false;

	committed_seen = pg_atomic_read_u64(&ds->committed);
	if (bound <= read_upto && !more_rows && now < next_poll)
		return false;
	last_bound = bound;
	next_poll = TimestampTzPlusMilliseconds(now, spool_outbox_poll_interval_ms);

	spool_begin_txn("reading the outbox");
	spool_outbox_lock_store(AccessShareLock);
	leader_pos = leader_position();
	if (barrier_at != 0 && barrier_at <= leader_pos)
		barrier_at = 0;
	if (barrier_at == 0)
		got = find_barrier(Max(leader_pos, read_upto), bound, now);
	limit_hi = barrier_at ? barrier_at - 1 : bound;
	if (want > 0 && limit_hi > read_upto)
		got |= read_held(limit_hi, want, now);
	else
		more_rows = want <= 0 && limit_hi > read_upto;
	spool_end_txn();
	if (got)
		set_state(DS_DELIVERING);
	return got;
}

/* ---- flushing ---- */

static void
note_flush(FlushReason reason, int n, double ms)
{
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	ds->flushes[reason]++;
	ds->delivered += n;
	ds->position = position;
	ds->batch_sum += n;
	ds->batch_max = Max(ds->batch_max, n);
	spool_hist_bucket_add(ds->batch_hist, HIST_BATCH, n, 1);
	ds->flush_ms_sum += ms;
	ds->flush_ms_max = Max(ds->flush_ms_max, ms);
	spool_hist_bucket_add(ds->flush_hist, HIST_FLUSH, ms, 0.25);
	ds->last_flush_at = GetCurrentTimestamp();
	ds->blocked_keys = (int) hash_get_num_entries(blocked);
	if (ds->state == DS_ERROR)
		ds->state = DS_DELIVERING;
	LWLockRelease(spool_outbox_shared->lock);
}

/*
 * Until when a kafka delivery begun at now may wait for its
 * acknowledgements: the target's message.timeout.ms, or
 * spool.outbox_close_timeout once a stop was requested; DT_NOEND: no limit.
 */
static TimestampTz
kafka_deadline(TimestampTz now)
{
	int64		wait = ShutdownRequestPending && spool_outbox_close_timeout_ms > 0 ?
		spool_outbox_close_timeout_ms : spool_kafka_wait_ms();

	return wait < 0 ? DT_NOEND : TimestampTzPlusMilliseconds(now, wait);
}

/* A Kafka delivery the target as a whole failed (brokers down, timed out): 08006. */
static void
kafka_deliver(OutboxRow **rows, int n)
{
	char	   *err = NULL;

	if (!spool_kafka_deliver(rows, n, kafka_deadline(GetCurrentTimestamp()), &err))
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("%s", err)));
}

/* Forget what an earlier attempt noted on the held rows. */
static void
reset_held(void)
{
	int			i;

	for (i = 0; i < nheld; i++)
	{
		held[i]->sent = false;
		held[i]->failed = false;
		held[i]->error = NULL;
	}
}

/*
 * In the delivering transaction, in id order (rows[0..n)): park or
 * dead-letter the rows that failed (a failed row blocks its key for the
 * rows after it), and park the rows that were not sent because their key
 * waits.  Returns how many were delivered.
 */
static int
settle_rows(OutboxRow **rows, int n)
{
	int			delivered = 0;
	int			i;

	for (i = 0; i < n; i++)
	{
		OutboxRow  *r = rows[i];

		if (r->failed)
		{
			note_error(r->error, false);
			if (target->retry_limit == 0)
				dead_row(r, 1, r->error);
			else
				park_row(r, 1, r->error);
		}
		else if (r->sent)
			delivered++;		/* kafka: even behind a refused row */
		else
			park_row(r, 0, NULL);	/* behind a parked or failed row of its key */
	}
	return delivered;
}

/*
 * One attempt to deliver send (sql, notify; kafka rows were produced
 * already) and move the position to to, in one transaction.  Returns how
 * many rows were delivered, or -1 when a fast attempt failed and the batch
 * is to be delivered row by row.  An error no single row explains (a
 * careful attempt, kafka, a moved position) is raised: the target fails as
 * a whole and keeps the batch.
 */
static int
flush_attempt(OutboxRow **send, int nsend, bool careful, int64 to)
{
	MemoryContext cxt = CurrentMemoryContext;
	ErrorData  *volatile ed = NULL;
	volatile int delivered = 0;

	spool_begin_txn("delivering");
	PG_TRY();
	{
		if (!spool_deliver_external())
			deliver_local(send, nsend, careful);
		delivered = settle_rows(held, nheld);
		move_position(to);
		spool_test_pause();
		spool_end_txn();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		ed = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
	}
	PG_END_TRY();
	if (ed == NULL)
		return delivered;

	/* Undo the in-memory parking of the aborted attempt. */
	reload_parked();
	if (careful || spool_deliver_external() || ed->sqlerrcode == ERRCODE_SPOOL_FENCE_REJECTED)
		ereport(ERROR, (errcode(ed->sqlerrcode), errmsg("%s", ed->message)));
	ereport(DEBUG1, (errcode(ed->sqlerrcode),
					 errmsg("%s: batch failed (%s); delivering row by row",
							MyBgworkerEntry->bgw_name, ed->message)));
	FreeErrorData(ed);
	return -1;
}

/*
 * Deliver the held rows and move the position past them (and past every id
 * read, since rows of mine up to read_upto are all held).  A failure of the
 * target as a whole keeps the batch for a later attempt.
 */
static void
flush(FlushReason reason)
{
	TimestampTz t0 = GetCurrentTimestamp();
	int64		to = read_upto;
	OutboxRow **send = palloc(sizeof(OutboxRow *) * nheld);
	int			nsend = 0;
	int			delivered;
	int			i;

	if (pipelined())
	{
		pipe_push(reason);
		return;
	}
	/* Rows whose key waits behind a parked row are parked too, in order. */
	reset_held();
	if (txn_mode())
	{
		pgstat_report_activity(STATE_RUNNING, "delivering to kafka in a transaction");
		to = txn_batch(to);
	}
	else
		for (i = 0; i < nheld; i++)
			if (!key_blocked(held[i]->key))
				send[nsend++] = held[i];
	if (spool_deliver_external() && nsend > 0)
	{
		pgstat_report_activity(STATE_RUNNING, "delivering to kafka");
		kafka_deliver(send, nsend);
		for (i = 0; i < nsend; i++)
			send[i]->sent = true;
	}
	if ((delivered = flush_attempt(send, nsend, false, to)) < 0)
	{
		reset_held();
		delivered = flush_attempt(send, nsend, true, to);
	}

	need_reconcile = false;
	position = to;
	read_upto = to;				/* lower than read when txn_batch cut the batch */
	note_flush(reason, delivered, (double) (GetCurrentTimestamp() - t0) / 1000.0);
	nheld = 0;
	MemoryContextReset(batch_cxt);
	held = MemoryContextAlloc(batch_cxt, sizeof(OutboxRow *) * target->batch_size);
	error_backoff_ms = 0;
}

/* ---- the pipeline of an idempotent kafka target ---- */

/* Is the target an idempotent (pipelined) kafka target? */
static bool
pipelined(void)
{
	return target->kind == KIND_KAFKA && !target->transactional;
}

/*
 * Flush of a pipelined target: produce the held rows whose key is not
 * parked (the others are parked when the batch is marked) and put the
 * batch in flight, without waiting for the acknowledgements; with
 * KAFKA_PIPE_DEPTH batches in flight, the oldest is waited for and marked
 * first.  The held rows move to the batch (its memory context is swapped
 * with the held one).
 */
static void
pipe_push(FlushReason reason)
{
	TimestampTz now;
	InflightBatch *b;
	MemoryContext spare;
	char	   *err = NULL;
	int			slot;
	int			i;

	if (inflight_n == KAFKA_PIPE_DEPTH)
		(void) pipe_settle(KAFKA_PIPE_DEPTH - 1);
	slot = (inflight_head + inflight_n) % KAFKA_PIPE_DEPTH;
	b = &inflight[slot];
	now = GetCurrentTimestamp();
	reset_held();
	b->send = MemoryContextAlloc(batch_cxt, sizeof(OutboxRow *) * Max(nheld, 1));
	b->nsend = 0;
	for (i = 0; i < nheld; i++)
		if (!key_blocked(held[i]->key))
		{
			held[i]->sent = true;
			b->send[b->nsend++] = held[i];
		}
	b->rows = held;
	b->n = nheld;
	b->to = read_upto;
	b->reason = reason;
	b->t0 = now;
	b->deadline = kafka_deadline(now);
	spare = b->cxt;
	b->cxt = batch_cxt;
	batch_cxt = spare;
	nheld = 0;
	held = MemoryContextAlloc(batch_cxt, sizeof(OutboxRow *) * target->batch_size);
	inflight_n++;
	pgstat_report_activity(STATE_RUNNING, "delivering to kafka");
	/* Also with nothing to send: the slot then counts as acknowledged. */
	if (!spool_kafka_produce(slot, b->send, b->nsend, b->deadline, &err))
		ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("%s", err)));
}

/*
 * Mark the oldest batches in flight whose every acknowledgement came, in
 * order, in one transaction that parks their failed and waiting rows and
 * moves the position to the last one's end; first wait for the oldest
 * until at most keep are left unmarked.  The commit does not wait for its
 * WAL flush: a mark lost in a crash only makes its rows delivered again
 * (at least once).  A failure of the target as a whole (a timeout, a
 * transient error of any row) raises; the caller abandons the pipeline.
 * Returns true if a batch was marked.
 */
static bool
pipe_settle(int keep)
{
	int			ndone = 0;
	int			delivered[KAFKA_PIPE_DEPTH];
	char	   *err = NULL;
	TimestampTz now;
	InflightBatch *last = NULL;
	int			k;

	while (ndone < inflight_n)
	{
		int			slot = (inflight_head + ndone) % KAFKA_PIPE_DEPTH;
		InflightBatch *b = &inflight[slot];

		if (!spool_kafka_done(slot))
		{
			/* Past its deadline (librdkafka times nothing out): the target failed. */
			if (inflight_n - ndone <= keep && GetCurrentTimestamp() < b->deadline)
				break;
			pgstat_report_activity(STATE_RUNNING, "waiting for kafka acknowledgements");
			if (!spool_kafka_wait(slot, b->deadline))
				ereport(ERROR,
						(errcode(ERRCODE_CONNECTION_FAILURE),
						 errmsg("kafka delivery to topic \"%s\" failed: not every message was acknowledged in time",
								target->topic)));
		}
		if (!spool_kafka_finish(slot, b->send, b->nsend, &err))
			ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("%s", err)));
		last = b;
		ndone++;
	}
	if (ndone == 0)
		return false;

	spool_begin_txn("marking rows delivered to kafka");
	(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	for (k = 0; k < ndone; k++)
	{
		InflightBatch *b = &inflight[(inflight_head + k) % KAFKA_PIPE_DEPTH];

		delivered[k] = settle_rows(b->rows, b->n);
	}
	move_position(last->to);
	spool_test_pause();
	spool_end_txn();

	position = last->to;
	now = GetCurrentTimestamp();
	for (k = 0; k < ndone; k++)
	{
		InflightBatch *b = &inflight[inflight_head];

		note_flush(b->reason, delivered[k], (double) (now - b->t0) / 1000.0);
		MemoryContextReset(b->cxt);
		b->rows = b->send = NULL;
		b->n = b->nsend = 0;
		inflight_head = (inflight_head + 1) % KAFKA_PIPE_DEPTH;
		inflight_n--;
	}
	error_backoff_ms = 0;
	return true;
}

/*
 * After a failure: forget every batch in flight and the held rows (all are
 * read again from the position on), and let librdkafka send nothing more
 * of them.  The in-memory parked keys are rebuilt before they are used.
 */
static void
pipe_abandon(void)
{
	int			k;

	spool_kafka_abandon();
	for (k = 0; k < KAFKA_PIPE_DEPTH; k++)
	{
		MemoryContextReset(inflight[k].cxt);
		inflight[k].rows = inflight[k].send = NULL;
		inflight[k].n = inflight[k].nsend = 0;
	}
	inflight_head = 0;
	inflight_n = 0;
	drop_held();
	next_parked_reload = 0;
}

/* Rebuild the blocked keys from spool.outbox_retry, in a transaction of its own. */
static void
reload_parked(void)
{
	spool_begin_txn("reading parked rows");
	load_parked();
	spool_end_txn();
}

/* Is rows[i] the first of its key in rows, which come in key and id order? */
static inline bool
first_of_key(OutboxRow **rows, int i)
{
	return i == 0 || !spool_same_key(rows[i]->key, rows[i - 1]->key);
}

/*
 * A retry pass of a kafka target in the default mode (rows[0..n) in key and
 * id order, as due_rows gives them): the keys' first rows are produced and
 * acknowledged first, and only then the rows waiting behind those that got
 * through, so that a first row refused again still holds its key's later
 * rows back (it is parked, and they stay parked untried).  Rows after a
 * refused one among those are produced all the same, as in a batch of the
 * pipeline.  Each row produced is marked sent.
 */
static void
kafka_retry(OutboxRow **rows, int n)
{
	OutboxRow **send = palloc(sizeof(OutboxRow *) * Max(n, 1));
	int			nsend = 0;
	bool		through = false;	/* the current key's first row got through */
	int			i;

	for (i = 0; i < n; i++)
		if (first_of_key(rows, i))
			send[nsend++] = rows[i];
	kafka_deliver(send, nsend);
	for (i = 0; i < nsend; i++)
		send[i]->sent = true;
	nsend = 0;
	for (i = 0; i < n; i++)
	{
		if (first_of_key(rows, i))
			through = !rows[i]->failed; /* a first row, produced above */
		else if (through)
			send[nsend++] = rows[i];
		/* else behind a refused first row: not tried, stays parked */
	}
	if (nsend == 0)
		return;
	kafka_deliver(send, nsend);
	for (i = 0; i < nsend; i++)
		send[i]->sent = true;
}

/*
 * The parked rows to try in one pass, at most max, in key and id order,
 * allocated in cxt: the head (lowest id) of each blocked key that is due,
 * and after it the rows of its key that only wait behind it (attempts 0).
 * So a key whose head gets through drains in one pass, not one row per
 * pass (and each pass reads every parked row of the shard).  A row tried
 * after a failed one of its key is not tried (it stays parked); a row
 * that failed on its own ends its key's run and is tried later, as a head.
 * Returns how many.
 */
static int
due_rows(TimestampTz now, MemoryContext cxt, OutboxRow ***rows, int max)
{
	Datum		v[2] = {Int32GetDatum(target->id), Int32GetDatum(my_shard)};
	bool		isnull;
	int			nrows = 0;
	bool		take = false;
	char	   *prev_key = NULL;
	uint64		i;

	spool_begin_txn("retrying parked rows");
	if (SPI_execute_with_args("SELECT id, key, payload, barrier, processor, cursor,"
							  " created_at, attempts, next_attempt_at FROM spool.outbox_retry"
							  " WHERE target_id = $1 AND shard = $2 ORDER BY key, id",
							  2, (Oid[]) {INT4OID, INT4OID}, v, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.outbox_retry");
	*rows = MemoryContextAlloc(cxt, sizeof(OutboxRow *) * Max(Min(SPI_processed, max), 1));
	for (i = 0; i < SPI_processed && nrows < max; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Datum		kd = SPI_getbinval(tup, desc, 2, &isnull);
		char	   *key = isnull ? NULL : TextDatumGetCString(kd);
		int32		attempts = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));

		if (i == 0 || !spool_same_key(key, prev_key))
		{
			Datum		due = SPI_getbinval(tup, desc, 9, &isnull);

			take = isnull || DatumGetTimestampTz(due) <= now;	/* a head */
		}
		else if (attempts > 0)
			take = false;		/* failed on its own: a head of a later pass */
		prev_key = key;
		if (!take)
			continue;
		(*rows)[nrows] = row_from_tuple(tup, desc, cxt);
		(*rows)[nrows++]->attempts = attempts;
	}
	spool_end_txn();
	return nrows;
}

/*
 * In the retrying transaction: a retried row that failed and has attempts
 * left is due again after a backoff; one that was delivered, or is out of
 * retries (then dead-lettered), leaves spool.outbox_retry, and the key's
 * next row is its head now.
 */
static void
settle_retried(OutboxRow **rows, int nrows)
{
	int			i;

	for (i = 0; i < nrows; i++)
	{
		OutboxRow  *r = rows[i];
		Datum		a[4];

		if (!r->sent && !r->failed)
			continue;			/* not tried (behind a failed row of its key): stays parked */
		a[0] = Int64GetDatum(r->id);
		if (r->failed)
			note_error(r->error, false);
		if (r->failed && r->attempts + 1 <= target->retry_limit)
		{
			a[1] = Int32GetDatum(r->attempts + 1);
			a[2] = TimestampTzGetDatum(TimestampTzPlusMicroseconds(GetCurrentTimestamp(),
																  backoff_us(r->attempts + 1)));
			a[3] = CStringGetTextDatum(r->error ? r->error : "error");
			spool_plan(&plan_retry_again,
					   "UPDATE spool.outbox_retry SET attempts = $2, next_attempt_at = $3,"
					   " last_error = $4, first_failed_at = coalesce(first_failed_at, now())"
					   " WHERE id = $1", 4, (Oid[]) {INT8OID, INT4OID, TIMESTAMPTZOID, TEXTOID});
			(void) spool_exec(plan_retry_again, a, NULL, false, SPI_OK_UPDATE);
			continue;
		}
		spool_plan(&plan_retry_done, "DELETE FROM spool.outbox_retry WHERE id = $1",
				   1, (Oid[]) {INT8OID});
		(void) spool_exec(plan_retry_done, a, NULL, false, SPI_OK_DELETE);
		if (r->failed)
			dead_row(r, r->attempts + 1, r->error);
	}
}

/*
 * Retry the head (lowest id) of every blocked key that is due.  Returns
 * true if anything was attempted.
 */
static bool
retry_parked(TimestampTz now)
{
	OutboxRow **rows;
	int			nrows;
	int			i;

	if (pg_atomic_read_u32(&ds->retry_dirty) != 0 || now >= next_parked_reload)
	{
		/* Rows in flight may wait behind a parked row that is gone now. */
		if (inflight_n > 0 && nparked > 0)
			(void) pipe_settle(0);
		reload_parked();
	}
	if (nparked == 0 || now < next_retry_at)
		return false;
	/* A retried head must not overtake rows of its key still in flight. */
	if (inflight_n > 0)
		(void) pipe_settle(0);

	set_state(DS_RETRYING);
	/* In the loop's memory, reset each pass. */
	nrows = due_rows(now, CurrentMemoryContext, &rows,
					 txn_mode() ? TXN_RETRY_ROWS_MAX : RETRY_ROWS_MAX);
	if (nrows == 0)
		return false;
	if (txn_mode())
		nrows = txn_retry(rows, nrows);
	else if (spool_deliver_external())
		kafka_retry(rows, nrows);
	spool_begin_txn("retrying parked rows");
	if (!spool_deliver_external())
		deliver_local(rows, nrows, true);
	settle_retried(rows, nrows);
	spool_test_pause();
	spool_end_txn();
	need_reconcile = false;

	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < nrows; i++)
	{
		if (rows[i]->sent && !rows[i]->failed)
			ds->delivered++;
		else if (rows[i]->failed && rows[i]->attempts + 1 <= target->retry_limit)
			ds->retries++;
	}
	LWLockRelease(spool_outbox_shared->lock);
	/* Heads changed: rebuild what is blocked and when the next one is due. */
	reload_parked();
	return true;
}

/* ---- transactional kafka targets ---- */

/* Is the target a transactional kafka target? */
static bool
txn_mode(void)
{
	return target->kind == KIND_KAFKA && target->transactional;
}

/* Testing only (spool.test_kafka_commit_pause): wait after Kafka committed. */
static void
kafka_commit_pause(void)
{
	TimestampTz until;

	if (spool_test_kafka_commit_pause_ms <= 0)
		return;
	pgstat_report_activity(STATE_RUNNING, "test pause after a kafka commit");
	until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), spool_test_kafka_commit_pause_ms);
	while (GetCurrentTimestamp() < until)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until), 1),
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * The committed offset's metadata says what a transaction left out or
 * retried, so that a restart can settle it exactly as the lost PostgreSQL
 * transaction would have: "v1", then ";f:" ids refused for good, ";w:" ids
 * that wait behind a parked row of their key (both of a batch), or ";r:"
 * parked ids that a retry delivered.  meta_rows[0..meta_n) are the rows
 * the transaction under way is about.
 */

/* Append ";<tag>:" and the ids of meta_rows[i] for which pick is true, if any. */
static void
meta_ids(StringInfo m, const char *tag, int pick)
{
	bool		first = true;
	int			i;

	for (i = 0; i < meta_n; i++)
	{
		OutboxRow  *r = meta_rows[i];
		bool		is;

		if (pick == 'f')
			is = r->failed;
		else if (pick == 'w')
			is = !r->failed && !r->sent;
		else
			is = r->sent;
		if (!is)
			continue;
		if (first)
			appendStringInfo(m, ";%s:", tag);
		else
			appendStringInfoChar(m, ',');
		appendStringInfo(m, INT64_FORMAT, r->id);
		first = false;
	}
}

/* A batch's metadata: the rows refused, and those left waiting. */
static char *
batch_meta(void)
{
	StringInfoData m;

	initStringInfo(&m);
	appendStringInfoString(&m, "v1");
	meta_ids(&m, "f", 'f');
	meta_ids(&m, "w", 'w');
	return m.data;
}

/* A retry's metadata: the parked rows it delivers. */
static char *
retry_meta(void)
{
	StringInfoData m;

	initStringInfo(&m);
	appendStringInfoString(&m, "v1");
	meta_ids(&m, "r", 'r');
	return m.data;
}

/* A barrier's metadata: nothing to list. */
static char *
barrier_meta(void)
{
	return pstrdup("v1");
}

/* Is id in the list tag (";f:", ...) of meta? */
static bool
meta_has(const char *meta, const char *tag, int64 id)
{
	const char *p = strstr(meta, tag);

	if (p == NULL)
		return false;
	p += strlen(tag);
	while (*p >= '0' && *p <= '9')
	{
		char	   *end;
		int64		v = strtoi64(p, &end, 10);

		if (v == id)
			return true;
		p = *end == ',' ? end + 1 : end;
	}
	return false;
}

/*
 * Kafka's part of a flush: produce the held rows that may go (not refused,
 * their key not parked, not behind a refused row of their key) in one
 * transaction that commits position to.  After a row the broker refused
 * for good the transaction is tried again without it; rows whose ids would
 * not fit in the offset metadata cut the batch.  Marks the rows sent;
 * returns the position to move to (lower than to after a cut).  A failed
 * transaction raises, and the next step reconciles.
 */
static int64
txn_batch(int64 to)
{
	OutboxRow **send = palloc(sizeof(OutboxRow *) * Max(nheld, 1));
	uint64	   *failed_keys = palloc(sizeof(uint64) * Max(nheld, 1));

	for (;;)
	{
		int			nsend = 0;
		int			nfailed = 0;
		int			i;
		int			j;
		KafkaTxnResult res;
		char	   *err = NULL;

		for (i = 0; i < nheld; i++)
		{
			OutboxRow  *r = held[i];
			uint64		h = key_hash(r->key);
			bool		behind = key_blocked(r->key);

			r->sent = false;
			for (j = 0; j < nfailed && !behind; j++)
				behind = failed_keys[j] == h;
			if (r->failed)
				failed_keys[nfailed++] = h;
			else if (!behind)
				send[nsend++] = r;
		}
		if (nsend == 0)
			return to;			/* all parked: PostgreSQL only */
		meta_rows = held;
		meta_n = nheld;
		need_reconcile = true;
		res = spool_kafka_txn_deliver(send, nsend, to, batch_meta,
									  ShutdownRequestPending && spool_outbox_close_timeout_ms > 0 ?
									  spool_outbox_close_timeout_ms : 60000, &err);
		if (res == KTXN_FAILED)
			ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("%s", err)));
		if (res == KTXN_COMMITTED)
		{
			kafka_commit_pause();
			return to;
		}
		need_reconcile = false; /* aborted */
		if (res == KTXN_TOO_LONG && nheld > 1)
		{
			/* Leave the second half for the next batch (read again). */
			nheld /= 2;
			to = held[nheld]->id - 1;
		}
	}
}

/*
 * Kafka's part of retrying parked heads (one per key): the ones not
 * refused, in one transaction that commits the unchanged position with
 * their ids.  Returns how many of rows to settle (fewer when the ids would
 * not fit).
 */
static int
txn_retry(OutboxRow **rows, int nrows)
{
	OutboxRow **send = palloc(sizeof(OutboxRow *) * Max(nrows, 1));

	for (;;)
	{
		int			nsend = 0;
		int			i;
		KafkaTxnResult res;
		char	   *err = NULL;

		for (i = 0; i < nrows; i++)
		{
			rows[i]->sent = false;
			/* Rows come in key and id order: none goes after a failed row of its key. */
			if (rows[i]->failed ||
				(!first_of_key(rows, i) &&
				 (rows[i - 1]->failed || !rows[i - 1]->sent)))
				continue;
			rows[i]->sent = true;	/* for now: spool_kafka_txn_deliver says */
			send[nsend++] = rows[i];
		}
		if (nsend == 0)
			return nrows;
		meta_rows = rows;
		meta_n = nrows;
		need_reconcile = true;
		res = spool_kafka_txn_deliver(send, nsend, position, retry_meta, 60000, &err);
		if (res == KTXN_FAILED)
			ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("%s", err)));
		if (res == KTXN_COMMITTED)
		{
			kafka_commit_pause();
			return nrows;
		}
		need_reconcile = false;
		if (res == KTXN_TOO_LONG && nrows > 1)
			nrows /= 2;
	}
}

/* Forget the held batch: it is read again from the outbox. */
static void
drop_held(void)
{
	nheld = 0;
	more_rows = false;
	read_upto = position;
	MemoryContextReset(batch_cxt);
	held = MemoryContextAlloc(batch_cxt, sizeof(OutboxRow *) * target->batch_size);
}

/*
 * Reconcile with the position Kafka committed (at start, and after a
 * transaction failed or its PostgreSQL part did not commit).  Kafka ahead
 * of us means that a batch was committed there and not marked here: its
 * rows, read again, are settled as that transaction's metadata says, and
 * the position moves to Kafka's, without producing anything.  At our
 * position, the metadata may name parked rows a retry delivered: they
 * leave spool.outbox_retry.  Kafka behind us is normal (batches whose rows
 * were all parked, dead-lettered barriers move only here).  Raises when
 * Kafka cannot be asked.
 */
static void
reconcile(void)
{
	int64		k;
	char	   *meta;
	char	   *err = NULL;
	Datum		v[3];
	uint64		i;
	int			delivered = 0;

	pgstat_report_activity(STATE_RUNNING, "reconciling with kafka");
	if (!spool_kafka_txn_committed(&k, &meta, &err))
		ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("%s", err)));
	drop_held();
	if (k > position)
	{
		spool_begin_txn("settling a kafka transaction");
		v[0] = Int32GetDatum(my_shard);
		v[1] = Int64GetDatum(position);
		v[2] = Int64GetDatum(k);
		if (SPI_execute_with_args(psprintf("SELECT id, key, payload, barrier, processor, cursor, created_at"
										   " FROM %s WHERE shard = $1 AND id > $2 AND id <= $3 ORDER BY id",
										   store),
								  3, (Oid[]) {INT4OID, INT8OID, INT8OID}, v, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read %s", store);
		held = MemoryContextAlloc(batch_cxt, sizeof(OutboxRow *) * Max(SPI_processed, 1));
		for (i = 0; i < SPI_processed; i++)
		{
			OutboxRow  *r = row_from_tuple(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, batch_cxt);

			r->failed = meta_has(meta, ";f:", r->id);
			r->error = r->failed ? pstrdup("refused by Kafka (settled after a restart)") : NULL;
			r->sent = !r->failed && !meta_has(meta, ";w:", r->id);
			held[nheld++] = r;
		}
		delivered = settle_rows(held, nheld);
		move_position(k);
		spool_end_txn();
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("%s: Kafka committed up to " INT64_FORMAT ", PostgreSQL had " INT64_FORMAT
						"; settled %d rows as delivered without sending them again",
						MyBgworkerEntry->bgw_name, k, position, delivered)));
		position = k;
		drop_held();
		LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
		ds->position = position;
		ds->delivered += delivered;
		LWLockRelease(spool_outbox_shared->lock);
	}
	else if (k == position && strstr(meta, ";r:") != NULL)
	{
		const char *p = strstr(meta, ";r:") + 3;
		int			n = 0;

		spool_begin_txn("settling a kafka transaction");
		while (*p >= '0' && *p <= '9')
		{
			char	   *end;

			v[0] = Int32GetDatum(target->id);
			v[1] = Int32GetDatum(my_shard);
			v[2] = Int64GetDatum(strtoi64(p, &end, 10));
			if (SPI_execute_with_args("DELETE FROM spool.outbox_retry WHERE target_id = $1 AND shard = $2 AND id = $3",
									  3, (Oid[]) {INT4OID, INT4OID, INT8OID}, v, NULL, false, 0) != SPI_OK_DELETE)
				elog(ERROR, "could not settle parked rows");
			n += (int) SPI_processed;
			p = *end == ',' ? end + 1 : end;
		}
		spool_end_txn();
		if (n > 0)
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("%s: settled %d parked rows Kafka committed as delivered",
							MyBgworkerEntry->bgw_name, n)));
		reload_parked();
	}
	need_reconcile = false;
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* ---- barriers ---- */

/*
 * Record that this shard arrived at the barrier (waking shard 0).  For
 * shard 0: have all shards arrived?  For the others: has shard 0 released
 * it (its position passed the barrier)?
 */
static bool
barrier_arrive(void)
{
	SpoolDispatchSlot *leader;
	Latch	   *wake = NULL;
	bool		ok = true;
	int			s;

	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	ds->arrived = barrier_at;
	ds->state = DS_BARRIER;
	leader = spool_dispatch_slot_of(target->id, 0);
	if (my_shard != 0)
	{
		ok = leader && leader->pid != 0 && leader->position >= barrier_at;
		wake = leader ? leader->latch : NULL;
	}
	else
		for (s = 1; s < target->shards; s++)
		{
			SpoolDispatchSlot *o = spool_dispatch_slot_of(target->id, s);

			if (o == NULL || o->pid == 0 || o->arrived < barrier_at)
				ok = false;
		}
	LWLockRelease(spool_outbox_shared->lock);
	if (wake)
		SetLatch(wake);
	return ok;
}

/*
 * Shard 0: deliver the barrier alone, then move shard 0's position to it,
 * in one transaction.  A barrier that fails is retried with backoff, and
 * dead-lettered (and passed) after the retry limit.  Returns true when it
 * was passed.
 */
static bool
deliver_barrier(TimestampTz now)
{
	OutboxRow  *b = palloc0(sizeof(OutboxRow)); /* delivery notes errors in its context */

	b->id = barrier_at;
	b->barrier = true;
	b->cursor = -1;
	b->created_at = now;
	b->payload = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{\"barrier\": true}")));
	if (txn_mode())
	{
		KafkaTxnResult res;
		char	   *err = NULL;

		need_reconcile = true;
		res = spool_kafka_txn_deliver(&b, 1, barrier_at, barrier_meta, 60000, &err);
		if (res == KTXN_FAILED)
			ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("%s", err)));
		if (res == KTXN_COMMITTED)
			kafka_commit_pause();
		else
			need_reconcile = false; /* refused, and aborted */
	}
	else if (spool_deliver_external())
		kafka_deliver(&b, 1);
	spool_begin_txn("delivering a barrier");
	if (!spool_deliver_external())
		deliver_local(&b, 1, true);
	if (b->failed)
	{
		if (++barrier_attempts <= target->retry_limit)
		{
			spool_end_txn();
			barrier_retry_at = TimestampTzPlusMicroseconds(GetCurrentTimestamp(),
														   backoff_us(barrier_attempts));
			note_error(psprintf("barrier " INT64_FORMAT ": %s", barrier_at, b->error), true);
			return false;
		}
		dead_row(b, barrier_attempts, b->error);
	}
	move_position(barrier_at);
	spool_test_pause();
	spool_end_txn();
	need_reconcile = false;
	return true;
}

/* Shard 0 passed the barrier: publish it and release every shard. */
static void
barrier_passed(void)
{
	double		drain_ms = (double) (GetCurrentTimestamp() - barrier_seen_at) / 1000.0;
	int			s;

	position = barrier_at;
	read_upto = Max(read_upto, barrier_at);
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	ds->position = position;
	ds->barriers++;
	ds->drain_ms_last = drain_ms;
	ds->drain_ms_sum += drain_ms;
	ds->drain_ms_max = Max(ds->drain_ms_max, drain_ms);
	spool_hist_bucket_add(ds->drain_hist, HIST_DRAIN, drain_ms, 1);
	ds->state = DS_IDLE;
	for (s = 1; s < target->shards; s++)
	{
		SpoolDispatchSlot *o = spool_dispatch_slot_of(target->id, s);

		if (o && o->latch)
			SetLatch(o->latch);
	}
	LWLockRelease(spool_outbox_shared->lock);
	barrier_at = 0;
	barrier_attempts = 0;
}

/*
 * At a barrier with nothing held: report arrival; shard 0 delivers it once
 * every shard has arrived (and has no earlier parked rows).  Returns true
 * if the barrier was passed.
 */
static bool
barrier_step(TimestampTz now)
{
	if (nparked > 0 && min_parked_id < barrier_at)
		return false;			/* earlier rows of mine are still being retried */
	if (!barrier_arrive())
		return false;
	if (my_shard != 0)
	{
		barrier_at = 0;
		set_state(DS_IDLE);
		return true;
	}
	if (now < barrier_retry_at || !deliver_barrier(now))
		return false;
	barrier_passed();
	return true;
}

/* ---- rotation ---- */

/*
 * Truncate ring slot s if all its rows are delivered.  The check is
 * repeated under the slot's lock, which waits at most ROTATE_LOCK_MS; a
 * lock timeout (someone reads the slot) leaves it for a later try.
 */
static void
rotate_slot(int s)
{
	char	   *leaf = psprintf("%s_%d", store, s);
	char	   *check;
	bool		isnull;
	volatile bool done = false;
	MemoryContext cxt = CurrentMemoryContext;

	/* Some rows, and none undelivered (positions re-read by each statement). */
	check = psprintf("SELECT EXISTS (SELECT FROM %s)"
					 " AND NOT EXISTS (SELECT FROM spool.outbox_positions p,"
					 "   LATERAL (SELECT FROM %s o WHERE o.shard = p.shard AND o.id > p.position LIMIT 1) x"
					 "   WHERE p.target_id = %d)"
					 " AND NOT EXISTS (SELECT FROM %s o WHERE o.shard = -1 AND o.id >"
					 "   (SELECT position FROM spool.outbox_positions WHERE target_id = %d AND shard = 0))",
					 leaf, leaf, target->id, leaf, target->id);
	spool_begin_txn("rotating the outbox");
	spool_outbox_lock_store(AccessShareLock);
	if (SPI_execute(check, true, 1) != SPI_OK_SELECT ||
		!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
	{
		spool_end_txn();
		return;
	}
	PG_TRY();
	{
		if (SPI_execute(psprintf("SET LOCAL lock_timeout = %d", ROTATE_LOCK_MS), false, 0) < 0 ||
			SPI_execute(psprintf("LOCK TABLE %s IN ACCESS EXCLUSIVE MODE", leaf), false, 0) < 0)
			elog(ERROR, "could not lock %s", leaf);
		if (SPI_execute(check, false, 1) == SPI_OK_SELECT &&
			DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
		{
			if (SPI_execute(psprintf("TRUNCATE %s", leaf), false, 0) < 0)
				elog(ERROR, "could not truncate %s", leaf);
			done = true;
		}
		spool_end_txn();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_END_TRY();
	if (done)
		ereport(DEBUG1, (errcode(ERRCODE_SUCCESSFUL_COMPLETION),
						 errmsg("outbox slot %s truncated", leaf)));
}

/*
 * Truncate ring slots whose rows are all delivered (shard 0 only).  Never
 * the slot ids are being taken from, nor slots that may hold undelivered
 * rows.
 */
static void
rotate(void)
{
	int64		high = (int64) pg_atomic_read_u64(&spool_outbox_shared->outbox_seen);
	int			cur = spool_outbox_slot_of(high);
	int			s;

	for (s = 0; s < SPOOL_OUTBOX_SLOTS; s++)
		if (s != cur)
			rotate_slot(s);
}

/* ---- the loop ---- */

/* When the held batch is flushed by interval (nheld > 0). */
static TimestampTz
batch_deadline(void)
{
	return TimestampTzPlusMicroseconds(first_held_at, target->batch_interval_us);
}

/* Sleep until there may be work: a batch deadline, a retry, a poll, a rotation. */
static void
wait_for_work(TimestampTz now)
{
	TimestampTz until = next_poll;
	long		ms;

	if (nheld > 0)
		until = Min(until, batch_deadline());
	if (nparked > 0)
		until = Min(until, Max(next_retry_at, now));
	if (barrier_at != 0 && my_shard == 0 && barrier_retry_at > now)
		until = Min(until, barrier_retry_at);
	/* Committed rows above the horizon: look again soon. */
	if (last_bound < (int64) pg_atomic_read_u64(&spool_outbox_shared->outbox_seen))
		until = Min(until, TimestampTzPlusMilliseconds(now, BOUND_POLL_MS));
	if (my_shard == 0)
		until = Min(until, next_rotation);
	ms = TimestampDifferenceMilliseconds(now, until);
	/* Batches in flight: wait (up to 1 ms) for their acknowledgements instead. */
	if (inflight_n > 0 && ms > 0 && !stop_requested())
	{
		spool_kafka_nap();
		return;
	}
	/* A stop request whose latch wake-up user code consumed (pg_sleep) is not slept on. */
	if (ms <= 0 || stop_requested())
		return;
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, ms,
					 PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * Attach: signals (SIGTERM requests a stop that flushes: dispatch_close),
 * the stop watch, the connection, pinned settings, and this shard's slot
 * (unless the target was dropped or another one took the slot).
 */
static void
dispatch_attach(void)
{
	stop_watch_id = RegisterTimeout(USER_TIMEOUT, stop_watch_handler);
	/* Batches (and librdkafka's messages) allocate and free megabytes each. */
	spool_worker_keep_memory(KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD);
	spool_worker_attach(spool_core_shared->database_oid, SignalHandlerForShutdownRequest);

	ds = &spool_outbox_shared->dispatchers[spool_worker_args()->slot];
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	if (!ds->in_use || strcmp(ds->target, spool_worker_args()->name) != 0)
	{
		LWLockRelease(spool_outbox_shared->lock);
		proc_exit(0);
	}
	my_shard = ds->shard;
	ds->pid = MyProcPid;
	ds->latch = MyLatch;
	ds->options_hash = 0;		/* published once the options are loaded */
	ds->arrived = 0;
	ds->exit_error = false;
	ds->state = DS_IDLE;
	ds->started_at = GetCurrentTimestamp();
	LWLockRelease(spool_outbox_shared->lock);
	before_shmem_exit(dispatch_detach, (Datum) 0);

	batch_cxt = AllocSetContextCreate(TopMemoryContext, "spool dispatch batch",
									  ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "spool dispatch loop",
									 ALLOCSET_DEFAULT_SIZES);
}

/*
 * Load: the target (exit if it is gone), our position, the sequence's
 * high-water mark, the parked rows, and the delivery's state.
 */
static void
dispatch_load(void)
{
	MemoryContext old;
	bool		isnull;

	spool_begin_txn("loading the target");
	old = MemoryContextSwitchTo(TopMemoryContext);
	target = spool_outbox_load_target(ds->target_id);
	MemoryContextSwitchTo(old);
	if (target == NULL)
	{
		spool_end_txn();
		proc_exit(0);
	}
	store = MemoryContextStrdup(TopMemoryContext, psprintf("spool.outbox_t%d", target->id));
	if (SPI_execute_with_args("SELECT position FROM spool.outbox_positions WHERE target_id = $1 AND shard = $2",
							  2, (Oid[]) {INT4OID, INT4OID},
							  (Datum[]) {Int32GetDatum(target->id), Int32GetDatum(my_shard)},
							  NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "no position for %s", MyBgworkerEntry->bgw_name);
	position = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	read_upto = position;
	if (SPI_execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM spool.outbox_id_seq",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		spool_outbox_fold_sequence(DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
																SPI_tuptable->tupdesc, 1, &isnull)));
	load_parked();
	if (txn_mode())
	{
		spool_kafka_transactional(psprintf("spool-%s-%s-%d", get_database_name(MyDatabaseId),
										   target->name, my_shard));
		need_reconcile = true;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	spool_deliver_init(target);
	MemoryContextSwitchTo(old);
	spool_end_txn();
}

/*
 * One process per shard: a stray one from an older launcher waits here for
 * the shard's lock (and goes if asked to stop).  Then publish the position
 * and the options loaded.
 */
static void
dispatch_lock_shard(void)
{
	int			i;

	while (!spool_internal_lock(SPOOL_LOCK_DISPATCH, store, (uint32) my_shard))
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 100,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (stop_requested())
			proc_exit(0);
	}
	LWLockAcquire(spool_outbox_shared->lock, LW_EXCLUSIVE);
	ds->position = position;
	ds->options_hash = target->options_hash;
	LWLockRelease(spool_outbox_shared->lock);
	held = MemoryContextAlloc(batch_cxt, sizeof(OutboxRow *) * target->batch_size);
	for (i = 0; i < KAFKA_PIPE_DEPTH; i++)
		inflight[i].cxt = AllocSetContextCreate(TopMemoryContext, "spool dispatch batch in flight",
												ALLOCSET_DEFAULT_SIZES);
	next_poll = 0;
	next_rotation = 0;
	if (spool_deliver_external())
		spool_kafka_warm();
}

/* With rows held, read again only when it may fill the batch. */
static bool
read_wanted(TimestampTz now)
{
	bool		deadline = nheld > 0 && now >= batch_deadline();
	bool		fills = pg_atomic_read_u64(&ds->committed) - committed_seen >=
		(uint64) (target->batch_size - nheld);

	return nheld == 0 || deadline || more_rows || fills || now >= next_poll;
}

/* Flush the batch if it is full, stops at a barrier, or is due; true if it was. */
static bool
flush_due(void)
{
	if (nheld >= target->batch_size)
		flush(FLUSH_SIZE);
	else if (nheld > 0 && barrier_at != 0 && read_upto >= barrier_at - 1)
		flush(FLUSH_BARRIER);
	else if (nheld > 0 && GetCurrentTimestamp() >= batch_deadline())
		flush(FLUSH_INTERVAL);
	else
		return false;
	return true;
}

/*
 * One step of delivery: retries, reading, flushing, the barrier, rotation
 * (shard 0).  Nothing while the target backs off after an error.  Returns
 * false when nothing was done.
 */
static bool
dispatch_step(TimestampTz now)
{
	bool		did = false;

	if (now < error_until)
		return false;
	if (need_reconcile)
	{
		reconcile();
		did = true;
	}
	if (inflight_n > 0)
		did |= pipe_settle(KAFKA_PIPE_DEPTH);	/* only what was acknowledged */
	did |= retry_parked(now);
	if (nheld < target->batch_size && read_wanted(now))
		did |= read_rows(now);
	did |= flush_due();
	if (nheld == 0 && barrier_at != 0 && read_upto >= barrier_at - 1)
	{
		/* Every row before the barrier is marked before it is arrived at. */
		if (inflight_n > 0)
			did |= pipe_settle(0);
		did |= barrier_step(GetCurrentTimestamp());
	}
	if (nheld == 0 && inflight_n == 0 && barrier_at == 0 && nparked == 0 && !more_rows)
		set_state(DS_IDLE);
	if (my_shard == 0 && GetCurrentTimestamp() >= next_rotation)
	{
		rotate();
		next_rotation = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ROTATE_EVERY_MS);
	}
	return did;
}

/*
 * close: a stop was requested; what is held is delivered before we go.  Not
 * when a transactional target has to reconcile first: Kafka may hold the
 * batch already, and the next worker settles it.
 */
static void
dispatch_close(void)
{
	if (nheld > 0 && !need_reconcile)
		flush(FLUSH_CLOSE);
	if (inflight_n > 0)
		(void) pipe_settle(0);
	watch_stop(false);
	proc_exit(0);
}

/*
 * A step failed (in PG_CATCH).  A dropped target, a fatal error or a moved
 * position end the process; any other error is one of the target as a
 * whole: shown, and retried after a growing backoff, with the batch kept.
 * Stopping, the batch is left for the next worker.
 */
static void
dispatch_failed(void)
{
	ErrorData  *ed;

	MemoryContextSwitchTo(loop_cxt);
	ed = CopyErrorData();
	if (ed->sqlerrcode == ERRCODE_UNDEFINED_TABLE)
	{
		/* drop_target removed our rows; the launcher stops us anyway. */
		FlushErrorState();
		AbortOutOfAnyTransaction();
		ereport(LOG, (errcode(ERRCODE_ADMIN_SHUTDOWN),
					  errmsg("%s: target \"%s\" was dropped; exiting",
							 MyBgworkerEntry->bgw_name, target->name)));
		proc_exit(0);
	}
	if (ed->elevel >= FATAL || ed->sqlerrcode == ERRCODE_SPOOL_FENCE_REJECTED)
		PG_RE_THROW();
	EmitErrorReport();
	FlushErrorState();
	AbortOutOfAnyTransaction();
	LWLockReleaseAll();
	MemoryContextSwitchTo(loop_cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	if (inflight_n > 0)
		pipe_abandon();
	else if (spool_deliver_external() && !txn_mode())
		spool_kafka_abandon();	/* nothing it sent may be sent after a retry */
	note_error(ed->message, true);
	error_backoff_ms = Min(Max(error_backoff_ms * 2, ERROR_BACKOFF_MIN_MS),
						   ERROR_BACKOFF_MAX_MS);
	error_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), error_backoff_ms);
	next_poll = error_until;
	if (ShutdownRequestPending)
		proc_exit(1);			/* the batch is left for the next worker */
}

/*
 * One pass, under the stop watch: the close path once a stop was
 * requested, else a step.  Returns false when nothing was done (the loop
 * then waits).
 */
static bool
dispatch_pass(void)
{
	volatile bool did = false;

	PG_TRY();
	{
		watch_stop(true);
		if (stop_requested())
			dispatch_close();
		did = dispatch_step(GetCurrentTimestamp());
		watch_stop(false);
	}
	PG_CATCH();
	{
		watch_stop(false);
		dispatch_failed();
	}
	PG_END_TRY();
	return did;
}

void
spool_dispatch_main(Datum main_arg)
{
	dispatch_attach();
	dispatch_load();
	dispatch_lock_shard();
	for (;;)
	{
		spool_worker_pass(loop_cxt, true);
		if (!dispatch_pass())
			wait_for_work(GetCurrentTimestamp());
	}
}
