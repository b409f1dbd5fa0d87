/*-------------------------------------------------------------------------
 *
 * processor.h
 *	  The door to src/processor: replicated deterministic handlers over the
 *	  spool.  The SQL functions (admin.c), the replica worker (replica.c),
 *	  the handler interface and native handlers (handler.c, window_alert.c)
 *	  and the launcher's side (launch.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_PROCESSOR_H
#define SPOOL_PROCESSOR_H

#include "core/core.h"

#include "storage/condition_variable.h"
#include "utils/jsonb.h"

#define SPOOL_PROCESSOR_DEFAULT_REPLICAS	2
#define SPOOL_PROCESSOR_DEFAULT_BATCH		1000
#define SPOOL_PROCESSOR_DEFAULT_TTL_MS		5000
#define SPOOL_PROCESSOR_DEFAULT_CHECKPOINT	100000
#define SPOOL_PROCESSOR_MAX_BATCH			100000

#define SPOOL_MAX_PROCESSORS 32
#define SPOOL_MAX_REPLICAS	8

typedef enum SpoolReplicaRole
{
	ROLE_NONE = 0,				/* no process */
	ROLE_STARTING,				/* loading the checkpoint, replaying */
	ROLE_STANDBY,				/* shadow: computes, emits nothing */
	ROLE_ACTIVE					/* holds the output gate */
} SpoolReplicaRole;

/*
 * One replica of a processor.  Written by the replica's own process (and
 * cleared by its exit callback); read by spool.processor_status.
 */
typedef struct SpoolReplicaSlot
{
	pid_t		pid;
	SpoolReplicaRole role;
	int64		cursor;			/* state is as of this cursor */
	int64		token;			/* gate token while active */
	uint64		state_hash;
	int64		state_hash_cursor;	/* -1: none yet */
	uint64		takeovers;
	TimestampTz last_takeover_at;
	double		last_takeover_ms;
	uint64		entries;
	uint64		batches;
	uint64		outputs;
	uint64		hash_checks;
	uint64		hash_mismatches;
	uint64		errors;
	bool		exit_error;		/* the last process exited on an error */
	char		last_error[SPOOL_ERRMSG_MAX];
	TimestampTz last_error_at;
	TimestampTz started_at;
	/* Stage numbers of the slot (spool.processor_stats) */
	SpoolHist	batch_entries;	/* entries per batch */
	SpoolHist	batch_ms;		/* a batch's transaction, read to commit */
	SpoolHist	handler_ms;		/* the handler's part */
	SpoolHist	commit_ms;		/* outputs, gate and commit (active only) */
	SpoolHist	snapshot_ms;	/* building and hashing a state snapshot */
} SpoolReplicaSlot;

/*
 * A processor the launcher runs.  The active replica publishes each commit
 * (and its state snapshots) here and broadcasts cv, which the standbys wait
 * on; an exiting active clears active_pid and broadcasts too, so a clean exit
 * is noticed at once.
 */
typedef struct SpoolProcessorSlot
{
	bool		in_use;
	char		name[NAMEDATALEN];
	pid_t		active_pid;
	TimestampTz active_gone_at; /* when the last active exited */
	TimestampTz lease_expires_at;	/* of the active's lease, as last renewed */
	int64		committed_cursor;
	int64		snapshot_cursor;
	uint64		snapshot_hash;
	int64		epoch;			/* rewinds of the checkpoint the cursors above
								 * belong to (see rewind.c) */
	uint32		options_wanted; /* hash of the stored options, from the
								 * launcher: replicas reload when it changes */
	ConditionVariable cv;
	SpoolReplicaSlot replicas[SPOOL_MAX_REPLICAS];
} SpoolProcessorSlot;

typedef struct SpoolProcessorShared
{
	LWLock	   *lock;			/* guards processors[] */
	SpoolProcessorSlot processors[SPOOL_MAX_PROCESSORS];
} SpoolProcessorShared;

extern SpoolProcessorShared *spool_processor_shared;

extern const SpoolShmemArea spool_processor_shmem;

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



/* Options (admin.c), the table create_processor and alter_processor check */
extern const SpoolOptionTable spool_processor_options;

/* Launcher side (launch.c) */
extern void spool_replica_stats_init(SpoolReplicaSlot *rs);
extern const SpoolKindOps spool_processor_ops;
extern SpoolSlots spool_processor_slots;
extern uint32 spool_processor_options_hash(const char *options_text);

#endif							/* SPOOL_PROCESSOR_H */
