/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  What every background worker of spool_ext shares: its arguments, how
 *	  it attaches (signals, database, pinned settings, a name in
 *	  pg_stat_activity), the start of each pass of its loop, and how it
 *	  notices that the launcher that started it is gone.  Also waking the
 *	  launcher.
 *
 *	  Every worker of a kind has the same bgw_type ("spool processor"), so
 *	  pg_stat_activity.backend_type groups them; its instance name
 *	  ("spool processor p1/2") is its application_name.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/lmgr.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "core/core.h"

PG_FUNCTION_INFO_V1(spool_launcher_wakeup);

static SpoolWorkerArgs worker_args;
static bool wake_at_commit = false;

static void forget_identity(int code, Datum arg);
static void set_launcher_latch(void);
static void wake_xact_callback(XactEvent event, void *arg);

static void
set_launcher_latch(void)
{
	Latch	   *latch;

	LWLockAcquire(spool_core_shared->lock, LW_SHARED);
	latch = spool_core_shared->launcher_latch;
	LWLockRelease(spool_core_shared->lock);
	if (latch)
		SetLatch(latch);
}

/*
 * Wake the launcher: a source, processor or target was created or changed.
 * Inside a transaction the wake-up waits for its commit (and an abort drops
 * it): a launcher woken earlier would read the catalog without the change
 * and only see it at its next periodic check, a second later.
 */
void
spool_wake_launcher(void)
{
	static bool registered = false;

	if (!IsTransactionState())
	{
		set_launcher_latch();
		return;
	}
	if (!registered)
	{
		RegisterXactCallback(wake_xact_callback, NULL);
		registered = true;
	}
	wake_at_commit = true;
}

static void
wake_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			if (wake_at_commit && spool_core_shared != NULL)
				set_launcher_latch();
			wake_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_at_commit = false;
			break;
		default:
			break;
	}
}

/*
 * SQL: spool._launcher_wakeup() — called at CREATE EXTENSION so the launcher
 * starts the workers at once instead of at its next periodic check.
 */
Datum
spool_launcher_wakeup(PG_FUNCTION_ARGS)
{
	if (spool_core_shared != NULL)
		spool_wake_launcher();
	PG_RETURN_VOID();
}

/* This worker's arguments, as the supervisor gave them (supervise.c). */
const SpoolWorkerArgs *
spool_worker_args(void)
{
	static bool loaded = false;

	if (!loaded && MyBgworkerEntry != NULL)
	{
		memcpy(&worker_args, MyBgworkerEntry->bgw_extra, sizeof(worker_args));
		loaded = true;
	}
	return &worker_args;
}

/*
 * Keep memory the worker frees for its reuse, for a worker whose every
 * batch allocates and frees megabytes: glibc would otherwise give the freed
 * top of the heap, and each block above its adaptive mmap threshold, back
 * to the kernel after each batch, and the next batch would fault the same
 * pages in again, zeroed.  A fixed mmap threshold and a high trim threshold
 * keep them; the peak stays what one batch needs.
 */
void
spool_worker_keep_memory(size_t mmap_threshold, size_t trim_threshold)
{
#ifdef __GLIBC__
	(void) mallopt(M_MMAP_THRESHOLD, (int) mmap_threshold);
	(void) mallopt(M_TRIM_THRESHOLD, (int) trim_threshold);
#endif
}

/*
 * The start of every dynamic worker: signal handlers (on_sigterm, or die),
 * a connection to database (InvalidOid: spool.database), the settings
 * internal SQL depends on pinned, and its instance name shown in
 * pg_stat_activity.application_name.
 */
void
spool_worker_attach(Oid database, pqsigfunc on_sigterm)
{
	(void) spool_worker_args();
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, on_sigterm ? on_sigterm : die);
	BackgroundWorkerUnblockSignals();
	if (OidIsValid(database))
		BackgroundWorkerInitializeConnectionByOid(database, InvalidOid, 0);
	else
		BackgroundWorkerInitializeConnection(spool_database, NULL, 0);
	spool_worker_pin_settings();
	SetConfigOption("application_name", MyBgworkerEntry->bgw_name,
					PGC_USERSET, PGC_S_SESSION);
}

