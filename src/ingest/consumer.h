/*-------------------------------------------------------------------------
 *
 * consumer.h
 *	  Private to the ingest worker's files (consumer*.c): the state of the
 *	  one source the worker runs and the functions they call across files.
 *	  Not a door of src/ingest: nothing outside the worker includes it.
 *
 * The worker is one process running one source, so its state is plain
 * globals, each defined in the file that owns it (named below).  They are
 * hidden from the dynamic symbol table: the names are short, and must not
 * be interposed by, or interpose on, those of another loaded library.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_INGEST_CONSUMER_H
#define SPOOL_INGEST_CONSUMER_H

#include "ingest/ingest.h"
#include "kafka/kafka.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#define STATUS_INTERVAL_MS	1000

/* One assigned partition. */
typedef struct PartState
{
	char	   *topic;
	int32		partition;
	int64		position;		/* next offset expected; -1 unknown */
	int64		start;			/* where it was assigned; -1 unknown */
	int64		high;			/* high watermark, -1 unknown */
	uint64		count;			/* messages since the last status */
	TimestampTz error_at;		/* in the error state since; 0: not */
	bool		error_shown;	/* a status refresh has published the error */
} PartState;

/* One staged row, as built from a message. */
typedef struct Staged
{
	int			part;
	int64		offset;
	char		kind;			/* 'm' message, 'd' dead letter, 'g' gap */
	bytea	   *key;
	char	   *json;			/* json source: text to convert to jsonb */
	Datum		value;
	bool		has_value;
	bytea	   *payload;
	Jsonb	   *headers;
	TimestampTz ts;
	bool		has_ts;
	char	   *error;
	int64		gap_to;
	bool		gap_stop;
	int64		dead_letter_id; /* a replay of this dead letter; 0: none */
	bool		from_stored;	/* the replay is built from the dead letter's
								 * key and payload: Kafka no longer has it */
} Staged;

#pragma GCC visibility push(hidden)

/* consumer.c */
extern rd_kafka_t *rk;
extern Staged *batch;
extern int	nbatch;
extern int	batch_cap;			/* grows up to batch_size + a few gap rows */
extern Size	batch_bytes;		/* message bytes held in batch */
extern bool	stop_after_batch;
extern TimestampTz batch_first;	/* when the batch's first message came */
extern SpoolBatchEnd batch_end;	/* what ended the batch */
extern SpoolSourceStats *stats;	/* this source's counters, or NULL */

/* consumer_load.c */
extern char	source_name[SPOOL_SOURCE_NAME_MAX + 1];
extern int	worker_index;		/* which of the source's workers: 0 .. workers - 1 */
extern SpoolSourceOptions *opts;
extern char *brokers;
extern List *topics;
extern bool	skip_gap;
extern Oid	source_owner;
extern char *default_group;		/* spool_ext.<database>.<source> */
extern List *resume_topic;		/* where partitions resume: stored or staged */
extern List *resume_part;
extern List *resume_next;
extern List *replay_ids;		/* dead letters to replay (as text) */
extern List *replay_topic;
extern List *replay_part;
extern List *replay_offset;
extern List *replay_key;		/* bytea *, or NULL */
extern List *replay_payload;	/* bytea *, or NULL */
extern bool load_source(void);
extern bool worker_takes(int32 partition);

/* consumer_pending.c */
extern void staging_snapshot_txn(const char *activity);
extern void wait_for_staging_drained(Datum *name);
extern void replay_dead_letters(void);

/* consumer_partitions.c */
extern PartState *parts;
extern int	nparts;
extern int	discovery_ms;		/* how often to look for new partitions; <= 0 never */
extern TimestampTz next_discovery;
extern int	find_part(const char *topic, int32 partition);
extern void kafka_assign(void);
extern void reassign_all(void);
extern int64 log_start(const char *topic, int32 partition);
extern void discover_new_partitions(void);
extern void add_part(const char *topic, int32 partition, int64 offset);
extern void drop_part(int part);

/* consumer_claims.c */
extern bool sharing;			/* the source has a share or a partition list */
extern void claims_init(void);
extern void claims_note_release(const char *topic, int32 partition);
extern bool claims_waiting(const char *topic, int32 partition);
extern bool claims_admit(const char *topic, int32 partition, int64 *offset, bool quiet);
extern void claims_pass(bool now);


/* consumer_message.c */
extern Staged *new_staged(int part, int64 offset, char kind);
extern void handle_message(rd_kafka_message_t *rkm);
extern void fill_staged(Staged *s, rd_kafka_message_t *rkm);
extern void fill_stored(Staged *s, bytea *key, bytea *payload);
extern void convert_json_values(void);

/* consumer_stage.c */
extern void stage_batch(void);

/* consumer_status.c */
extern const char *state;
extern uint64 errors;			/* since the server started (from stats) */
extern void kafka_error_cb(rd_kafka_t *handle, int err, const char *reason, void *opaque);
extern void set_error(const char *fmt,...) pg_attribute_printf(1, 2);
extern void set_part_error(int part, const char *fmt,...) pg_attribute_printf(2, 3);
extern void refresh_status(bool force);

#pragma GCC visibility pop

#endif							/* SPOOL_INGEST_CONSUMER_H */
