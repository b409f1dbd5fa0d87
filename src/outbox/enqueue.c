/*-------------------------------------------------------------------------
 *
 * outbox_enqueue.c
 *	  Writing outbox rows: spool.enqueue, spool.enqueue_barrier and processor
 *	  outputs, and the commit-safe horizon the dispatchers read up to.
 *
 *	  Outbox ids come from a sequence, so a transaction can commit a smaller
 *	  id after a larger one has been delivered.  A dispatcher therefore
 *	  delivers only ids at or below spool_outbox_safe_bound(): before taking
 *	  its first id, a transaction publishes in its backend's slot a value
 *	  below any id it can get (the highest id handed out so far), and clears
 *	  it when it ends.  Every id at or below the smallest published value (and
 *	  the highest id handed out) belongs to a transaction that has ended, so
 *	  the set of rows below the bound no longer changes.  Transactions that
 *	  do not enqueue never hold the bound back.
 *
 *	  Writing into a target needs the privileges of its owner or of a role
 *	  the owner granted it to (spool.grant_target); processor outputs are
 *	  written with the rights of the processor's owner.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/typcache.h"

#include "outbox/outbox.h"

PG_FUNCTION_INFO_V1(spool_enqueue);
PG_FUNCTION_INFO_V1(spool_enqueue_barrier);

/* What this backend knows about a target (names are cached per generation). */
typedef struct TargetCacheEntry
{
	char		name[NAMEDATALEN];	/* hash key */
	int			id;
	int			shards;
	Oid			owner;
	int			ngrantees;		/* -1: not read yet */
	Oid		   *grantees;		/* roles granted to enqueue (target_cache_cxt) */
} TargetCacheEntry;

/* Shards woken at commit: which rows this transaction wrote where. */
#define MAX_TOUCHED 32
typedef struct Touched
{
	int			target_id;
	int			shard;			/* -1: every shard of the target */
	int			rows;
} Touched;

/* A prepared insert straight into one ring slot: no tuple routing per row. */
typedef struct SlotPlan
{
	int			key;			/* target id * SPOOL_OUTBOX_SLOTS + slot */
	SPIPlanPtr	plan;
} SlotPlan;

static HTAB *target_cache = NULL;
static MemoryContext target_cache_cxt = NULL;
static HTAB *slot_plans = NULL;
static uint32 target_cache_generation = 0;
static Oid	seq_oid = InvalidOid;
static LocalTransactionId seq_looked_up_in = InvalidLocalTransactionId;
static bool callback_registered = false;
static bool published = false;
static Touched touched[MAX_TOUCHED];
static int	ntouched = 0;
static bool touched_overflow = false;

static TargetCacheEntry *lookup_target(const char *name);
static int64 next_id(void);
static SPIPlanPtr slot_plan(int target_id, int slot);
static void note_touched(int target_id, int shard);
static void outbox_xact_callback(XactEvent event, void *arg);
static void wake_dispatchers(void);
static void clear_slot(int code, Datum arg);

/* The ring slot of an outbox id. */
int
spool_outbox_slot_of(int64 id)
{
	return (int) ((id / spool_outbox_segment_size) % SPOOL_OUTBOX_SLOTS);
}

/*
 * Lock spool.outbox_store before touching any of its partitions.  A query on
 * a partition locks the partition's ancestors after the partition (to read
 * its partition constraint), while drop_target's DROP locks the parent
 * first; taking the parent first everywhere keeps one order, and no
 * deadlock between a dispatcher or writer and drop_target.
 */
void
spool_outbox_lock_store(LOCKMODE mode)
{
	static LocalTransactionId looked_up_in = InvalidLocalTransactionId;
	static Oid	store_oid = InvalidOid;

	/* The name is looked up once per transaction: a row's enqueue is hot. */
	if (looked_up_in != MyProc->lxid || !OidIsValid(store_oid))
	{
		store_oid = RangeVarGetRelid(makeRangeVar("spool", "outbox_store", -1), mode, false);
		looked_up_in = MyProc->lxid;
	}
	else
		LockRelationOid(store_oid, mode);
}

/* create/drop_target: every backend drops its cached target names. */
void
spool_outbox_targets_changed(void)
{
	pg_atomic_fetch_add_u32(&spool_outbox_shared->targets_generation, 1);
}

/*
 * The extension was dropped: its outbox ids are gone (the next catalog's
 * sequence starts again at 1, so the highest id handed out must too, or the
 * horizon would let dispatchers pass ids still being written), and every
 * backend drops its cached targets (a new target may reuse a name or an id,
 * with other grants).
 */
