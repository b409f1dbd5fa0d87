/*-------------------------------------------------------------------------
 *
 * handler.h
 *	  What a processor's handler sees, inside src/processor: the replica
 *	  running it (its number and settings), the outputs it returns, and the
 *	  interface of a native handler, one built into spool_ext that keeps its
 *	  state in memory and applies entries one by one instead of being called
 *	  with jsonb state per batch (handler.c; window_alert.c is one).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_PROCESSOR_HANDLER_H
#define SPOOL_PROCESSOR_HANDLER_H

#include "core/core.h"

/* One spool entry, as a native handler looks at it. */
typedef struct SpoolEntry
{
	int64		cursor;
	Jsonb	   *value;			/* NULL for text/bytes sources */
	bool		has_ts;
	TimestampTz kafka_ts;
	const char *source;
	int32		kafka_partition;
	int64		kafka_offset;
} SpoolEntry;

/* Outputs of one call, in emission order. */
typedef struct SpoolOutputs
{
	int			n;
	int			cap;
	char	  **keys;
	Jsonb	  **payloads;
} SpoolOutputs;

/*
 * A native handler.  Its SQL function spool.<name>(jsonb, spool.entries[])
 * is what users name in create_processor; replicas call the functions below
 * instead.  config and state are the handler's own.
 */
typedef struct SpoolNativeHandler
{
	const char *name;			/* its SQL function, in schema spool */
	const char *example;		/* hint: settings that work */
	/* Check settings (SP001 on any problem) and return them parsed. */
	void	   *(*configure) (Jsonb *settings);
	/* A state from a jsonb snapshot (NULL: fresh), in a context under parent. */
	void	   *(*create) (void *config, Jsonb *snapshot, MemoryContext parent);
	void		(*destroy) (void *state);
	void		(*apply) (void *state, const SpoolEntry *e, SpoolOutputs *out);
	/* The target every output goes to. */
	const char *(*target) (void *config);
	/* The state as jsonb (with settings, if given), and a hash of it. */
	Jsonb	   *(*snapshot) (void *state, Jsonb *settings);
	uint64		(*hash) (void *state);
} SpoolNativeHandler;

extern const SpoolNativeHandler spool_window_alert_handler;

extern const SpoolNativeHandler *spool_native_handler(Oid fn);
extern Datum spool_make_outputs(int n, const char *const *targets,
								char **keys, Jsonb **payloads);

/* The replica running handlers in this process (0, NULL: none). */
extern void spool_handler_context_set(int replica_no, Jsonb *settings);
extern Jsonb *spool_handler_current_settings(void);

#endif							/* SPOOL_PROCESSOR_HANDLER_H */
