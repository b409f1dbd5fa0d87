/*-------------------------------------------------------------------------
 *
 * internal_lock.h
 *	  Session locks in a keyspace of spool_ext's own (internal_lock.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_INTERNAL_LOCK_H
#define SPOOL_INTERNAL_LOCK_H

#include "postgres.h"

/* What a lock is about; part of the tag, so kinds never collide. */
typedef enum SpoolLockKind
{
	SPOOL_LOCK_INGEST = 1,		/* one ingest worker per source */
	SPOOL_LOCK_PROCESSOR = 2,	/* the active replica of a processor */
	SPOOL_LOCK_DISPATCH = 3		/* one worker per target shard */
} SpoolLockKind;

extern bool spool_internal_lock(SpoolLockKind kind, const char *name, uint32 key);
extern void spool_internal_unlock(SpoolLockKind kind, const char *name, uint32 key);
extern void spool_internal_locks_recheck(void);

#endif							/* SPOOL_INTERNAL_LOCK_H */
