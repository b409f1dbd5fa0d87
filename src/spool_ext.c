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

/* One subsystem's shared memory: its size, and how to attach it. */
typedef struct ShmemPart
{
	const char *tranche;		/* its LWLock's tranche, NULL if none */
	Size		(*size) (void);
	void		(*init) (void);
} ShmemPart;

static const ShmemPart shmem_parts[] = {
	{"spool_ext core", spool_core_shmem_size, spool_core_shmem_init},
	{NULL, spool_lease_shmem_size, spool_lease_shmem_init},
	{"spool_ext nonce", spool_nonce_shmem_size, spool_nonce_shmem_init},
	{"spool_ext ingest", spool_ingest_shmem_size, spool_ingest_shmem_init},
	{"spool_ext processor", spool_processor_shmem_size, spool_processor_shmem_init},
	{"spool_ext outbox", spool_outbox_shmem_size, spool_outbox_shmem_init},
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
}

static void
spool_shmem_request_hook(void)
{
	int			i;

	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	for (i = 0; i < lengthof(shmem_parts); i++)
	{
		RequestAddinShmemSpace(shmem_parts[i].size());
		if (shmem_parts[i].tranche)
			RequestNamedLWLockTranche(shmem_parts[i].tranche, 1);
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
		shmem_parts[i].init();
	LWLockRelease(AddinShmemInitLock);
}