/*
 * The start of a pass of a worker's loop: interrupts, an exit if the
 * launcher that started the worker is gone (orphanable), a pending
 * configuration reload, and cxt (if any) reset and made current.
 */
void
spool_worker_pass(MemoryContext cxt, bool orphanable)
{
	if (cxt)
	{
		MemoryContextReset(cxt);
		MemoryContextSwitchTo(cxt);
	}
	CHECK_FOR_INTERRUPTS();
	if (orphanable)
		spool_exit_if_orphaned();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}

/*
 * Exit quietly when the launcher that started this worker is gone (a new
 * launcher has started its own workers, or will).  Called in worker loops.
 */
void
spool_exit_if_orphaned(void)
{
	if (pg_atomic_read_u32(&spool_core_shared->launcher_generation) !=
		worker_args.launcher_generation)
	{
		ereport(LOG, (errcode(ERRCODE_ADMIN_SHUTDOWN),
					  errmsg("%s: the launcher that started it is gone; exiting",
							 MyBgworkerEntry->bgw_name)));
		proc_exit(0);
	}
}

/*
 * At the start of each transaction of a worker the launcher started for an
 * installed extension: hold the extension (a share lock on the pg_extension
 * object, which DROP EXTENSION locks exclusively before it drops anything)
 * for the rest of the transaction, and exit quietly if it is gone.  So no
 * DROP EXTENSION commits while a worker's transaction runs, and a worker
 * never starts one on a catalog made by a later CREATE EXTENSION (its
 * kept plans would find the new tables by name).
 */
void
spool_worker_check_extension(void)
{
	Oid			extension;

	if (MyBgworkerEntry == NULL)
		return;
	extension = spool_worker_args()->extension;
	if (!OidIsValid(extension))
		return;					/* the launcher, or not started for one */
	LockDatabaseObject(ExtensionRelationId, extension, 0, AccessShareLock);
	if (get_extension_name(extension) != NULL)
		return;
	ereport(LOG,
			(errcode(ERRCODE_ADMIN_SHUTDOWN),
			 errmsg("%s: the extension spool_ext it worked for was dropped; exiting",
					MyBgworkerEntry->bgw_name)));
	proc_exit(0);
}

/*
 * This worker's lease owner name, "<kind>:<instance>:<pid>", registered as
 * live until the worker exits or the launcher revokes it.
 */
const char *
spool_worker_owner(const char *kind, const char *instance)
{
	SpoolIdentity *me = &spool_identities[MyProc->pgprocno];

	LWLockAcquire(spool_core_shared->lock, LW_EXCLUSIVE);
	me->pid = MyProcPid;
	snprintf(me->owner, SPOOL_OWNER_MAX, "%s:%s:%d", kind, instance, (int) MyProcPid);
	LWLockRelease(spool_core_shared->lock);
	before_shmem_exit(forget_identity, (Datum) 0);
	return pstrdup(me->owner);
}

static void
forget_identity(int code, Datum arg)
{
	spool_worker_owner_revoke(MyProcPid);
}

/* The worker with this pid no longer speaks for its owner name. */
void
spool_worker_owner_revoke(pid_t pid)
{
	int			i;

	LWLockAcquire(spool_core_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < MaxBackends; i++)
		if (spool_identities[i].pid == pid && pid != 0)
		{
			spool_identities[i].pid = 0;
			spool_identities[i].owner[0] = '\0';
		}
	LWLockRelease(spool_core_shared->lock);
}

/*
 * Is holder a worker's owner name ("...:<pid>") that no live worker holds?
 * Its lease may then be taken over at once.  Names of another form (a SQL
 * client's) are never gone.
 */
bool
spool_owner_is_gone(const char *holder)
{
	const char *colon = strrchr(holder, ':');
	bool		live = false;
	int			i;

	if (colon == NULL || colon[1] == '\0' || strspn(colon + 1, "0123456789") != strlen(colon + 1))
		return false;
	LWLockAcquire(spool_core_shared->lock, LW_SHARED);
	for (i = 0; i < MaxBackends && !live; i++)
		live = spool_identities[i].pid != 0 && strcmp(spool_identities[i].owner, holder) == 0;
	LWLockRelease(spool_core_shared->lock);
	return !live;
}
