/*-------------------------------------------------------------------------
 *
 * spool_ext.c
 *	  Module entry point: refuses to load outside shared_preload_libraries,
 *	  defines the GUCs, hooks shared memory and registers the launcher.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"

#include "spool.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

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

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = spool_shmem_request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = spool_shmem_startup_hook;

	spool_register_launcher();
}

static void
spool_shmem_request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	spool_shmem_request();
}

static void
spool_shmem_startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	spool_shmem_startup();
}
