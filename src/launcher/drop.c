/*-------------------------------------------------------------------------
 *
 * drop.c
 *	  DROP EXTENSION spool_ext, seen by a ProcessUtility hook: a seatbelt
 *	  (the drop is refused while signers have handed out nonces, which the
 *	  drop would forget, unless spool.allow_drop_with_nonces is on), the
 *	  workers terminated so the drop waits for none of them, and a
 *	  wake-up of the launcher when the drop (or a CREATE EXTENSION)
 *	  commits, so it stops (or starts) the workers at once rather than at
 *	  its next periodic check.
 *
 *	  The hook acts only for a role that may drop the extension (its owner
 *	  or a superuser); any other role goes straight to PostgreSQL's own
 *	  permission error, and causes no write.  Lease tokens need little
 *	  here: every grant already records the database's highest token where
 *	  a drop cannot reach it (lease.c, "the token floor"); the hook records
 *	  it once more from spool.lease_store, for tokens no grant here wrote
 *	  (restored by pg_restore).
 *
 *	  DROP SCHEMA spool CASCADE also drops the extension; it is checked
 *	  like DROP EXTENSION.  Other ways (DROP OWNED BY the extension's owner)
 *	  pass the seatbelt; the launcher notices them at its next check.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/lmgr.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/backend_status.h"

#include "launcher/launcher.h"
#include "lease/lease.h"
#include "nonce/nonce.h"
#include "outbox/outbox.h"

static ProcessUtility_hook_type prev_process_utility = NULL;
static bool wake_at_commit = false;
static bool dropped = false;	/* the transaction drops spool_ext */

static void drop_process_utility(PlannedStmt *pstmt, const char *queryString,
								 bool readOnlyTree, ProcessUtilityContext context,
								 ParamListInfo params, QueryEnvironment *queryEnv,
								 DestReceiver *dest, QueryCompletion *qc);
static bool drops_extension(Node *parsetree);
static void before_drop(Oid extension);
static void stop_workers(Oid extension);
static void drop_xact_callback(XactEvent event, void *arg);

/* From _PG_init. */
void
spool_register_drop_hook(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = drop_process_utility;
	RegisterXactCallback(drop_xact_callback, NULL);
}

static void
drop_process_utility(PlannedStmt *pstmt, const char *queryString,
					 bool readOnlyTree, ProcessUtilityContext context,
					 ParamListInfo params, QueryEnvironment *queryEnv,
					 DestReceiver *dest, QueryCompletion *qc)
{
	bool		dropping = drops_extension(pstmt->utilityStmt);

	if (dropping)
	{
		Oid			extension = get_extension_oid("spool_ext", true);

		if (OidIsValid(extension) &&
			pg_extension_ownercheck(extension, GetUserId()))
			before_drop(extension);
	}
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context,
							 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
	/* A new catalog is also worth an early look (its workers start). */
	if (dropping)
		dropped = true;
	if (dropping ||
		(IsA(pstmt->utilityStmt, CreateExtensionStmt) &&
		 strcmp(((CreateExtensionStmt *) pstmt->utilityStmt)->extname, "spool_ext") == 0))
		wake_at_commit = true;
}

/*
 * DROP EXTENSION naming spool_ext, or DROP SCHEMA naming the extension's
 * schema with CASCADE.
 */
static bool
drops_extension(Node *parsetree)
{
	DropStmt   *stmt;
	ListCell   *lc;

	if (parsetree == NULL || !IsA(parsetree, DropStmt))
		return false;
	stmt = (DropStmt *) parsetree;
	if (stmt->removeType == OBJECT_EXTENSION)
	{
		foreach(lc, stmt->objects)
			if (strcmp(strVal(lfirst(lc)), "spool_ext") == 0)
				return true;
	}
	else if (stmt->removeType == OBJECT_SCHEMA && stmt->behavior == DROP_CASCADE)
	{
		/* The extension is not relocatable: its schema is always spool. */
		foreach(lc, stmt->objects)
			if (strcmp(strVal(lfirst(lc)), "spool") == 0)
				return true;
	}
	return false;
}

