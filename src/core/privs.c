/*-------------------------------------------------------------------------
 *
 * privs.c
 *	  Acting for a caller.  The SQL functions of spool_ext are SECURITY
 *	  INVOKER C functions: spool_enter notes the calling role (the one every
 *	  privilege check is made against), then switches to the extension's own
 *	  role in a GUC nest level with search_path pinned to pg_catalog, pg_temp,
 *	  so that nothing the caller set or created changes what the internal SQL
 *	  means; spool_leave undoes both.  (SECURITY DEFINER would lose the
 *	  caller: inside it, only the outer session role is known, which inside a
 *	  worker is the bootstrap superuser.)
 *
 *	  Also the ownership rule (members of the owner role, or superusers),
 *	  with the start/stop/drop shape every definition's SQL functions share,
 *	  and the rule for signalling another backend, which is
 *	  pg_signal_backend's.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "core/core.h"

/*
 * Start working for the current user: c->role is who called; from here to
 * spool_leave the backend runs as SPOOL_INTERNAL_ROLE with search_path =
 * pg_catalog, pg_temp.  An error in between needs no cleanup: the
 * (sub)transaction's abort restores the user and the settings.
 */
void
spool_enter(SpoolCaller *c)
{
	c->role = GetUserId();
	GetUserIdAndSecContext(&c->save_user, &c->save_sec);
	SetUserIdAndSecContext(SPOOL_INTERNAL_ROLE,
						   c->save_sec | SECURITY_LOCAL_USERID_CHANGE);
	c->nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", SPOOL_SAFE_SEARCH_PATH,
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
}

/* Back to the caller: its user and settings. */
void
spool_leave(SpoolCaller *c)
{
	AtEOXact_GUC(true, c->nestlevel);
	SetUserIdAndSecContext(c->save_user, c->save_sec);
}

/* Does role have the privileges of owner (a member, or a superuser)? */
bool
spool_role_is_member(Oid role, Oid owner)
{
	return OidIsValid(owner) && has_privs_of_role(role, owner);
}

/* 42501 unless role may act as owner of the object kind name. */
void
spool_check_owner(Oid role, Oid owner, const char *kind, const char *name)
{
	char	   *owner_name;

	if (spool_role_is_member(role, owner))
		return;
	owner_name = OidIsValid(owner) ? GetUserNameFromId(owner, true) : NULL;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("must be a member of the owner of %s \"%s\"", kind, name),
			 owner_name ? errdetail("It belongs to role \"%s\".", owner_name) : 0));
}

/*
 * The row of the kind's definition name that the caller just selected (FOR
 * UPDATE), with the owner in column ownercol: SP004 if there is none, 42501
 * unless role is a member of the owner.
 */
HeapTuple
spool_owned_row(const char *kind, const char *name, int ownercol, Oid role)
{
	bool		isnull;

	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("%s \"%s\" does not exist", kind, name)));
	spool_check_owner(role,
					  DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
													 ownercol, &isnull)),
					  kind, name);
	return SPI_tuptable->vals[0];
}

/*
 * SQL functions that change a definition (start, stop, drop): for a member
 * of the owner of the kind's definition name in table (its owner column is
 * "owner"), run sql with $1 = name, then wake the launcher.
 */
void
spool_change_owned(const char *table, const char *kind, const char *name,
				   const char *sql)
{
	Oid			t[1] = {TEXTOID};
	Datum		v[1] = {CStringGetTextDatum(name)};
	SpoolCaller caller;

	spool_require_shmem();
	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args(psprintf("SELECT owner FROM %s WHERE name = $1 FOR UPDATE", table),
							  1, t, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read %s", table);
	spool_owned_row(kind, name, 1, caller.role);
	if (SPI_execute_with_args(sql, 1, t, v, NULL, false, 0) < 0)
		elog(ERROR, "could not change %s \"%s\"", kind, name);
	SPI_finish();
	spool_leave(&caller);
	spool_wake_launcher();
}

/*
 * May role signal the backend with this pid, by the rules of
 * pg_signal_backend?  Only superusers signal superusers' backends and
 * processes without a role (background workers of the server); others need
 * to be a member of the backend's role or of pg_signal_backend.
 */
bool
spool_may_signal(Oid role, int pid)
{
	PGPROC	   *proc = BackendPidGetProc(pid);
	Oid			target;

	if (proc == NULL)
		return false;
	if (superuser_arg(role))
		return true;
	target = proc->roleId;
	if (!OidIsValid(target) || superuser_arg(target))
		return false;
	return has_privs_of_role(role, target) ||
		has_privs_of_role(role, ROLE_PG_SIGNAL_BACKEND);
}

/*
 * At the start of a worker: settings that ALTER DATABASE ... SET (which a
 * database owner may run) or ALTER ROLE ... SET would otherwise hand to the
 * worker are pinned to what the internal SQL is written for.
 */
void
spool_worker_pin_settings(void)
{
	static const char *const pinned[][2] = {
		{"search_path", SPOOL_SAFE_SEARCH_PATH},
		{"default_transaction_read_only", "off"},
		{"default_transaction_isolation", "read committed"},
		{"statement_timeout", "0"},
		{"lock_timeout", "0"},
		{"idle_in_transaction_session_timeout", "0"},
	};
	int			i;

	for (i = 0; i < lengthof(pinned); i++)
		SetConfigOption(pinned[i][0], pinned[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}
