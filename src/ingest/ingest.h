/*-------------------------------------------------------------------------
 *
 * ingest.h
 *	  The door to src/ingest: Kafka sources (source.c, source_ops.c), the
 *	  ingest worker that stages their messages (consumer*.c, private header
 *	  consumer.h; json_check.c), the promoter that moves staged batches
 *	  into the spool (promoter.c), and the spool's readers (reader.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_INGEST_H
#define SPOOL_INGEST_H

#include "core/core.h"

#include "storage/condition_variable.h"

#define SPOOL_SOURCE_NAME_MAX SPOOL_PROC_NAME_MAX	/* spool_check_object_name */
#define SPOOL_MAX_SOURCES 256	/* enabled sources with a worker */

/* What ended an ingest batch (spool.ingest_stats). */
typedef enum SpoolBatchEnd
{
	BATCH_END_SIZE,				/* batch_size messages */
	BATCH_END_BYTES,			/* the byte limit */
	BATCH_END_TIME,				/* batch_ms after its first message */
	BATCH_END_STOP,				/* a gap stops the source */
	NUM_BATCH_ENDS
} SpoolBatchEnd;

/*
 * One source's counters since the server started, kept by name (a
 * restarted worker goes on counting), and which of its workers run.
 * Written by its ingest workers under the ingest lock.
 */
typedef struct SpoolSourceStats
{
	char		name[SPOOL_SOURCE_NAME_MAX + 1];	/* "": free */
	int			workers_of;		/* the worker count the running workers split by */
	uint32		workers_running;	/* bit i: worker i runs */
	uint64		errors;
	uint64		ended[NUM_BATCH_ENDS];
	SpoolHist	rows;			/* rows per batch */
	SpoolHist	batch_ms;		/* first message to staged */
	SpoolHist	stage_ms;		/* the staging transaction */
} SpoolSourceStats;

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
	pg_atomic_uint64 staged_first_at[2];	/* oldest staging commit per table, 0: none */
	pg_atomic_uint32 staging_writers[2];	/* staging transactions under way per table */
	ConditionVariable staging_cv;	/* broadcast when a table's last writer ends */
	/* Under lock: the promoter's numbers, then each source's. */
	uint64		promotions;
	SpoolHist	promote_rows;	/* entries per promotion */
	SpoolHist	promote_ms;		/* the promotion transaction */
	SpoolHist	promote_lag_ms; /* oldest staged batch to its promotion */
	SpoolSourceStats sources[SPOOL_MAX_SOURCES];
} SpoolIngestShared;

extern SpoolIngestShared *spool_ingest_shared;

extern const SpoolShmemArea spool_ingest_shmem;

/* launch.c */
extern const SpoolKindOps spool_promoter_ops;
extern const SpoolKindOps spool_source_ops;

/* promoter.c */
extern void spool_wake_promoter(void);
extern void spool_note_staged(uint32 which, TimestampTz at);
extern void spool_staging_writer_done(uint32 which);
extern SpoolSourceStats *spool_source_stats(const char *source);
extern void spool_source_stats_forget(const char *source);

#endif							/* SPOOL_INGEST_H */
