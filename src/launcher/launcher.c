/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The spool launcher: a static background worker in the database named by
 *	  spool.database.  Once the extension exists there, it keeps every kind
 *	  of dynamic worker running through the one supervisor (core's
 *	  supervise.c): the promoter, one ingest worker per enabled source, the
 *	  replicas of every enabled processor, one dispatcher per outbox target
 *	  shard, and the nonce service workers.  The table of kinds below names
 *	  each kind; its subsystem says what to run and keeps its shared slots;
 *	  this file only decides when to look.  When the extension is dropped
 *	  (or dropped and created again: a new oid), it stops them all, and
 *	  starts workers for a new extension only once every old one has
 *	  exited and freed its slot.  While pg_restore is connected to the database,
 *	  an extension that appears there is not yet acted on: its rows may be
 *	  half restored (docs/operations.md, "Backup and restore").  Nor is an
 *	  extension whose catalog version is not this library's (SPOOL_EXT_VERSION):
 *	  after a new library is installed and the server restarted, the workers
 *	  wait for ALTER EXTENSION spool_ext UPDATE; if the catalog is updated
 *	  under a running library, its workers stop until the restart that loads
 *	  the library of that version (docs/operations.md, "Upgrading").
 *
 *	  It also runs on a hot standby (BgWorkerStart_ConsistentState), where
 *	  it only reads.  While recovery is in progress it starts nothing, but
 *	  with spool.standby_processors the replicas of every enabled processor:
 *	  they fold the replicated spool read-only up to the replicated committed
 *	  cursor (replica.c), every other kind writes.  When recovery ends (a
 *	  promotion) it starts every other kind; the processor replicas it
 *	  already runs stay (same supervisor, same slots) and one of them takes
 *	  the output gate at once.  Without the setting, nothing of spool_ext but
 *	  the launcher runs on a standby, and every worker starts at promotion
 *	  and resumes from the replicated tables.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xlog.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest/ingest.h"
#include "launcher/launcher.h"
#include "nonce/nonce.h"
#include "outbox/outbox.h"
#include "processor/processor.h"

PGDLLEXPORT void spool_launcher_main(Datum main_arg);

PG_FUNCTION_INFO_V1(spool_library_version);

#define LAUNCHER_NAPTIME_MS			250
#define EXTENSION_CHECK_MS			2000
#define CATALOG_CHECK_MS			1000
#define DRAIN_WARN_MS				10000

/*
 * Every kind of dynamic worker, in the order they are started: its bgw_type,
 * entry point, name in messages, most units, whether its units come from the
 * catalog, what its subsystem does for the supervisor, and its shared slots.
 */
static const SpoolWorkerKind kinds[] = {
	{"spool promoter", "spool_promoter_main", "promoters", 1, false,
	&spool_promoter_ops, NULL},
	{"spool ingest", "spool_ingest_main", "enabled sources", SPOOL_MAX_SOURCES, true,
	&spool_source_ops, NULL},
	{"spool processor", "spool_processor_main", "enabled processors", SPOOL_MAX_PROCESSORS, true,
	&spool_processor_ops, &spool_processor_slots},
	{"spool dispatch", "spool_dispatch_main", "dispatcher shards", SPOOL_MAX_DISPATCHERS, true,
	&spool_dispatcher_ops, &spool_dispatcher_slots},
	{"spool nonce worker", "spool_nonce_worker_main", "nonce workers", SPOOL_MAX_NONCE_WORKERS, false,
	&spool_nonce_worker_ops, NULL},
};

static SpoolSupervisor *supervisors[lengthof(kinds)];
static bool live[lengthof(kinds)];	/* the kind's workers may run now */

static void launcher_attach(void);
static void launcher_detach(int code, Datum arg);
static Oid	extension_installed(Oid running, bool *other_version);
static char *catalog_version(MemoryContext cxt, Oid *oid);
static void stop_all(const char *why, bool dropped);
static bool drain_all(TimestampTz now, TimestampTz since);
static bool restore_running(void);
static void supervise_all(TimestampTz now, bool refresh);
static bool kind_allowed(int k, bool recovering);
static bool extension_lost(void);

