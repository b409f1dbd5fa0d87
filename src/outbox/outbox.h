/*-------------------------------------------------------------------------
 *
 * outbox.h
 *	  The door to src/outbox, the outbox and its dispatchers: target
 *	  definitions (target.c), writing rows (enqueue.c), the shard workers
 *	  (dispatch.c, deliver.c) and the launcher's side with the status
 *	  (launch.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_OUTBOX_H
#define SPOOL_OUTBOX_H

#include "core/core.h"

#include "storage/lockdefs.h"
#include "utils/array.h"

#define SPOOL_MAX_DISPATCHERS	64	/* shard workers over all targets */
#define SPOOL_MAX_SHARDS		16
#define SPOOL_OUTBOX_SLOTS		8	/* ring partitions per target */
#define SPOOL_TARGET_NAME_MAX	48

/* Histogram buckets (upper bounds): batch rows 2^i; flush 0.25 ms * 2^i; drain 1 ms * 2^i. */
#define HIST_BATCH	15
#define HIST_FLUSH	16
#define HIST_DRAIN	17

typedef enum OutboxKind
{
	KIND_SQL,
	KIND_NOTIFY,
	KIND_KAFKA
} OutboxKind;

typedef enum FlushReason
{
	FLUSH_SIZE,
	FLUSH_INTERVAL,
	FLUSH_BARRIER,
	FLUSH_CLOSE,
	NUM_FLUSH_REASONS
} FlushReason;

typedef enum DispatchState
{
	DS_STOPPED = 0,
	DS_IDLE,
	DS_DELIVERING,
	DS_BARRIER,					/* waiting at a barrier */
	DS_RETRYING,				/* only parked rows are left */
	DS_ERROR					/* the target fails as a whole */
} DispatchState;

/* A target's validated options (spool.targets.options). */
typedef struct OutboxTarget
{
	int			id;
	char		name[NAMEDATALEN];
	Oid			owner;			/* loaded targets only */
	OutboxKind	kind;
	int			shards;
	int			batch_size;
	int64		batch_interval_us;
	int			retry_limit;
	int64		retry_backoff_us;
	int64		retry_backoff_max_us;
	char	   *function;		/* sql: qualified name */
	char	   *run_as;			/* sql: NULL = the creating role */
	char	   *channel;		/* notify */
	char	   *brokers;		/* kafka */
	char	   *topic;
	Jsonb	   *kafka;			/* kafka: librdkafka properties, or NULL */
	bool		transactional;	/* kafka: one Kafka transaction per batch */
	uint32		options_hash;	/* loaded: of the stored options' text */
} OutboxTarget;

/*
 * One dispatcher shard in shared memory.  The launcher claims it; the shard
 * worker publishes its state and counters here (under outbox_lock);
 * enqueueing transactions bump committed and set the latch at commit.
 */
typedef struct SpoolDispatchSlot
{
	bool		in_use;
	int			target_id;
	int			shard;
	char		target[NAMEDATALEN];
	pid_t		pid;
	Latch	   *latch;
	uint32		options_hash;	/* of the options the running worker loaded */
	pg_atomic_uint64 committed; /* rows committed for this shard (a hint) */
	pg_atomic_uint32 retry_dirty;	/* spool.redrive parked a row */
	int64		position;		/* committed delivered position */
	int64		arrived;		/* barrier id this shard is waiting at */
	DispatchState state;
	bool		exit_error;
	uint64		delivered;
	uint64		flushes[NUM_FLUSH_REASONS];
	uint64		retries;
	uint64		barriers;
	int			blocked_keys;
	uint64		batch_hist[HIST_BATCH + 1];
	uint64		flush_hist[HIST_FLUSH + 1];
	uint64		drain_hist[HIST_DRAIN + 1];
	uint64		batch_sum;
	int64		batch_max;
	double		flush_ms_sum;
	double		flush_ms_max;
	double		drain_ms_sum;
	double		drain_ms_last;
	double		drain_ms_max;
	char		last_error[256];
	TimestampTz last_error_at;
	TimestampTz last_flush_at;
	TimestampTz started_at;
} SpoolDispatchSlot;

typedef struct SpoolOutboxShared
{
	LWLock	   *lock;			/* guards dispatchers[] */
	pg_atomic_uint64 outbox_seen;	/* highest outbox id handed out (see enqueue.c) */
	pg_atomic_uint32 targets_generation;	/* bumped by create/drop_target */
	SpoolDispatchSlot dispatchers[SPOOL_MAX_DISPATCHERS];
} SpoolOutboxShared;

