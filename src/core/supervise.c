/*-------------------------------------------------------------------------
 *
 * supervise.c
 *	  "N workers of kind K wanted": the one supervisor behind every dynamic
 *	  worker of spool_ext.  A kind (SpoolWorkerKind, described by its
 *	  subsystem) lists the units it wants (a source, a processor with its
 *	  replicas, a target shard, a nonce worker number); the supervisor claims
 *	  a shared slot for each new unit, starts its workers with their
 *	  arguments in bgw_extra, restarts them, and stops the workers of units
 *	  no longer wanted before releasing their slots.
 *
 *	  Restarts: a worker the kind says did not fail (it was terminated) is
 *	  back at once; one that failed, or of a kind that cannot tell, is back
 *	  at once after a run of 10 s or more, else after a backoff doubling
 *	  from 1 s to 30 s, so a crash loop is slow and visible in the log.
 *
 *	  Runs in the launcher only.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "postmaster/bgworker.h"
#include "storage/lmgr.h"
#include "utils/memutils.h"

#include "core/core.h"

#define RESTART_BACKOFF_MIN_MS		1000
#define RESTART_BACKOFF_MAX_MS		30000
#define HEALTHY_RUN_MS				10000

static void refresh_units(SpoolSupervisor *s);
static void tend_worker(SpoolSupervisor *s, SpoolUnit *u, int i, TimestampTz now);
static bool worker_stopped(SpoolSupervisor *s, SpoolUnit *u, int i, TimestampTz now);
static void start_worker(SpoolSupervisor *s, SpoolUnit *u, int i, TimestampTz now);
static char *worker_name(SpoolSupervisor *s, const SpoolUnit *u, int i);
static void forget_unit(SpoolSupervisor *s, int n);
static int	claim_slot(const SpoolWorkerKind *kind, const SpoolUnit *u);

/* A supervisor for kind, in TopMemoryContext (it lives as long as the launcher). */
SpoolSupervisor *
spool_supervisor_create(const SpoolWorkerKind *kind)
{
	SpoolSupervisor *s = MemoryContextAllocZero(TopMemoryContext, sizeof(SpoolSupervisor));

	s->kind = kind;
	s->units = MemoryContextAllocZero(TopMemoryContext,
									  sizeof(SpoolUnit) * kind->max_units);
	return s;
}

/*
 * Called by a kind's list callback: the unit (name, id, index) is wanted,
 * with nworkers workers, at this version of its definition.
 */
void
spool_want(SpoolSupervisor *s, const char *name, int64 id, int index,
		   int nworkers, uint32 version)
{
	SpoolUnit  *u;
	int			n;

	for (n = 0; n < s->nunits; n++)
	{
		u = &s->units[n];
		if (u->id == id && u->index == index && strcmp(u->name, name) == 0)
			break;
	}
	if (n == s->nunits)
	{
		SpoolUnit	fresh;

		memset(&fresh, 0, sizeof(SpoolUnit));
		strlcpy(fresh.name, name, NAMEDATALEN);
		fresh.id = id;
		fresh.index = index;
		fresh.slot = -1;
		if (n == s->kind->max_units ||
			(s->kind->slots && (fresh.slot = claim_slot(s->kind, &fresh)) < 0))
		{
			ereport(WARNING,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("more than %d %s; \"%s\" is not started",
							s->kind->max_units, s->kind->what,
							worker_name(s, &fresh, 0))));
			return;
		}
		s->units[n] = fresh;
		s->nunits++;
	}
	u = &s->units[n];
	u->nworkers = Min(Max(nworkers, 0), SPOOL_UNIT_MAX_WORKERS);
	u->version = version;
	u->wanted = true;
}

/*
 * One pass over a kind: with refresh, ask it what it wants first; then tend
 * every worker of every unit, and forget units that are no longer wanted
 * once their workers have stopped.
 */
void
spool_supervise(SpoolSupervisor *s, TimestampTz now, bool refresh)
{
	int			n;
	int			i;

	if (refresh)
		refresh_units(s);
	for (n = 0; n < s->nunits; n++)
	{
		SpoolUnit  *u = &s->units[n];
		bool		running = false;

		for (i = 0; i < SPOOL_UNIT_MAX_WORKERS; i++)
		{
			tend_worker(s, u, i, now);
			running |= u->w[i].handle != NULL;
		}
		if (!u->wanted && !running)
			forget_unit(s, n--);
	}
}

/*
 * The extension is gone: no unit of the kind is wanted any more, and every
 * worker is told to stop (a registered worker that has not started yet
 * never starts).  The units, their handles and their slots are kept until
 * spool_supervise_drain sees the workers gone, so no slot is handed out
 * again while an old worker may still use it.
 */
