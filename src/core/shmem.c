/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The core's shared memory, and the two helpers every subsystem uses to
 *	  attach its own area: a named area zeroed on creation, and a named
 *	  LWLock.  Each subsystem sizes and initialises its area itself
 *	  (spool_<subsystem>_shmem_size/_init); spool_ext.c calls them all, so
 *	  no module computes another's layout.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

#include "core/core.h"

SpoolCoreShared *spool_core_shared = NULL;
SpoolIdentity *spool_identities = NULL;

/* The core's area: what the launcher publishes, then the workers' identities. */
Size
spool_core_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(SpoolCoreShared)),
					mul_size(MaxBackends, sizeof(SpoolIdentity)));
}

void
spool_core_shmem_init(void)
{
	bool		found;

	spool_core_shared = spool_shmem_area("spool_ext core", spool_core_shmem_size(), &found);
	spool_identities = (SpoolIdentity *)
		((char *) spool_core_shared + MAXALIGN(sizeof(SpoolCoreShared)));
	if (!found)
	{
		spool_core_shared->lock = spool_shmem_lock("spool_ext core");
		pg_atomic_init_u32(&spool_core_shared->launcher_generation, 0);
	}
}

/*
 * The shared area called name, zeroed when this call creates it (*found is
 * then false).  Called from the shmem startup hook, under AddinShmemInitLock.
 */
void *
spool_shmem_area(const char *name, Size size, bool *found)
{
	void	   *area = ShmemInitStruct(name, size, found);

	if (!*found)
		memset(area, 0, size);
	return area;
}

/* The one LWLock of the tranche requested under this name. */
LWLock *
spool_shmem_lock(const char *tranche)
{
	return &(GetNamedLWLockTranche(tranche))[0].lock;
}

/*
 * Raise a clear error when shared memory is missing, which happens when the
 * SQL functions are called in a server that did not preload the library.
 */
void
spool_require_shmem(void)
{
	if (spool_core_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("spool_ext is not loaded via shared_preload_libraries"),
				 errhint("Add spool_ext to shared_preload_libraries in postgresql.conf and restart the server.")));
}
