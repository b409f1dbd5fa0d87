/*-------------------------------------------------------------------------
 *
 * hist.c
 *	  Histograms in shared memory, for every stage's status and metrics:
 *	  bucket i counts values up to first * 2^i, the last bucket the rest.
 *	  Adding a value is a few comparisons (no allocation, no lock of its
 *	  own: the caller holds its area's lock); reading turns a copy into an
 *	  int8[] of counts or into the bound of the bucket holding a quantile.
 *	  The row every stage's histogram SRF returns is built here too, so all
 *	  stages look the same in spool.stage_histograms.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "core/core.h"

/* Count v in the buckets hist[0 .. nb] (upper bounds first * 2^i, then +Inf). */
void
spool_hist_bucket_add(uint64 *hist, int nb, double v, double first)
{
	int			b = 0;
	double		ub = first;

	while (b < nb && v > ub)
	{
		b++;
		ub *= 2;
	}
	hist[b]++;
}

/*
 * The upper bound of the bucket holding the q-quantile (capped at max), or
 * -1 when the histogram is empty.  A bucket bound, not an exact quantile.
 */
double
spool_hist_quantile(const uint64 *hist, int nb, double first, double q, double max)
{
	uint64		total = 0;
	uint64		acc = 0;
	int			b;
	double		ub = first;

	for (b = 0; b <= nb; b++)
		total += hist[b];
	if (total == 0)
		return -1;
	for (b = 0; b < nb; b++, ub *= 2)
	{
		acc += hist[b];
		if ((double) acc >= q * (double) total)
			return Min(ub, max);
	}
	return max;
}

/* The counts of buckets 0 .. nb as an int8[]. */
Datum
spool_hist_array(const uint64 *hist, int nb)
{
	Datum	   *d = palloc(sizeof(Datum) * (nb + 1));
	int			b;

	for (b = 0; b <= nb; b++)
		d[b] = Int64GetDatum((int64) hist[b]);
	return PointerGetDatum(construct_array(d, nb + 1, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/* Record one sample in a stage histogram (the caller holds its area's lock). */
void
spool_hist_add(SpoolHist *h, double v, TimestampTz now)
{
	spool_hist_bucket_add(h->counts, SPOOL_HIST_BUCKETS, v, h->first);
	h->count++;
	h->sum += v;
	h->max = Max(h->max, v);
	h->last = v;
	h->last_at = now;
}

/* Set up an empty histogram whose first bucket ends at first. */
void
spool_hist_init(SpoolHist *h, double first)
{
	memset(h, 0, sizeof(SpoolHist));
	h->first = first;
}

/*
 * One row of a stage histogram SRF (see spool.stage_histograms):
 * stage, object, replica, histogram, unit, bounds, counts, count, sum, max,
 * last, last_at.  h is a copy taken under the area's lock.
 */
void
spool_hist_put(ReturnSetInfo *rsinfo, const char *stage, const char *object,
			   int replica, const char *name, const char *unit, const SpoolHist *h)
{
	Datum		v[12];
	bool		n[12];
	Datum		bounds[SPOOL_HIST_BUCKETS];
	double		ub = h->first;
	int			b;

	memset(n, false, sizeof(n));
	for (b = 0; b < SPOOL_HIST_BUCKETS; b++, ub *= 2)
		bounds[b] = Float8GetDatum(ub);
	v[0] = CStringGetTextDatum(stage);
	v[1] = CStringGetTextDatum(object);
	v[2] = Int32GetDatum(replica);
	n[2] = replica <= 0;
	v[3] = CStringGetTextDatum(name);
	v[4] = CStringGetTextDatum(unit);
	v[5] = PointerGetDatum(construct_array(bounds, SPOOL_HIST_BUCKETS, FLOAT8OID, 8,
										   FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	v[6] = spool_hist_array(h->counts, SPOOL_HIST_BUCKETS);
	v[7] = Int64GetDatum((int64) h->count);
	v[8] = Float8GetDatum(h->sum);
	v[9] = Float8GetDatum(h->max);
	n[9] = h->count == 0;
	v[10] = Float8GetDatum(h->last);
	n[10] = h->count == 0;
	v[11] = TimestampTzGetDatum(h->last_at);
	n[11] = h->count == 0;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
}