void
spool_supervise_stop(SpoolSupervisor *s, const char *why)
{
	int			n;
	int			i;
	int			running = 0;

	for (n = 0; n < s->nunits; n++)
	{
		SpoolUnit  *u = &s->units[n];

		u->wanted = false;
		for (i = 0; i < SPOOL_UNIT_MAX_WORKERS; i++)
			if (u->w[i].handle != NULL)
			{
				TerminateBackgroundWorker(u->w[i].handle);
				running++;
			}
	}
	if (running > 0)
		ereport(LOG,
				(errcode(ERRCODE_ADMIN_SHUTDOWN),
				 errmsg("stopping %d %s workers because %s", running, s->kind->type, why)));
}

/*
 * A pass over a stopped kind (spool_supervise_stop): forget the units whose
 * workers have exited, freeing their slots.  Returns how many units still
 * wait for a worker to exit.
 */
int
spool_supervise_drain(SpoolSupervisor *s, TimestampTz now)
{
	spool_supervise(s, now, false);
	return s->nunits;
}

/*
 * Before the first worker of the kind starts for an extension (the units
 * list is empty then): free every slot.  Slots still marked in use belong to
 * units of an earlier launcher, whose workers exit by themselves
 * (spool_exit_if_orphaned); a launcher that saw a drop has freed its own.
 */
void
spool_supervise_reset(SpoolSupervisor *s)
{
	SpoolSlots *slots = s->kind->slots;
	int			i;

	if (slots == NULL || s->nunits > 0)
		return;
	LWLockAcquire(slots->lock, LW_EXCLUSIVE);
	for (i = 0; i < s->kind->max_units; i++)
		*(bool *) ((char *) slots->array + i * slots->size + slots->in_use) = false;
	LWLockRelease(slots->lock);
}

/* Describe a kind's slots (see SpoolSlots); from its shmem attach. */
void
spool_slots_attach(SpoolSlots *slots, LWLock *lock, void *array, Size size,
				   Size in_use, void (*fill) (void *slot, const SpoolUnit *u))
{
	slots->lock = lock;
	slots->array = array;
	slots->size = size;
	slots->in_use = in_use;
	slots->fill = fill;
}

/* A flag of a slot (a worker's exit_error, say), read under lock. */
bool
spool_slot_flag(LWLock *lock, const bool *flag)
{
	bool		value;

	LWLockAcquire(lock, LW_SHARED);
	value = *flag;
	LWLockRelease(lock);
	return value;
}

static void
refresh_units(SpoolSupervisor *s)
{
	int			n;

	if (!s->kind->reads_catalog)
	{
		for (n = 0; n < s->nunits; n++)
			s->units[n].wanted = false;
		s->kind->ops->list(s);
		return;
	}
	spool_begin_txn("reading what to run");

	/*
	 * The extension may have been dropped (and created again) meanwhile.
	 * Held like a worker holds it (spool_worker_check_extension), it cannot
	 * be dropped while list reads its tables.  While a DROP EXTENSION holds
	 * it, keep what runs and look again later: the launcher never waits for
	 * a drop, which may itself wait for a client's transaction.
	 */
	if (OidIsValid(s->extension) &&
		ConditionalLockDatabaseObject(ExtensionRelationId, s->extension, 0, AccessShareLock))
	{
		for (n = 0; n < s->nunits; n++)
			s->units[n].wanted = false;
		if (get_extension_oid("spool_ext", true) == s->extension)
			s->kind->ops->list(s);
		else
			s->extension_gone = true;	/* the launcher looks again at once */
	}
	spool_end_txn();
}

/* Worker i of u: notice its exit, replace it, stop it, or start it. */
static void
tend_worker(SpoolSupervisor *s, SpoolUnit *u, int i, TimestampTz now)
{
	WorkerTrack *t = &u->w[i];
	bool		wanted = u->wanted && i < u->nworkers;

	if (t->handle != NULL && !worker_stopped(s, u, i, now) && wanted &&
		s->kind->ops->check)
	{
		switch (s->kind->ops->check(u, i, now))
		{
			case SPOOL_KEEP:
				break;
			case SPOOL_RESTART:
				TerminateBackgroundWorker(t->handle);
				break;
			case SPOOL_REPLACE:
				pfree(t->handle);
				t->handle = NULL;
				t->next_start = now;
				break;
		}
	}
	if (!wanted)
	{
		if (t->handle != NULL)
			TerminateBackgroundWorker(t->handle);
		return;
	}
	if (t->handle == NULL && now >= t->next_start)
		start_worker(s, u, i, now);
}

/*
 * Has worker i of u stopped?  If so, forget its handle and schedule its
 * restart (see the file header), and tell the kind.
 */