/*
 * Refuse the drop while signers have handed out nonces, unless
 * spool.allow_drop_with_nonces (superuser only) says the caller saved them;
 * then record the highest lease token as the floor (grants have recorded
 * theirs already; this covers tokens that came in by pg_restore).  The
 * origin's progress is not transactional: if the drop fails later, the
 * floor stays where the tokens are, which changes nothing.
 */
static void
before_drop(Oid extension)
{
	SpoolCaller caller;
	int64		signers;

	spool_enter(&caller);
	SPI_connect();
	signers = spool_allow_drop_with_nonces ? 0 : spool_nonce_signers_in_use();
	if (signers == 0)
		spool_token_floor_record();
	SPI_finish();
	spool_leave(&caller);
	if (signers > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("cannot drop extension spool_ext: " INT64_FORMAT " signers have handed out nonces",
						signers),
				 errdetail("The drop forgets each signer's next nonce; after CREATE EXTENSION every signer would start again at nonce 0."),
				 errhint("Save the next nonces (SELECT signer, next_nonce FROM spool.nonce_signer), drop with SET spool.allow_drop_with_nonces = on (superuser), and restore them after CREATE EXTENSION with spool.nonce_set_next.")));
	stop_workers(extension);
}

/*
 * Make the drop wait for no worker: a worker transaction holds the
 * extension until it ends, and one may be long (a handler or a target
 * function that sleeps or waits for a lock).  So terminate every spool
 * worker of this database (not the launcher), then take the lock the drop
 * takes first: its queue holds back the workers the launcher starts again
 * meanwhile, before they touch any table, and once the drop commits they
 * find the extension gone and exit.  A dispatcher delivers what it holds
 * first, within spool.outbox_close_timeout.  If the drop fails, the
 * launcher has restarted the workers, as after pg_terminate_backend.
 */
static void
stop_workers(Oid extension)
{
	int			n = pgstat_fetch_stat_numbackends();
	int			i;

	for (i = 1; i <= n; i++)
	{
		LocalPgBackendStatus *l = pgstat_fetch_stat_local_beentry(i);
		PgBackendStatus *b;
		const char *type;

		if (l == NULL)
			continue;
		b = &l->backendStatus;
		if (b->st_backendType != B_BG_WORKER || b->st_databaseid != MyDatabaseId)
			continue;
		type = GetBackgroundWorkerTypeByPid(b->st_procpid);
		if (type != NULL && strncmp(type, "spool ", 6) == 0 &&
			strcmp(type, "spool launcher") != 0)
			(void) kill(b->st_procpid, SIGTERM);
	}
	LockDatabaseObject(ExtensionRelationId, extension, 0, AccessExclusiveLock);
}

/*
 * After a drop commits, wake the launcher (any drop or create: a no-op
 * elsewhere).  The drop is checked before the commit, in the transaction
 * (a drop in a subtransaction that rolled back dropped nothing).
 */
static void
drop_xact_callback(XactEvent event, void *arg)
{
	if (!wake_at_commit)
		return;
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			if (dropped)
				dropped = !OidIsValid(get_extension_oid("spool_ext", true));
			break;
		case XACT_EVENT_COMMIT:
			wake_at_commit = false;
			if (spool_core_shared == NULL)
				break;

			/*
			 * In the pipeline database, forget the outbox's shared state of
			 * the dropped catalog before any CREATE EXTENSION can commit
			 * (the launcher does it again when it notices the drop).
			 */
			if (dropped && spool_core_shared->database_oid == MyDatabaseId)
				spool_outbox_forget_catalog();
			dropped = false;
			spool_wake_launcher();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			wake_at_commit = false;
			dropped = false;
			break;
		default:
			break;
	}
}