void
spool_register_launcher(void)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_ConsistentState;
	bgw.bgw_restart_time = 5;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "spool_ext");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "spool_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "spool launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "spool launcher");
	RegisterBackgroundWorker(&bgw);
}

void
spool_launcher_main(Datum main_arg)
{
	TimestampTz next_check = 0;
	TimestampTz next_catalog_check = 0;
	TimestampTz drain_since = 0;
	Oid			installed = InvalidOid;
	bool		draining = false;
	MemoryContext loop_cxt;
	int			k;

	launcher_attach();
	for (k = 0; k < lengthof(kinds); k++)
		supervisors[k] = spool_supervisor_create(&kinds[k]);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "spool launcher loop",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TimestampTz now;
		int			rc;
		bool		refresh;

		/* Names and messages built in a pass are freed with it. */
		spool_worker_pass(loop_cxt, false);

		now = GetCurrentTimestamp();
		if (now >= next_check)
		{
			bool		other_version;
			Oid			found = extension_installed(installed, &other_version);

			next_check = TimestampTzPlusMilliseconds(now, EXTENSION_CHECK_MS);
			if (OidIsValid(installed) && found != installed)
			{
				/* Dropped, or dropped and created again: a new catalog. */
				stop_all(other_version ?
						 "the extension was updated to a version other than the library's" :
						 OidIsValid(found) ?
						 "the extension was dropped and created again" :
						 "the extension was dropped", !other_version);
				installed = InvalidOid;
				draining = true;
				drain_since = now;
			}
			if (!draining && !OidIsValid(installed) && OidIsValid(found))
			{
				/* On a hot standby only the kinds that run there start now. */
				bool		recovering = RecoveryInProgress();

				installed = found;
				for (k = 0; k < lengthof(kinds); k++)
				{
					supervisors[k]->extension = installed;
					spool_supervise_reset(supervisors[k]);
					live[k] = kind_allowed(k, recovering);
					if (live[k] && kinds[k].ops->reset)
						kinds[k].ops->reset();
				}
			}
		}
		if (draining && drain_all(now, drain_since))
		{
			draining = false;
			next_check = 0;		/* a new extension may be waiting */
			continue;
		}
		if (OidIsValid(installed))
		{
			refresh = now >= next_catalog_check;
			supervise_all(now, refresh);
			if (refresh)
				next_catalog_check = TimestampTzPlusMilliseconds(now, CATALOG_CHECK_MS);
			if (extension_lost())
			{
				next_check = 0; /* see at once what became of it */
				continue;
			}
		}

		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   LAUNCHER_NAPTIME_MS, PG_WAIT_EXTENSION);
		if (rc & WL_LATCH_SET)
		{
			/*
			 * A wakeup: CREATE or DROP EXTENSION, or a definition changed;
			 * look for the extension and read the catalog again.
			 */
			next_check = 0;
			next_catalog_check = 0;
		}
		ResetLatch(MyLatch);
	}
}

/*
 * The extension was dropped (or updated to another version than the
 * library's): tell every kind's workers to stop.  When it was dropped, each
 * subsystem also forgets what the old catalog's objects left in shared
 * memory (requests waiting for a nonce fail at once).  Their slots are freed
 * as the workers exit (drain_all).
 */
static void
stop_all(const char *why, bool dropped)
{
	int			k;

	ereport(LOG,
			(errcode(ERRCODE_ADMIN_SHUTDOWN),
			 errmsg("spool launcher: %s; stopping every spool worker", why)));
	for (k = 0; k < lengthof(kinds); k++)
	{
		spool_supervise_stop(supervisors[k], why);
		supervisors[k]->extension = InvalidOid;
		if (dropped && kinds[k].ops->dropped)
			kinds[k].ops->dropped();
	}
}