static bool
worker_stopped(SpoolSupervisor *s, SpoolUnit *u, int i, TimestampTz now)
{
	WorkerTrack *t = &u->w[i];
	pid_t		pid;
	BgwHandleStatus status = GetBackgroundWorkerPid(t->handle, &pid);
	bool		failed;

	if (status != BGWH_STOPPED && status != BGWH_POSTMASTER_DIED)
		return false;
	pfree(t->handle);
	t->handle = NULL;
	failed = s->kind->ops->failed ? s->kind->ops->failed(u, i) : true;
	if (!failed || now - t->started_at >= (int64) HEALTHY_RUN_MS * 1000)
		t->backoff_ms = 0;
	else
		t->backoff_ms = Min(Max(t->backoff_ms * 2, RESTART_BACKOFF_MIN_MS),
							RESTART_BACKOFF_MAX_MS);
	t->next_start = TimestampTzPlusMilliseconds(now, t->backoff_ms);
	if (t->backoff_ms > 0)
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("%s exited; restarting in %d ms",
						worker_name(s, u, i), t->backoff_ms)));
	if (s->kind->ops->gone)
		s->kind->ops->gone(u, i, "it exited");
	return true;
}

static void
start_worker(SpoolSupervisor *s, SpoolUnit *u, int i, TimestampTz now)
{
	BackgroundWorker bgw;
	SpoolWorkerArgs args;
	WorkerTrack *t = &u->w[i];
	MemoryContext old;
	bool		ok;

	memset(&args, 0, sizeof(args));
	args.launcher_generation = pg_atomic_read_u32(&spool_core_shared->launcher_generation);
	args.slot = u->slot;
	args.index = i;
	args.extension = s->extension;
	strlcpy(args.name, u->name, NAMEDATALEN);
	if (s->kind->ops->prepare)
		s->kind->ops->prepare(u, i, &args);

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* The launcher starts only read-only kinds on a hot standby (launcher.c). */
	bgw.bgw_start_time = BgWorkerStart_ConsistentState;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "spool_ext");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "%s", s->kind->function);
	snprintf(bgw.bgw_name, BGW_MAXLEN, "%s", worker_name(s, u, i));
	snprintf(bgw.bgw_type, BGW_MAXLEN, "%s", s->kind->type);
	bgw.bgw_notify_pid = MyProcPid;
	memcpy(bgw.bgw_extra, &args, sizeof(args));

	/* The handle outlives the pass: allocate it where the loop reset cannot reach. */
	old = MemoryContextSwitchTo(TopMemoryContext);
	ok = RegisterDynamicBackgroundWorker(&bgw, &t->handle);
	MemoryContextSwitchTo(old);
	if (!ok)
	{
		t->handle = NULL;
		t->next_start = TimestampTzPlusMilliseconds(now, RESTART_BACKOFF_MIN_MS * 5);
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start %s", bgw.bgw_name),
				 errhint("Raise max_worker_processes: the launcher needs one slot for the promoter, one per enabled source, one per processor replica, one per outbox target shard and one per nonce worker (plus one per nonce worker being replaced).")));
		return;
	}
	t->started_at = now;
}

/* "spool processor p1/2": the kind's type, then the worker's label if any. */
static char *
worker_name(SpoolSupervisor *s, const SpoolUnit *u, int i)
{
	char	   *label = s->kind->ops->label ? s->kind->ops->label(u, i) : NULL;

	return label ? psprintf("%s %s", s->kind->type, label) : pstrdup(s->kind->type);
}

/* Unit n has no workers left: free its slot, move the last unit here. */
static void
forget_unit(SpoolSupervisor *s, int n)
{
	SpoolSlots *slots = s->kind->slots;

	if (slots && s->units[n].slot >= 0)
	{
		LWLockAcquire(slots->lock, LW_EXCLUSIVE);
		*(bool *) ((char *) slots->array + s->units[n].slot * slots->size + slots->in_use) = false;
		LWLockRelease(slots->lock);
	}
	s->units[n] = s->units[--s->nunits];
}

/*
 * The first free slot of the kind, reset for u and marked in use; -1 when
 * every one is taken.
 */
static int
claim_slot(const SpoolWorkerKind *kind, const SpoolUnit *u)
{
	SpoolSlots *slots = kind->slots;
	int			i;

	LWLockAcquire(slots->lock, LW_EXCLUSIVE);
	for (i = 0; i < kind->max_units; i++)
	{
		char	   *slot = (char *) slots->array + i * slots->size;

		if (*(bool *) (slot + slots->in_use))
			continue;
		slots->fill(slot, u);
		*(bool *) (slot + slots->in_use) = true;
		break;
	}
	LWLockRelease(slots->lock);
	return i < kind->max_units ? i : -1;
}
