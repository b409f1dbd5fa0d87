/*-------------------------------------------------------------------------
 *
 * launch.c
 *	  The ingest side's workers as kinds the launcher supervises: the
 *	  promoter (one), and the ingest workers of each enabled source (its
 *	  option workers, 1 unless set; they split its partitions).  Before any
 *	  of them starts, both staging tables are emptied.  A source's unit
 *	  carries its config_version (moved by alter_source, seek_source and
 *	  replay_dead_letter): a worker started at another version is restarted
 *	  at once, and applies the change at its start.  Their stage numbers
 *	  are spool._ingest_histograms and spool._ingest_counters.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"

#include "ingest/ingest.h"

PG_FUNCTION_INFO_V1(spool_ingest_histograms);
PG_FUNCTION_INFO_V1(spool_ingest_counters);

static void list_promoter(SpoolSupervisor *s);
static void list_sources(SpoolSupervisor *s);
static char *source_label(const SpoolUnit *u, int i);
static void source_prepare(const SpoolUnit *u, int i, SpoolWorkerArgs *args);
static SpoolVerdict source_check(const SpoolUnit *u, int i, TimestampTz now);
static bool source_failed(const SpoolUnit *u, int i);
static void source_gone(const SpoolUnit *u, int i, const char *why);
static void reset_staging(void);
static void forget_dropped(void);
static bool source_stats_copy(int i, SpoolSourceStats *st);

/*
 * In the launcher: the config_version each running ingest worker was
 * started at, and whether the launcher stopped it for a newer one.
 */
typedef struct SourceRun
{
	char		name[NAMEDATALEN];
	int			index;			/* which of the source's workers */
	uint32		version;
	bool		replaced;
} SourceRun;

static SourceRun source_runs[SPOOL_MAX_SOURCES * SPOOL_UNIT_MAX_WORKERS];
static int	nsource_runs = 0;

const SpoolKindOps spool_promoter_ops = {
	.list = list_promoter,
	.reset = reset_staging,
	.dropped = forget_dropped,
};

const SpoolKindOps spool_source_ops = {
	.list = list_sources,
	.label = source_label,
	.prepare = source_prepare,
	.failed = source_failed,
	.check = source_check,
	.gone = source_gone,
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

	if (SPI_execute("SELECT name, config_version, coalesce((options->>'workers')::int, 1)"
					" FROM spool.sources WHERE enabled ORDER BY name",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.sources");
	for (n = 0; n < SPI_processed; n++)
	{
		bool		isnull;

		spool_want(s, SPI_getvalue(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 1),
				   0, 0,
				   DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[n], SPI_tuptable->tupdesc, 3, &isnull)),
				   (uint32) DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[n],
														SPI_tuptable->tupdesc, 2, &isnull)));
	}
}

static SourceRun *
find_run(const char *name, int index)
{
	int			i;

	for (i = 0; i < nsource_runs; i++)
		if (source_runs[i].index == index && strcmp(source_runs[i].name, name) == 0)
			return &source_runs[i];
	return NULL;
}

/* A worker starts: note the version it will load (or a later one). */
static void
source_prepare(const SpoolUnit *u, int i, SpoolWorkerArgs *args)
{
	SourceRun  *r = find_run(u->name, i);

	if (r == NULL && nsource_runs < lengthof(source_runs))
	{
		r = &source_runs[nsource_runs++];
		strlcpy(r->name, u->name, NAMEDATALEN);
		r->index = i;
	}
	if (r)
	{
		r->version = u->version;
		r->replaced = false;
	}
}

/*
 * The source changed since its worker started: stop it (it exits like at
 * any termination: its staged batches are promoted, the batch it held is
 * read again) and start it again without a backoff.
 */
static SpoolVerdict
source_check(const SpoolUnit *u, int i, TimestampTz now)
{
	SourceRun  *r = find_run(u->name, i);

	if (r == NULL || r->version == u->version)
		return SPOOL_KEEP;
	r->replaced = true;
	return SPOOL_RESTART;
}

static bool
source_failed(const SpoolUnit *u, int i)
{
	SourceRun  *r = find_run(u->name, i);

	return !(r && r->replaced);
}