extern SpoolOutboxShared *spool_outbox_shared;
extern pg_atomic_uint64 *spool_outbox_lowest;	/* [MaxBackends] */

extern const SpoolShmemArea spool_outbox_shmem;

/* target.c */
extern OutboxTarget *spool_outbox_parse_target(const char *name, const char *kind,
											   Jsonb *options);
extern OutboxTarget *spool_outbox_load_target(int target_id);
extern uint32 spool_outbox_options_hash(const char *options_text);
extern void spool_outbox_lock_store(LOCKMODE mode);
extern Oid	spool_outbox_resolve_function(const char *name, bool missing_ok);
extern const char *spool_outbox_kind_name(OutboxKind kind);
struct rd_kafka_conf_s;
extern void spool_outbox_kafka_props(struct rd_kafka_conf_s *conf, Jsonb *kafka);

/* enqueue.c */
extern int64 spool_outbox_insert(const char *target, const char *key, Jsonb *payload,
								 bool barrier, const char *processor, int64 cursor,
								 int64 token, Oid role);
extern void spool_outbox_insert_outputs(ArrayType *outputs, const char *processor,
										int64 cursor, int64 token, Oid role);
extern int64 spool_outbox_safe_bound(void);
extern void spool_outbox_fold_sequence(int64 last_value);
extern int	spool_outbox_slot_of(int64 id);
extern void spool_outbox_targets_changed(void);
extern void spool_outbox_forget_catalog(void);

/* launch.c */
extern const SpoolKindOps spool_dispatcher_ops;
extern SpoolSlots spool_dispatcher_slots;
extern SpoolDispatchSlot *spool_dispatch_slot_of(int target_id, int shard);

/* deliver.c: one batch of rows for one target. */
typedef struct OutboxRow
{
	int64		id;
	char	   *key;			/* NULL: no key */
	Jsonb	   *payload;
	bool		barrier;
	char	   *processor;
	int64		cursor;			/* -1: none */
	TimestampTz created_at;
	int			attempts;		/* parked rows only */
	/* results of a delivery attempt */
	bool		sent;			/* handed to the target (not skipped) */
	bool		failed;
	char	   *error;
} OutboxRow;

/* Are two outbox keys the same (NULL: no key, the same as another NULL)? */
static inline bool
spool_same_key(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return strcmp(a, b) == 0;
}

struct SpoolBox;
extern void spool_deliver_init(OutboxTarget *t);
extern void spool_deliver_box_open(struct SpoolBox *box);
extern void spool_deliver_row(OutboxRow *row);
extern bool spool_deliver_external(void);
extern void spool_deliver_shutdown(void);

/* deliver_kafka.c: kafka targets, outside the transaction. */
#define KAFKA_PIPE_DEPTH 8		/* idempotent mode: batches produced, not yet marked */
extern void spool_kafka_start(OutboxTarget *t);
extern int64 spool_kafka_wait_ms(void);
extern bool spool_kafka_deliver(OutboxRow **rows, int n, TimestampTz deadline,
								char **target_error);
extern bool spool_kafka_produce(int slot, OutboxRow **rows, int n, TimestampTz deadline,
								char **target_error);
extern bool spool_kafka_done(int slot);
extern void spool_kafka_nap(void);
extern bool spool_kafka_wait(int slot, TimestampTz deadline);
extern bool spool_kafka_finish(int slot, OutboxRow **rows, int n, char **target_error);
extern void spool_kafka_abandon(void);
extern void spool_kafka_stop(void);
extern void spool_kafka_warm(void);

typedef enum KafkaTxnResult
{
	KTXN_COMMITTED,
	KTXN_REFUSED,				/* the broker refused a row for good; aborted */
	KTXN_TOO_LONG,				/* the metadata would be too long; aborted */
	KTXN_FAILED					/* failed, or its outcome is not known */
} KafkaTxnResult;

extern void spool_kafka_transactional(const char *id);
extern bool spool_kafka_txn_committed(int64 *offset, char **meta, char **err);
extern KafkaTxnResult spool_kafka_txn_deliver(OutboxRow **rows, int n, int64 to,
											  char *(*meta_fn) (void), int64 wait_ms,
											  char **err);

#endif							/* SPOOL_OUTBOX_H */
