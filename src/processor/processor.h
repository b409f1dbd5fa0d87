/*-------------------------------------------------------------------------
 *
 * processor.h
 *	  Processors: replicated deterministic handlers over the spool.  Shared
 *	  between the SQL functions (processor_admin.c), the replica worker
 *	  (processor.c) and the launcher (processor_launch.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_PROCESSOR_H
#define SPOOL_PROCESSOR_H

#include "postgres.h"

#include "utils/jsonb.h"

#define SPOOL_PROCESSOR_DEFAULT_REPLICAS	2
#define SPOOL_PROCESSOR_DEFAULT_BATCH		1000
#define SPOOL_PROCESSOR_DEFAULT_TTL_MS		5000
#define SPOOL_PROCESSOR_DEFAULT_CHECKPOINT	100000
#define SPOOL_PROCESSOR_MAX_BATCH			100000

/* Validated processor options (see docs/processors.md). */
typedef struct SpoolProcessorOptions
{
	int			nsources;		/* 0: every source */
	char	  **sources;
	int			replicas;
	int			batch_size;
	int64		lease_ttl_ms;
	int64		checkpoint_every;
	int64		start_cursor;	/* -1: earliest, -2: latest */
	char	   *run_as;			/* NULL: the creating role */
	Jsonb	   *handler;		/* handler settings, NULL if none */
} SpoolProcessorOptions;

extern SpoolProcessorOptions *spool_parse_processor_options(Jsonb *options);
extern Jsonb *spool_processor_options_jsonb(SpoolProcessorOptions *o);
extern Oid	spool_window_alert_oid(void);

/* Set in a processor replica (processor.c); 0 and NULL elsewhere. */
extern int	spool_current_replica_no;
extern Jsonb *spool_current_handler_settings(void);

/* Launcher side (processor_launch.c) */
extern void spool_supervise_processors(TimestampTz now, bool refresh);
extern void spool_stop_processors(void);

#endif							/* SPOOL_PROCESSOR_H */