static void
source_gone(const SpoolUnit *u, int i, const char *why)
{
	SourceRun  *r = find_run(u->name, i);

	if (r)
		*r = source_runs[--nsource_runs];
}

/* The source's name, and which worker it is when there are several. */
static char *
source_label(const SpoolUnit *u, int i)
{
	return u->nworkers > 1 ? psprintf("%s/%d", u->name, i) : pstrdup(u->name);
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
	pg_atomic_write_u64(&spool_ingest_shared->staged_first_at[0], 0);
	pg_atomic_write_u64(&spool_ingest_shared->staged_first_at[1], 0);
	spool_end_txn();
}

/*
 * The extension was dropped: its spool and sources are gone.  Free every
 * source's stats slot (a source of the same name made later starts from
 * zero) and forget the published cursor (the next spool counts from 1; the
 * next promoter publishes it when it starts).
 */
static void
forget_dropped(void)
{
	int			i;

	LWLockAcquire(spool_ingest_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < SPOOL_MAX_SOURCES; i++)
		spool_ingest_shared->sources[i].name[0] = '\0';
	LWLockRelease(spool_ingest_shared->lock);
	pg_atomic_write_u64(&spool_ingest_shared->published_cursor, 0);
}

/* Copy source stats slot i into *st; false when the slot is free. */
static bool
source_stats_copy(int i, SpoolSourceStats *st)
{
	LWLockAcquire(spool_ingest_shared->lock, LW_SHARED);
	*st = spool_ingest_shared->sources[i];
	LWLockRelease(spool_ingest_shared->lock);
	return st->name[0] != '\0';
}

/*
 * SQL: spool._ingest_histograms() — the ingest workers' and the promoter's
 * histograms, in the row shape of spool.stage_histograms.
 */
Datum
spool_ingest_histograms(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	SpoolHist	h[3];
	int			i;

	spool_require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	LWLockAcquire(spool_ingest_shared->lock, LW_SHARED);
	h[0] = spool_ingest_shared->promote_rows;
	h[1] = spool_ingest_shared->promote_ms;
	h[2] = spool_ingest_shared->promote_lag_ms;
	LWLockRelease(spool_ingest_shared->lock);
	spool_hist_put(rsinfo, "promoter", "", 0, "batch_rows", "rows", &h[0]);
	spool_hist_put(rsinfo, "promoter", "", 0, "batch_ms", "ms", &h[1]);
	spool_hist_put(rsinfo, "promoter", "", 0, "lag_ms", "ms", &h[2]);
	for (i = 0; i < SPOOL_MAX_SOURCES; i++)
	{
		SpoolSourceStats st;

		if (!source_stats_copy(i, &st))
			continue;
		spool_hist_put(rsinfo, "ingest", st.name, 0, "batch_rows", "rows", &st.rows);
		spool_hist_put(rsinfo, "ingest", st.name, 0, "batch_ms", "ms", &st.batch_ms);
		spool_hist_put(rsinfo, "ingest", st.name, 0, "stage_ms", "ms", &st.stage_ms);
	}
	return (Datum) 0;
}

/*
 * SQL: spool._ingest_counters() — per source (since the server started):
 * errors and batches by what ended them; and the promoter's promotions as
 * the row with source NULL.
 */
Datum
spool_ingest_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		v[6];
	bool		n[6];
	int			i;

	spool_require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; i < SPOOL_MAX_SOURCES; i++)
	{
		SpoolSourceStats st;

		if (!source_stats_copy(i, &st))
			continue;
		memset(n, false, sizeof(n));
		v[0] = CStringGetTextDatum(st.name);
		v[1] = Int64GetDatum((int64) st.errors);
		v[2] = Int64GetDatum((int64) st.ended[BATCH_END_SIZE]);
		v[3] = Int64GetDatum((int64) st.ended[BATCH_END_BYTES]);
		v[4] = Int64GetDatum((int64) st.ended[BATCH_END_TIME]);
		v[5] = Int64GetDatum((int64) st.ended[BATCH_END_STOP]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
	}
	return (Datum) 0;
}