void
spool_outbox_forget_catalog(void)
{
	pg_atomic_write_u64(&spool_outbox_shared->outbox_seen, 0);
	spool_outbox_targets_changed();
}

static TargetCacheEntry *
lookup_target(const char *name)
{
	uint32		gen = pg_atomic_read_u32(&spool_outbox_shared->targets_generation);
	TargetCacheEntry *e;
	bool		found;
	Oid			argt[1] = {TEXTOID};
	Datum		argv[1];
	bool		isnull;

	if (target_cache == NULL || gen != target_cache_generation)
	{
		HASHCTL		ctl;

		if (target_cache)
			hash_destroy(target_cache);
		if (slot_plans)
		{
			HASH_SEQ_STATUS it;
			SlotPlan   *sp;

			hash_seq_init(&it, slot_plans);
			while ((sp = hash_seq_search(&it)) != NULL)
				SPI_freeplan(sp->plan);
			hash_destroy(slot_plans);
		}
		if (target_cache_cxt == NULL)
			target_cache_cxt = AllocSetContextCreate(TopMemoryContext, "spool outbox targets",
													 ALLOCSET_SMALL_SIZES);
		MemoryContextReset(target_cache_cxt);
		ctl.keysize = NAMEDATALEN;
		ctl.entrysize = sizeof(TargetCacheEntry);
		target_cache = hash_create("spool outbox targets", 16, &ctl, HASH_ELEM | HASH_STRINGS);
		ctl.keysize = sizeof(int);
		ctl.entrysize = sizeof(SlotPlan);
		slot_plans = hash_create("spool outbox slot inserts", 16, &ctl, HASH_ELEM | HASH_BLOBS);
		target_cache_generation = gen;
	}
	if (strlen(name) >= NAMEDATALEN)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("target \"%s\" does not exist", name)));
	e = hash_search(target_cache, name, HASH_FIND, &found);
	if (found)
		return e;

	argv[0] = CStringGetTextDatum(name);
	if (SPI_execute_with_args("SELECT id, (options->>'shards')::int, owner FROM spool.targets"
							  " WHERE name = $1",
							  1, argt, argv, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("target \"%s\" does not exist", name),
				 errhint("Create it with spool.create_target.")));
	e = hash_search(target_cache, name, HASH_ENTER, &found);
	e->id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	e->shards = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	e->owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	e->ngrantees = -1;			/* read when a role other than the owner's writes */
	e->grantees = NULL;
	return e;
}

/* The roles granted to write into t (SPI connected), once per cache generation. */
static void
load_grantees(TargetCacheEntry *t)
{
	Datum	   *elems;
	bool		isnull;
	int			i;

	if (SPI_execute_with_args("SELECT coalesce(array_agg(role::oid), '{}') FROM spool.target_grants"
							  " WHERE target_id = $1",
							  1, (Oid[]) {INT4OID}, (Datum[]) {Int32GetDatum(t->id)},
							  NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read spool.target_grants");
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1, &isnull)),
					  OIDOID, sizeof(Oid), true, TYPALIGN_INT, &elems, NULL, &t->ngrantees);
	t->grantees = MemoryContextAlloc(target_cache_cxt, sizeof(Oid) * Max(t->ngrantees, 1));
	for (i = 0; i < t->ngrantees; i++)
		t->grantees[i] = DatumGetObjectId(elems[i]);
}

/* 42501 unless role may write into target t: its owner's or a grantee's. */
static void
check_may_enqueue(TargetCacheEntry *t, Oid role)
{
	int			i;

	if (spool_role_is_member(role, t->owner))
		return;
	if (t->ngrantees < 0)
		load_grantees(t);
	for (i = 0; i < t->ngrantees; i++)
		if (spool_role_is_member(role, t->grantees[i]))
			return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to write into target \"%s\"", t->name),
			 errhint("The owner of the target grants it with spool.grant_target(target, role).")));
}