/*
 * A pass while the workers of a dropped extension stop: true once none is
 * left.  No worker starts for a new extension before then, so an old worker
 * never shares a slot with a new one.  Says once after a while which kinds
 * it still waits for (a worker that does not react to SIGTERM).
 */
static bool
drain_all(TimestampTz now, TimestampTz since)
{
	static TimestampTz warned_for = 0;
	int			left = 0;
	int			k;

	for (k = 0; k < lengthof(kinds); k++)
		left += spool_supervise_drain(supervisors[k], now);
	if (left == 0)
	{
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("spool launcher: every worker of the dropped extension has stopped")));
		return true;
	}
	if (warned_for != since &&
		now - since >= (int64) DRAIN_WARN_MS * 1000)
	{
		warned_for = since;
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("spool launcher: %d units of the dropped extension still have workers running after %d ms",
						left, DRAIN_WARN_MS),
				 errhint("No spool worker starts until they exit; see pg_stat_activity for spool workers that ignore SIGTERM.")));
	}
	return false;
}

/*
 * Connect, and publish this launcher: its generation makes the workers of an
 * earlier launcher exit (spool_exit_if_orphaned).
 */
static void
launcher_attach(void)
{
	spool_worker_attach(InvalidOid, NULL);
	pg_atomic_fetch_add_u32(&spool_core_shared->launcher_generation, 1);
	LWLockAcquire(spool_core_shared->lock, LW_EXCLUSIVE);
	spool_core_shared->launcher_pid = MyProcPid;
	spool_core_shared->launcher_latch = MyLatch;
	spool_core_shared->database_oid = MyDatabaseId;
	LWLockRelease(spool_core_shared->lock);
	before_shmem_exit(launcher_detach, (Datum) 0);
}

static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(spool_core_shared->lock, LW_EXCLUSIVE);
	if (spool_core_shared->launcher_pid == MyProcPid)
	{
		spool_core_shared->launcher_pid = 0;
		spool_core_shared->launcher_latch = NULL;
	}
	LWLockRelease(spool_core_shared->lock);
}

/*
 * The extension's oid when it exists, has this library's version and its
 * workers may run, else InvalidOid (with *other_version set when it exists
 * in another version: a catalog of another version than this library's
 * counts as not installed at any time).  An extension that appears while a
 * pg_restore session is connected to this database counts as not installed
 * until that session is gone, so no worker runs on a half restored database
 * (a restore made with --single-transaction shows the extension only with
 * all its rows anyway).  Once the workers run for it (running), a
 * pg_restore session changes nothing.  A new oid is a new catalog (DROP
 * then CREATE EXTENSION).
 */
static Oid
extension_installed(Oid running, bool *other_version)
{
	static bool restore_logged = false;
	static char *version_logged = NULL;
	char	   *version;
	Oid			found = InvalidOid;
	bool		restoring = false;
	MemoryContext cxt = CurrentMemoryContext;

	spool_begin_txn("checking for spool_ext");
	version = catalog_version(cxt, &found);
	*other_version = version != NULL && strcmp(version, SPOOL_EXT_VERSION) != 0;
	if (version != NULL && !*other_version && found != running)
		restoring = restore_running();
	spool_end_txn();

	if (restoring && !restore_logged)
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("spool_ext waits for pg_restore to finish before starting workers")));
	restore_logged = restoring;

	if (*other_version && (version_logged == NULL || strcmp(version_logged, version) != 0))
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("spool_ext workers wait: the library is version %s, the extension in database \"%s\" is version %s",
						SPOOL_EXT_VERSION, spool_database, version),
				 errhint("Run ALTER EXTENSION spool_ext UPDATE TO '%s' there, or, if the extension is newer, install its library and restart the server.",
						 SPOOL_EXT_VERSION)));
	if (version_logged != NULL)
		pfree(version_logged);
	version_logged = *other_version ? MemoryContextStrdup(TopMemoryContext, version) : NULL;

	return version != NULL && !*other_version && !restoring ? found : InvalidOid;
}

