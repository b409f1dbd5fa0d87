/*-------------------------------------------------------------------------
 *
 * lease.h
 *	  The door to src/lease: leases with fencing tokens (lease.c), for SQL
 *	  clients and for spool_ext's own workers, and the registry of the fences
 *	  each backend holds in its open transaction.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_LEASE_H
#define SPOOL_LEASE_H

#include "core/core.h"

#include "storage/spin.h"

#define SPOOL_FENCES_PER_BACKEND 4

/* The role of the leases of spool_ext's own workers (lease_store.role). */
#define SPOOL_LEASE_INTERNAL InvalidOid

typedef struct SpoolLease
{
	bool		held;			/* false: another owner has it */
	bool		took_over;		/* newly granted; another owner had it before */
	bool		blocked;		/* not granted: the old holder's fenced
								 * transaction is still open */
	int64		token;
	TimestampTz expires_at;
} SpoolLease;

typedef bool (*spool_may_steal_fn) (const char *holder);

extern SpoolLease spool_lease_acquire_internal(const char *resource,
											   const char *owner,
											   int64 ttl_us,
											   spool_may_steal_fn may_steal,
											   Oid role);
extern void spool_lease_check_role(const char *resource, Oid lease_role, Oid role);
extern void spool_fence_register(const char *resource, int64 token);
extern bool spool_lease_extend(const char *resource, const char *owner,
							   int64 token, int64 ttl_us, TimestampTz *expires,
							   Oid role);

/* A lease row as a fencing check sees it. */
typedef struct SpoolLeaseRow
{
	bool		found;
	char	   *owner;			/* NULL when never granted */
	int64		token;
	bool		live;			/* expires_at > clock_timestamp() */
	TimestampTz expires_at;
	bool		has_role;		/* false: never granted */
	Oid			role;			/* SPOOL_LEASE_INTERNAL: spool_ext's own */
} SpoolLeaseRow;

/*
 * Rows of another subsystem that the leases named prefix || name guard.  A
 * new grant locks the guarded row (lock, in the grant's transaction, before
 * the grant) and stamps it with the new token (granted).  Operations that
 * lock the guarded row are then fenced by it: no newer grant commits before
 * they end.  They check their token with spool_fence_check.
 */
typedef struct SpoolLeaseGuard
{
	const char *prefix;			/* "signer:" */
	const char *noun;			/* in messages: "signer" */
	void		(*lock) (const char *name);
	void		(*granted) (const char *name, int64 token, Oid role);
} SpoolLeaseGuard;

extern void spool_lease_register_guard(const SpoolLeaseGuard *guard);
extern bool spool_fence_lease(const char *resource, int64 token, Oid role, bool raise);
extern bool spool_fence_check(const char *resource, const SpoolLeaseGuard *guard,
							  const SpoolLeaseRow *row, const char *owner,
							  int64 token, Oid role, bool raise);

/* What one backend has fenced in its current transaction. */
typedef struct SpoolFenceSlot
{
	slock_t		mutex;
	pid_t		pid;
	int			nfences;
	uint32		reshash[SPOOL_FENCES_PER_BACKEND];
	int64		token[SPOOL_FENCES_PER_BACKEND];
} SpoolFenceSlot;

extern const SpoolShmemArea spool_lease_shmem;

/* The token floor (lease.c): the database's highest token, kept outside the extension. */
extern void spool_token_floor_record(void);

#endif							/* SPOOL_LEASE_H */
