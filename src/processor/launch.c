/*-------------------------------------------------------------------------
 *
 * launch.c
 *	  Processors as a kind the launcher supervises: one shared-memory slot
 *	  per enabled processor and one background worker per replica.  A
 *	  replica that was terminated is restarted at once; one that exited on
 *	  an error (a handler error, say) is restarted with a backoff doubling
 *	  from 1 s to 30 s.  A replica whose processor was stopped or dropped is
 *	  terminated.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "executor/spi.h"

#include "processor/processor.h"

SpoolProcessorShared *spool_processor_shared = NULL;

static void list_processors(SpoolSupervisor *s);
static void fill_slot(void *slot, const SpoolUnit *u);
static char *replica_label(const SpoolUnit *u, int i);
static bool replica_failed(const SpoolUnit *u, int i);
static SpoolVerdict check_replica(const SpoolUnit *u, int i, TimestampTz now);
static void processor_attach(bool found);

StaticAssertDecl(SPOOL_MAX_REPLICAS <= SPOOL_UNIT_MAX_WORKERS,
				 "the supervisor must keep every replica of a processor");

/* One slot per enabled processor, claimed by the supervisor. */
SpoolSlots	spool_processor_slots;

const SpoolKindOps spool_processor_ops = {
	.list = list_processors,
	.label = replica_label,
	.failed = replica_failed,
	.check = check_replica,
};

/* The version of a processor's stored options (never 0: 0 means none yet). */
uint32
spool_processor_options_hash(const char *options_text)
{
	uint32		h = hash_bytes((const unsigned char *) options_text, strlen(options_text));

	return h == 0 ? 1 : h;
}

/*
 * Every enabled processor, with its number of replicas (alter_processor may
 * change it: the supervisor starts or stops the difference), at the version
 * of its options.
 */
static void
list_processors(SpoolSupervisor *s)
{
	uint64		n;

	if (SPI_execute("SELECT name, (options->>'replicas')::int, options::text FROM spool.processors"
					" WHERE enabled ORDER BY name", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.processors");
	for (n = 0; n < SPI_processed; n++)
	{
		bool		isnull;
		int			replicas = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[n],
														   SPI_tuptable->tupdesc, 2, &isnull));

		spool_want(s, SPI_getvalue(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 1),
				   0, 0, Min(Max(replicas, 1), SPOOL_MAX_REPLICAS),
				   spool_processor_options_hash(SPI_getvalue(SPI_tuptable->vals[n],
															 SPI_tuptable->tupdesc, 3)));
	}
}

/*
 * alter_processor: publish the version of the stored options; replicas that
 * loaded another version re-read their options in place (no restart, no
 * replay).  Standbys are woken; the active looks at least once a second.
 */
static SpoolVerdict
check_replica(const SpoolUnit *u, int i, TimestampTz now)
{
	SpoolProcessorSlot *ps = &spool_processor_shared->processors[u->slot];
	bool		changed;

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	changed = ps->options_wanted != u->version;
	ps->options_wanted = u->version;
	LWLockRelease(spool_processor_shared->lock);
	if (changed)
		ConditionVariableBroadcast(&ps->cv);
	return SPOOL_KEEP;
}

/* A claimed slot starts from nothing, but its condition variable. */
static void
fill_slot(void *slot, const SpoolUnit *u)
{
	SpoolProcessorSlot *ps = slot;
	int			r;

	strlcpy(ps->name, u->name, NAMEDATALEN);
	ps->active_pid = 0;
	ps->active_gone_at = 0;
	ps->lease_expires_at = 0;
	ps->committed_cursor = 0;
	ps->snapshot_cursor = 0;
	ps->snapshot_hash = 0;
	ps->epoch = -1;
	ps->options_wanted = 0;
	for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
	{
		memset(&ps->replicas[r], 0, sizeof(SpoolReplicaSlot));
		ps->replicas[r].state_hash_cursor = -1;
		ps->replicas[r].last_takeover_ms = -1;
		spool_replica_stats_init(&ps->replicas[r]);
	}
}

/* A replica slot's empty histograms. */
void
spool_replica_stats_init(SpoolReplicaSlot *rs)
{
	spool_hist_init(&rs->batch_entries, 1);
	spool_hist_init(&rs->batch_ms, 0.25);
	spool_hist_init(&rs->handler_ms, 0.25);
	spool_hist_init(&rs->commit_ms, 0.25);
	spool_hist_init(&rs->snapshot_ms, 0.25);
}

static char *
replica_label(const SpoolUnit *u, int i)
{
	return psprintf("%s/%d", u->name, i + 1);
}

/*
 * A replica that exited on an error (a handler error, say) is restarted with
 * a backoff; one that was terminated is back at once.
 */
static bool
replica_failed(const SpoolUnit *u, int i)
{
	return spool_slot_flag(spool_processor_shared->lock,
						   &spool_processor_shared->processors[u->slot].replicas[i].exit_error);
}

static void
processor_attach(bool found)
{
	int			i;

	if (!found)
	{
		spool_processor_shared->lock = spool_shmem_lock("spool_ext processor");
		for (i = 0; i < SPOOL_MAX_PROCESSORS; i++)
			ConditionVariableInit(&spool_processor_shared->processors[i].cv);
	}
	spool_slots_attach(&spool_processor_slots, spool_processor_shared->lock, spool_processor_shared->processors,
					   sizeof(SpoolProcessorSlot), offsetof(SpoolProcessorSlot, in_use), fill_slot);
}

/* Shared memory: one slot per processor. */
const SpoolShmemArea spool_processor_shmem = {
	"spool_ext processor", true, sizeof(SpoolProcessorShared),
	(void **) &spool_processor_shared, 0, NULL, NULL, processor_attach
};
