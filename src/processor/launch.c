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

#include "executor/spi.h"

#include "processor/processor.h"

SpoolProcessorShared *spool_processor_shared = NULL;

static void list_processors(SpoolSupervisor *s);
static int	claim_slot(const SpoolUnit *u);
static void release_slot(int slot);
static char *replica_label(const SpoolUnit *u, int i);
static bool replica_failed(const SpoolUnit *u, int i);

StaticAssertDecl(SPOOL_MAX_REPLICAS <= SPOOL_UNIT_MAX_WORKERS,
				 "the supervisor must keep every replica of a processor");

const SpoolWorkerKind spool_processor_kind = {
	.type = "spool processor",
	.function = "spool_processor_main",
	.what = "enabled processors",
	.max_units = SPOOL_MAX_PROCESSORS,
	.reads_catalog = true,
	.list = list_processors,
	.claim = claim_slot,
	.release = release_slot,
	.label = replica_label,
	.failed = replica_failed,
};

/* Every enabled processor, with its number of replicas. */
static void
list_processors(SpoolSupervisor *s)
{
	uint64		n;

	if (SPI_execute("SELECT name, (options->>'replicas')::int FROM spool.processors"
					" WHERE enabled ORDER BY name", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.processors");
	for (n = 0; n < SPI_processed; n++)
	{
		bool		isnull;
		int			replicas = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[n],
														   SPI_tuptable->tupdesc, 2, &isnull));

		spool_want(s, SPI_getvalue(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 1),
				   0, 0, Min(Max(replicas, 1), SPOOL_MAX_REPLICAS), 0);
	}
}

/* A free shared-memory slot for the processor, reset; -1 if none. */
static int
claim_slot(const SpoolUnit *u)
{
	int			i;
	int			found = -1;

	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < SPOOL_MAX_PROCESSORS && found < 0; i++)
	{
		SpoolProcessorSlot *ps = &spool_processor_shared->processors[i];
		int			r;

		if (ps->in_use)
			continue;
		ps->in_use = true;
		strlcpy(ps->name, u->name, NAMEDATALEN);
		ps->active_pid = 0;
		ps->active_gone_at = 0;
		ps->lease_expires_at = 0;
		ps->committed_cursor = 0;
		ps->snapshot_cursor = 0;
		ps->snapshot_hash = 0;
		for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
		{
			memset(&ps->replicas[r], 0, sizeof(SpoolReplicaSlot));
			ps->replicas[r].state_hash_cursor = -1;
			ps->replicas[r].last_takeover_ms = -1;
		}
		found = i;
	}
	LWLockRelease(spool_processor_shared->lock);
	return found;
}

static void
release_slot(int slot)
{
	LWLockAcquire(spool_processor_shared->lock, LW_EXCLUSIVE);
	spool_processor_shared->processors[slot].in_use = false;
	LWLockRelease(spool_processor_shared->lock);
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
	bool		failed;

	LWLockAcquire(spool_processor_shared->lock, LW_SHARED);
	failed = spool_processor_shared->processors[u->slot].replicas[i].exit_error;
	LWLockRelease(spool_processor_shared->lock);
	return failed;
}

/* Shared memory: one slot per processor. */
Size
spool_processor_shmem_size(void)
{
	return MAXALIGN(sizeof(SpoolProcessorShared));
}

void
spool_processor_shmem_init(void)
{
	bool		found;
	int			i;

	spool_processor_shared = spool_shmem_area("spool_ext processor",
											  spool_processor_shmem_size(), &found);
	if (found)
		return;
	spool_processor_shared->lock = spool_shmem_lock("spool_ext processor");
	for (i = 0; i < SPOOL_MAX_PROCESSORS; i++)
		ConditionVariableInit(&spool_processor_shared->processors[i].cv);
}
