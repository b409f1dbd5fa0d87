/*-------------------------------------------------------------------------
 *
 * privs.h
 *	  Who is calling, and what that role may do: the door every SQL function
 *	  of spool_ext goes through (privs.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_PRIVS_H
#define SPOOL_PRIVS_H

#include "postgres.h"

/* The caller of a SQL function, while the function works for it. */
typedef struct SpoolCaller
{
	Oid			role;			/* privileges are checked against this role */
	Oid			save_user;
	int			save_sec;
	int			nestlevel;
} SpoolCaller;

/* The role the extension's own work runs as (workers and SQL functions). */
#define SPOOL_INTERNAL_ROLE BOOTSTRAP_SUPERUSERID

/* The only search_path internal SQL and user code ever run with. */
#define SPOOL_SAFE_SEARCH_PATH "pg_catalog, pg_temp"

extern void spool_enter(SpoolCaller *c);
extern void spool_leave(SpoolCaller *c);
extern bool spool_role_is_member(Oid role, Oid owner);
extern void spool_check_owner(Oid role, Oid owner, const char *kind, const char *name);
extern bool spool_may_signal(Oid role, int pid);
extern void spool_worker_pin_settings(void);

#endif							/* SPOOL_PRIVS_H */
