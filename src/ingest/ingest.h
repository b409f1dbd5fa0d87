/*-------------------------------------------------------------------------
 *
 * ingest.h
 *	  The door to src/ingest: Kafka sources (source.c), the ingest worker
 *	  that stages their messages (consumer.c, json_check.c), the promoter
 *	  that moves staged batches into the spool (promoter.c), and the spool's
 *	  readers (reader.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_INGEST_H
#define SPOOL_INGEST_H

#include "core/core.h"

#include "storage/condition_variable.h"

#define SPOOL_SOURCE_NAME_MAX SPOOL_PROC_NAME_MAX	/* spool_check_object_name */
#define SPOOL_MAX_SOURCES 256	/* enabled sources with a worker */

/*
 * What the ingest workers and the promoter share.  Ingest workers fill the
 * active staging table (0 or 1); the promoter flips it, promotes the other
 * one, and publishes the highest committed cursor.
 */
typedef struct SpoolIngestShared
{
	LWLock	   *lock;			/* guards promoter_latch */
	Latch	   *promoter_latch;
	pg_atomic_uint64 published_cursor;	/* highest committed cursor */
	pg_atomic_uint32 staging_active;	/* staging table the workers fill: 0/1 */
	pg_atomic_uint64 staged_msgs[2];	/* messages staged per table, upper bound */
	pg_atomic_uint64 staged_other[2];	/* dead-letter and gap rows staged per table */
	ConditionVariable spool_cv; /* broadcast after each promotion */
} SpoolIngestShared;

extern SpoolIngestShared *spool_ingest_shared;

extern const SpoolShmemArea spool_ingest_shmem;

/* launch.c */
extern const SpoolKindOps spool_promoter_ops;
extern const SpoolKindOps spool_source_ops;

/* promoter.c */
extern void spool_wake_promoter(void);

#endif							/* SPOOL_INGEST_H */
