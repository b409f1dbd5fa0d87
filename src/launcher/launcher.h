/*-------------------------------------------------------------------------
 *
 * launcher.h
 *	  How the launcher tracks the dynamic workers it keeps running; shared by
 *	  launcher.c and processor_launch.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_LAUNCHER_H
#define SPOOL_LAUNCHER_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "postmaster/bgworker.h"

/* A dynamic worker the launcher keeps running. */
typedef struct WorkerTrack
{
	char		name[NAMEDATALEN];	/* source name, for ingest workers */
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
	TimestampTz next_start;
	int			backoff_ms;
	bool		wanted;
} WorkerTrack;

extern bool spool_track_exited(WorkerTrack *t, TimestampTz now, const char *what);
extern bool spool_track_start(WorkerTrack *t, BackgroundWorker *bgw, TimestampTz now);

#endif							/* SPOOL_LAUNCHER_H */