/*
 * spool.library_version(): the version this library runs against.
 */
Datum
spool_library_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(SPOOL_EXT_VERSION));
}

/*
 * The installed extension's version, allocated in cxt, and its oid in *oid,
 * or NULL if it is not installed.  Needs a transaction.
 */
static char *
catalog_version(MemoryContext cxt, Oid *oid)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	char	   *version = NULL;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("spool_ext"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		d = heap_getattr(tuple, Anum_pg_extension_extversion,
									 RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = MemoryContextStrdup(cxt, TextDatumGetCString(d));
		*oid = ((Form_pg_extension) GETSTRUCT(tuple))->oid;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/*
 * A superuser's client backend of this database named pg_restore (its
 * default application_name), within the current transaction's snapshot of
 * the backends' status.  Only a superuser can restore this extension; any
 * other role could name its session so and hold the workers back.
 */
static bool
restore_running(void)
{
	int			n = pgstat_fetch_stat_numbackends();
	int			i;

	for (i = 1; i <= n; i++)
	{
		LocalPgBackendStatus *l = pgstat_fetch_stat_local_beentry(i);
		PgBackendStatus *b;

		if (l == NULL)
			continue;
		b = &l->backendStatus;
		if (b->st_backendType == B_BACKEND && b->st_databaseid == MyDatabaseId &&
			b->st_procpid != MyProcPid && strcmp(b->st_appname, "pg_restore") == 0 &&
			superuser_arg(b->st_userid))
			return true;
	}
	return false;
}

/*
 * May kind k run now (the extension being installed)?  During recovery (a
 * hot standby), only the processor replicas and only with
 * spool.standby_processors: every other kind writes.
 */
static bool
kind_allowed(int k, bool recovering)
{
	if (!recovering)
		return true;
	return kinds[k].ops == &spool_processor_ops && spool_standby_processors;
}

/*
 * Start, stop and tend every kind.  A kind that may run now and did not
 * is reset first (nothing of it runs yet); one that may no longer run is
 * stopped.  Kinds whose units come from the catalog re-read it with
 * refresh; the others (a fixed number of workers) are listed every pass,
 * which is free.  Once recovery has ended, RecoveryInProgress() costs
 * nothing.
 */
static void
supervise_all(TimestampTz now, bool refresh)
{
	static bool recovery_logged = false;
	bool		recovering = RecoveryInProgress();
	int			k;

	if (recovering != recovery_logged)
	{
		if (recovering)
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("spool_ext on a hot standby: %s",
							spool_standby_processors ?
							"processor replicas follow the replicated spool read-only" :
							"no worker runs until the end of recovery")));
		else
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("spool_ext: recovery has ended; starting every worker")));
		recovery_logged = recovering;
	}
	for (k = 0; k < lengthof(kinds); k++)
	{
		bool		allowed = kind_allowed(k, recovering);

		if (live[k] && !allowed)
			spool_supervise_stop(supervisors[k], "spool.standby_processors was turned off");
		if (!live[k] && allowed && kinds[k].ops->reset)
			kinds[k].ops->reset();
		live[k] = allowed;
		if (allowed)
			spool_supervise(supervisors[k], now, refresh || !kinds[k].reads_catalog);
		else
			(void) spool_supervise_drain(supervisors[k], now);	/* frees stopped units' slots */
	}
}

/*
 * Did a refresh find the extension dropped?  (Its wake-up may have been
 * consumed by the lock wait behind the drop.)
 */
static bool
extension_lost(void)
{
	bool		lost = false;
	int			k;

	for (k = 0; k < lengthof(kinds); k++)
	{
		lost |= supervisors[k]->extension_gone;
		supervisors[k]->extension_gone = false;
	}
	return lost;
}
