/*-------------------------------------------------------------------------
 *
 * launch.c
 *	  The ingest side's workers as kinds the launcher supervises: the
 *	  promoter (one), and one ingest worker per enabled source.  Before any
 *	  of them starts, both staging tables are emptied.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"

#include "ingest/ingest.h"

static void list_promoter(SpoolSupervisor *s);
static void list_sources(SpoolSupervisor *s);
static char *source_label(const SpoolUnit *u, int i);
static void reset_staging(void);

const SpoolKindOps spool_promoter_ops = {
	.list = list_promoter,
	.reset = reset_staging,
};

const SpoolKindOps spool_source_ops = {
	.list = list_sources,
	.label = source_label,
};

static void
list_promoter(SpoolSupervisor *s)
{
	spool_want(s, "", 0, 0, 1, 0);
}

static void
list_sources(SpoolSupervisor *s)
{
	uint64		n;

	if (SPI_execute("SELECT name FROM spool.sources WHERE enabled ORDER BY name",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.sources");
	for (n = 0; n < SPI_processed; n++)
		spool_want(s, SPI_getvalue(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 1),
				   0, 0, 1, 0);
}

static char *
source_label(const SpoolUnit *u, int i)
{
	return pstrdup(u->name);
}

/*
 * Before this launcher starts any worker: empty both staging tables and
 * reset the shared counters that describe them.  UNLOGGED tables survive a
 * clean restart while shared memory does not; staged rows are not durable
 * (their offsets were not stored), so the ingest workers read them from
 * Kafka again, exactly as after a crash.  The exclusive locks wait for any
 * worker of an earlier launcher still writing or promoting.
 */
static void
reset_staging(void)
{
	spool_begin_txn("emptying spool staging");
	if (SPI_execute("LOCK TABLE spool.staging_0, spool.staging_1 IN ACCESS EXCLUSIVE MODE;"
					" TRUNCATE spool.staging_0, spool.staging_1", false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not empty the staging tables");
	pg_atomic_write_u64(&spool_ingest_shared->staged_msgs[0], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_msgs[1], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_other[0], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_other[1], 0);
	pg_atomic_write_u32(&spool_ingest_shared->staging_active, 0);
	spool_end_txn();
}
