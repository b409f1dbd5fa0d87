/*-------------------------------------------------------------------------
 *
 * drop.c
 *	  DROP EXTENSION spool_ext, seen by a ProcessUtility hook: a seatbelt
 *	  (the drop is refused while signers have handed out nonces, which the
 *	  drop would forget, unless spool.allow_drop_with_nonces is on), and a
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

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/acl.h"

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
static void before_drop(void);
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
			before_drop();
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
before_drop(void)
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
