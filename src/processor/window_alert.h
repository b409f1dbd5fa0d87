/*-------------------------------------------------------------------------
 *
 * window_alert.h
 *	  The built-in window_alert handler: its settings, its native state, and
 *	  the entry points the processor worker uses to run it without going
 *	  through jsonb state on every batch.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_WINDOW_ALERT_H
#define SPOOL_WINDOW_ALERT_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "utils/jsonb.h"

typedef struct WAConfig WAConfig;
typedef struct WAState WAState;

/* One spool entry, as far as window_alert looks at it. */
typedef struct WAEntry
{
	int64		cursor;
	Jsonb	   *value;			/* NULL for text/bytes sources */
	bool		has_ts;
	TimestampTz kafka_ts;
	const char *source;
	int32		kafka_partition;
	int64		kafka_offset;
} WAEntry;

/* Outputs of one call, in emission order. */
typedef struct WAOutputs
{
	int			n;
	int			cap;
	char	  **keys;
	Jsonb	  **payloads;
} WAOutputs;

extern WAConfig *spool_wa_parse_config(Jsonb *settings);
extern const char *spool_wa_target(WAConfig *cfg);
extern WAState *spool_wa_state_create(WAConfig *cfg, Jsonb *state,
									  MemoryContext parent);
extern void spool_wa_state_free(WAState *st);
extern Jsonb *spool_wa_state_to_jsonb(WAState *st, Jsonb *config);
extern uint64 spool_wa_state_hash(WAState *st);
extern void spool_wa_apply(WAState *st, const WAEntry *e, WAOutputs *out);
extern Datum spool_make_outputs(int n, const char *const *targets,
								char **keys, Jsonb **payloads);

#endif							/* SPOOL_WINDOW_ALERT_H */
