/*-------------------------------------------------------------------------
 *
 * usercode.c
 *	  The box user code runs in, wherever a worker calls it (a processor's
 *	  handler, a sql target's function, anything later): PostgreSQL's own
 *	  pattern for running someone else's code from a privileged process.
 *
 *	  Between spool_box_open and spool_box_close the backend runs as the
 *	  given role, as a security-restricted operation (no temporary objects,
 *	  no SET ROLE, no cursors or prepared statements that outlive it), in a
 *	  GUC nest level with search_path pinned to pg_catalog, pg_temp, and,
 *	  for handlers, in a read-only transaction.  Closing the box rolls every
 *	  setting back, whether the code changed it with SET LOCAL, SET or
 *	  set_config(..., false), and checks that the worker still holds its
 *	  internal session locks (pg_advisory_unlock_all would release them).
 *
 *	  On an error inside the box, spool_box_abandon it in PG_CATCH (or let
 *	  the (sub)transaction's abort restore the user and the settings).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include "core/core.h"

void
spool_box_open(SpoolBox *box, Oid role, bool read_only)
{
	Assert(!box->open);
	GetUserIdAndSecContext(&box->save_user, &box->save_sec);
	SetUserIdAndSecContext(role, box->save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	box->nestlevel = NewGUCNestLevel();
	box->open = true;
	(void) set_config_option("search_path", SPOOL_SAFE_SEARCH_PATH,
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
	if (read_only)
		(void) set_config_option("transaction_read_only", "on",
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
								 true, 0, false);
}

/*
 * Leave the box after an error: settings back to what they were when it was
 * opened, the worker's own user again.  Does nothing if it is not open.
 */
void
spool_box_abandon(SpoolBox *box)
{
	if (!box->open)
		return;
	box->open = false;
	AtEOXact_GUC(false, box->nestlevel);
	SetUserIdAndSecContext(box->save_user, box->save_sec);
}

/* Leave the box normally: as spool_box_abandon, and take back our locks. */
void
spool_box_close(SpoolBox *box)
{
	spool_box_abandon(box);
	spool_internal_locks_recheck();
}