/* The kept insert plan for one slot of a target (lookup_target ran first). */
static SPIPlanPtr
slot_plan(int target_id, int slot)
{
	int			key = target_id * SPOOL_OUTBOX_SLOTS + slot;
	bool		found;
	SlotPlan   *sp = hash_search(slot_plans, &key, HASH_ENTER, &found);

	if (!found)
	{
		sp->plan = NULL;
		PG_TRY();
		{
			spool_plan(&sp->plan,
					   psprintf("INSERT INTO spool.outbox_t%d_%d (id, target_id, slot, shard, key,"
								" payload, barrier, processor, cursor, token)"
								" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", target_id, slot),
					   10, (Oid[]) {INT8OID, INT4OID, INT4OID, INT4OID, TEXTOID, JSONBOID, BOOLOID,
					   TEXTOID, INT8OID, INT8OID});
		}
		PG_CATCH();
		{
			hash_search(slot_plans, &key, HASH_REMOVE, NULL);
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	return sp->plan;
}

/* Fold v into the highest id handed out. */
void
spool_outbox_fold_sequence(int64 v)
{
	uint64		cur = pg_atomic_read_u64(&spool_outbox_shared->outbox_seen);

	while ((int64) cur < v &&
		   !pg_atomic_compare_exchange_u64(&spool_outbox_shared->outbox_seen, &cur, (uint64) v))
		;
}

/*
 * A new outbox id.  The first one of a transaction publishes this backend's
 * lower bound (stored plus one, so that 0 means none) before nextval.
 */
static int64
next_id(void)
{
	int64		id;

	if (!callback_registered)
	{
		RegisterXactCallback(outbox_xact_callback, NULL);
		before_shmem_exit(clear_slot, (Datum) 0);
		callback_registered = true;
	}
	if (!published)
	{
		uint64		seen = pg_atomic_read_u64(&spool_outbox_shared->outbox_seen);

		pg_atomic_write_u64(&spool_outbox_lowest[MyProc->pgprocno], seen + 1);
		published = true;
		pg_memory_barrier();
	}
	/* Looked up once per transaction: DROP and CREATE EXTENSION make a new one. */
	if (seq_looked_up_in != MyProc->lxid || !OidIsValid(seq_oid))
	{
		seq_oid = get_relname_relid("outbox_id_seq", get_namespace_oid("spool", false));
		seq_looked_up_in = MyProc->lxid;
	}
	id = nextval_internal(seq_oid, false);
	spool_outbox_fold_sequence(id);
	return id;
}

/*
 * Every outbox id at or below the result belongs to a transaction that has
 * ended (committed or not).  Read the highest id handed out first: an id
 * handed out later is above it; one handed out earlier to a transaction
 * still open is above that transaction's published bound.
 */
int64
spool_outbox_safe_bound(void)
{
	int64		bound = (int64) pg_atomic_read_u64(&spool_outbox_shared->outbox_seen);
	int			i;

	pg_memory_barrier();
	for (i = 0; i < MaxBackends; i++)
	{
		uint64		v = pg_atomic_read_u64(&spool_outbox_lowest[i]);

		if (v != 0 && (int64) (v - 1) < bound)
			bound = (int64) (v - 1);
	}
	return bound;
}

static void
note_touched(int target_id, int shard)
{
	int			i;

	for (i = 0; i < ntouched; i++)
		if (touched[i].target_id == target_id && touched[i].shard == shard)
		{
			touched[i].rows++;
			return;
		}
	if (ntouched == MAX_TOUCHED)
	{
		touched_overflow = true;
		return;
	}
	touched[ntouched].target_id = target_id;
	touched[ntouched].shard = shard;
	touched[ntouched].rows = 1;
	ntouched++;
}

/*
 * At commit, tell the shard workers how many rows became deliverable.  No
 * lock: this is a hint (workers also poll), and a process stopped right
 * after its commit must not hold a lock that others' commits queue behind.
 */
static void
wake_dispatchers(void)
{
	int			i;
	int			j;

	pg_read_barrier();
	for (j = 0; j < SPOOL_MAX_DISPATCHERS; j++)
	{
		SpoolDispatchSlot *ds = &spool_outbox_shared->dispatchers[j];
		bool		wake = touched_overflow;
		Latch	   *latch;

		if (!ds->in_use)
			continue;
		for (i = 0; i < ntouched; i++)
			if (touched[i].target_id == ds->target_id &&
				(touched[i].shard == ds->shard || touched[i].shard < 0))
			{
				pg_atomic_fetch_add_u64(&ds->committed, touched[i].rows);
				wake = true;
			}
		latch = ds->latch;
		if (wake && latch)
			SetLatch(latch);
	}
}

/* Whatever happens, a backend that exits holds no deliveries back. */
static void
clear_slot(int code, Datum arg)
{
	pg_atomic_write_u64(&spool_outbox_lowest[MyProc->pgprocno], 0);
	published = false;
}

static void
outbox_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_PREPARE:
			if (published)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that has written to the spool outbox")));
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PARALLEL_ABORT:
			/* Runs after the commit is visible to new snapshots. */
			if (published)
			{
				clear_slot(0, (Datum) 0);
				if (event == XACT_EVENT_COMMIT && (ntouched > 0 || touched_overflow))
					wake_dispatchers();
			}
			ntouched = 0;
			touched_overflow = false;
			break;
		default:
			break;
	}
}

