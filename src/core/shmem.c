/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The core's shared memory, and what every subsystem's area goes
 *	  through: each subsystem declares its area (a header, then an array,
 *	  SpoolShmemArea) and what to do on attaching it; this file sizes and
 *	  attaches them all for spool_ext.c, zeroing a new one, so no module
 *	  computes another's layout.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

#include "core/core.h"

SpoolCoreShared *spool_core_shared = NULL;
SpoolIdentity *spool_identities = NULL;

static void core_attach(bool found);

/* The core's area: what the launcher publishes, then the workers' identities. */
const SpoolShmemArea spool_core_shmem = {
	"spool_ext core", true, sizeof(SpoolCoreShared), (void **) &spool_core_shared,
	sizeof(SpoolIdentity), &MaxBackends, (void **) &spool_identities, core_attach
};

static void
core_attach(bool found)
{
	if (found)
		return;
	spool_core_shared->lock = spool_shmem_lock("spool_ext core");
	pg_atomic_init_u32(&spool_core_shared->launcher_generation, 0);
}

/* The size of an area: its header, then its elements. */
Size
spool_shmem_size(const SpoolShmemArea *area)
{
	Size		elements = area->count ? mul_size(*area->count, area->element_size) : 0;

	return add_size(MAXALIGN(area->header_size), elements);
}

/*
 * Attach an area, zeroed when this call creates it.  Called from the shmem
 * startup hook, under AddinShmemInitLock.
 */
void
spool_shmem_attach(const SpoolShmemArea *area)
{
	bool		found;
	Size		size = spool_shmem_size(area);
	char	   *base = ShmemInitStruct(area->name, size, &found);

	if (!found)
		memset(base, 0, size);
	if (area->header)
		*area->header = base;
	if (area->elements)
		*area->elements = base + MAXALIGN(area->header_size);
	if (area->attach)
		area->attach(found);
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

/*
 * Raise a clear error unless this is the database the workers run in: a
 * source, processor or target anywhere else would be accepted but never run.
 * "what" names the object for the message ("source", ...).
 */
void
spool_require_pipeline_database(const char *what)
{
	char	   *here;

	spool_require_shmem();
	here = get_database_name(MyDatabaseId);
	if (here == NULL || strcmp(here, spool_database) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("spool_ext runs pipelines in database \"%s\" only", spool_database),
				 errdetail("This is database \"%s\": a %s here would never run.",
						   here ? here : "?", what),
				 errhint("Connect to database \"%s\", or set spool.database to this database and restart the server; one database holds any number of pipelines.",
						 spool_database)));
}
