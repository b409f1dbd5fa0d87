/*-------------------------------------------------------------------------
 *
 * spool_ext.c
 *	  Module entry point: refuses to load outside shared_preload_libraries,
 *	  defines the settings, asks each subsystem for its shared memory and
 *	  registers the launcher.  The only file that knows every subsystem.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

#include "core/core.h"
#include "ingest/ingest.h"
#include "launcher/launcher.h"
#include "lease/lease.h"
#include "nonce/nonce.h"
#include "outbox/outbox.h"
#include "processor/processor.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* Every subsystem's shared area, in the order they are attached. */
static const SpoolShmemArea *const shmem_parts[] = {
	&spool_core_shmem,
	&spool_lease_shmem,
	&spool_nonce_shmem,
	&spool_ingest_shmem,
	&spool_processor_shmem,
	&spool_outbox_shmem,
};

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void spool_shmem_request_hook(void);
static void spool_shmem_startup_hook(void);

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("spool_ext must be loaded via shared_preload_libraries"),
				 errdetail("spool_ext needs shared memory and background workers, which can only be set up at server start."),
				 errhint("Add spool_ext to shared_preload_libraries in postgresql.conf and restart the server.")));

	spool_define_gucs();
	/* The nonce allocator's signer rows are guarded by the signers' leases. */
	spool_lease_register_guard(&spool_signer_guard);

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = spool_shmem_request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = spool_shmem_startup_hook;

	spool_register_launcher();
	spool_register_drop_hook();
}

static void
spool_shmem_request_hook(void)
{
	int			i;

	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	for (i = 0; i < lengthof(shmem_parts); i++)
	{
		RequestAddinShmemSpace(spool_shmem_size(shmem_parts[i]));
		if (shmem_parts[i]->locked)
			RequestNamedLWLockTranche(shmem_parts[i]->name, 1);
	}
}

static void
spool_shmem_startup_hook(void)
{
	int			i;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	for (i = 0; i < lengthof(shmem_parts); i++)
		spool_shmem_attach(shmem_parts[i]);
	LWLockRelease(AddinShmemInitLock);
}