/*
 * Insert one outbox row for role (SPI must be connected).  key may be NULL;
 * cursor and token are -1 unless the row is a processor output.
 */
int64
spool_outbox_insert(const char *target, const char *key, Jsonb *payload, bool barrier,
					const char *processor, int64 cursor, int64 token, Oid role)
{
	TargetCacheEntry *t = lookup_target(target);
	int64		id;
	int			slot;
	int			shard;
	Datum		v[10];
	char		nulls[10];

	check_may_enqueue(t, role);
	id = next_id();
	slot = spool_outbox_slot_of(id);

	if (barrier)
		shard = -1;
	else if (key == NULL || t->shards == 1)
		shard = 0;
	else
		shard = (int) (hash_bytes((const unsigned char *) key, strlen(key)) % (uint32) t->shards);

	memset(nulls, ' ', sizeof(nulls));
	v[0] = Int64GetDatum(id);
	v[1] = Int32GetDatum(t->id);
	v[2] = Int32GetDatum(slot);
	v[3] = Int32GetDatum(shard);
	spool_text_param(v, nulls, 4, key);
	v[5] = JsonbPGetDatum(payload);
	v[6] = BoolGetDatum(barrier);
	spool_text_param(v, nulls, 7, processor);
	v[8] = Int64GetDatum(cursor);
	v[9] = Int64GetDatum(token);
	if (cursor < 0)
		nulls[8] = nulls[9] = 'n';
	spool_outbox_lock_store(RowExclusiveLock);
	spool_exec(slot_plan(t->id, slot), v, nulls, false, SPI_OK_INSERT);
	note_touched(t->id, shard);
	return id;
}

/*
 * Insert a processor batch's outputs (a spool.output[]: target, key,
 * payload) for role, the processor's owner.  SPI must be connected.
 */
void
spool_outbox_insert_outputs(ArrayType *outputs, const char *processor, int64 cursor,
							int64 token, Oid role)
{
	Oid			elemtype = ARR_ELEMTYPE(outputs);
	int16		typlen;
	bool		typbyval;
	char		typalign;
	Datum	   *elems;
	bool	   *enulls;
	int			n;
	int			i;
	TupleDesc	tupdesc;

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	deconstruct_array(outputs, elemtype, typlen, typbyval, typalign, &elems, &enulls, &n);
	tupdesc = lookup_rowtype_tupdesc(elemtype, -1);
	for (i = 0; i < n; i++)
	{
		HeapTupleHeader th;
		HeapTupleData tuple;
		Datum		f[3];
		bool		fn[3];

		if (enulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("processor \"%s\" returned a NULL output", processor)));
		th = DatumGetHeapTupleHeader(elems[i]);
		tuple.t_len = HeapTupleHeaderGetDatumLength(th);
		tuple.t_data = th;
		ItemPointerSetInvalid(&tuple.t_self);
		tuple.t_tableOid = InvalidOid;
		heap_deform_tuple(&tuple, tupdesc, f, fn);
		if (fn[0] || fn[2])
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("processor \"%s\" returned an output without a target or payload",
							processor)));
		(void) spool_outbox_insert(TextDatumGetCString(f[0]),
								   fn[1] ? NULL : TextDatumGetCString(f[1]),
								   DatumGetJsonbP(f[2]), false, processor, cursor, token, role);
	}
	ReleaseTupleDesc(tupdesc);
}

/* SQL: spool.enqueue(target, key, payload) */
Datum
spool_enqueue(PG_FUNCTION_ARGS)
{
	char	   *target = spool_arg_name(fcinfo, 0, "target");
	char	   *key = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	Jsonb	   *payload;
	int64		id;
	SpoolCaller caller;

	spool_require_shmem();
	payload = spool_arg_jsonb(fcinfo, 2, "payload must not be NULL",
							   "Use 'null'::jsonb for a JSON null.");
	spool_enter(&caller);
	SPI_connect();
	id = spool_outbox_insert(target, key, payload, false, NULL, -1, -1, caller.role);
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_INT64(id);
}

/* SQL: spool.enqueue_barrier(target) */
Datum
spool_enqueue_barrier(PG_FUNCTION_ARGS)
{
	char	   *target = spool_arg_name(fcinfo, 0, "target");
	int64		id;
	SpoolCaller caller;

	spool_require_shmem();
	spool_enter(&caller);
	SPI_connect();
	id = spool_outbox_insert(target, NULL,
							 DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
																CStringGetDatum("{\"barrier\": true}"))),
							 true, NULL, -1, -1, caller.role);
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_INT64(id);
}
