/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The extension's shared memory: worker slots, the worker-queue request
 *	  pool, the per-backend fence registry and outbox horizon.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "storage/spin.h"

#include "spool.h"

SpoolShared *spool_shared = NULL;
SpoolFenceSlot *spool_fence_slots = NULL;
SpoolNonceReq *spool_requests = NULL;
pg_atomic_uint64 *spool_outbox_lowest = NULL;

static Size
spool_shmem_size(void)
{
	Size		size = MAXALIGN(sizeof(SpoolShared));

	size = add_size(size, MAXALIGN(mul_size(MaxBackends, sizeof(SpoolFenceSlot))));
	size = add_size(size, MAXALIGN(mul_size(spool_nonce_queue_size, sizeof(SpoolNonceReq))));
	size = add_size(size, mul_size(MaxBackends, sizeof(pg_atomic_uint64)));
	return size;
}

void
spool_shmem_request(void)
{
	RequestAddinShmemSpace(spool_shmem_size());
	RequestNamedLWLockTranche("spool_ext", 3);
}

void
spool_shmem_startup(void)
{
	bool		found;
	char	   *base;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	base = ShmemInitStruct("spool_ext", spool_shmem_size(), &found);
	spool_shared = (SpoolShared *) base;
	spool_fence_slots = (SpoolFenceSlot *) (base + MAXALIGN(sizeof(SpoolShared)));
	spool_requests = (SpoolNonceReq *)
		(base + MAXALIGN(sizeof(SpoolShared)) +
		 MAXALIGN(mul_size(MaxBackends, sizeof(SpoolFenceSlot))));
	spool_outbox_lowest = (pg_atomic_uint64 *)
		((char *) spool_requests +
		 MAXALIGN(mul_size(spool_nonce_queue_size, sizeof(SpoolNonceReq))));

	if (!found)
	{
		int			i;

		memset(base, 0, spool_shmem_size());
		spool_shared->queue_lock = &(GetNamedLWLockTranche("spool_ext"))[0].lock;
		spool_shared->processor_lock = &(GetNamedLWLockTranche("spool_ext"))[1].lock;
		spool_shared->outbox_lock = &(GetNamedLWLockTranche("spool_ext"))[2].lock;
		pg_atomic_init_u64(&spool_shared->outbox_seen, 0);
		pg_atomic_init_u32(&spool_shared->targets_generation, 0);
		for (i = 0; i < SPOOL_MAX_DISPATCHERS; i++)
		{
			pg_atomic_init_u64(&spool_shared->dispatchers[i].committed, 0);
			pg_atomic_init_u32(&spool_shared->dispatchers[i].retry_dirty, 0);
		}
		for (i = 0; i < MaxBackends; i++)
			pg_atomic_init_u64(&spool_outbox_lowest[i], 0);
		for (i = 0; i < SPOOL_MAX_PROCESSORS; i++)
			ConditionVariableInit(&spool_shared->processors[i].cv);
		spool_shared->nworkers = spool_nonce_workers;
		spool_shared->queue_size = spool_nonce_queue_size;
		for (i = 0; i < SPOOL_MAX_NONCE_WORKERS; i++)
		{
			spool_shared->workers[i].head = -1;
			spool_shared->workers[i].tail = -1;
		}
		for (i = 0; i < MaxBackends; i++)
			SpinLockInit(&spool_fence_slots[i].mutex);
		for (i = 0; i < spool_nonce_queue_size; i++)
		{
			spool_requests[i].state = REQ_FREE;
			spool_requests[i].next = (i + 1 < spool_nonce_queue_size) ? i + 1 : -1;
			ConditionVariableInit(&spool_requests[i].cv);
		}
		spool_shared->free_head = 0;
		pg_atomic_init_u64(&spool_shared->published_cursor, 0);
		pg_atomic_init_u32(&spool_shared->staging_active, 0);
		pg_atomic_init_u32(&spool_shared->launcher_generation, 0);
		pg_atomic_init_u64(&spool_shared->staged_msgs[0], 0);
		pg_atomic_init_u64(&spool_shared->staged_msgs[1], 0);
		pg_atomic_init_u64(&spool_shared->staged_other[0], 0);
		pg_atomic_init_u64(&spool_shared->staged_other[1], 0);
		ConditionVariableInit(&spool_shared->spool_cv);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Raise a clear error when shared memory is missing, which happens when the
 * SQL functions are called in a server that did not preload the library.
 */
void
spool_require_shmem(void)
{
	if (spool_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("spool_ext is not loaded via shared_preload_libraries"),
				 errhint("Add spool_ext to shared_preload_libraries in postgresql.conf and restart the server.")));
}
