/*-------------------------------------------------------------------------
 *
 * nonce.c
 *	  The per-signer nonce allocator, basic mode: allocate, mark used, mark
 *	  recyclable.  Every write is fenced by the signer's lease
 *	  ('signer:' || signer) and by the caller's owner name.
 *
 * spool.nonce_signer holds the next new nonce, how many are RELEASED, and
 * the signer lease's current token; spool.nonce_store holds one row per nonce
 * handed out.  Every operation locks the signer row first, so operations on
 * one signer are serialised and the lowest RELEASED nonce is reused first.
 *
 * A signer belongs to the role its lease belongs to (lease.c): every
 * operation checks the caller's role against the lease's before anything
 * else, so an owner name and a token, which are small and guessable, are
 * not enough to use another role's signer.
 *
 * Fencing: the signer row is registered with the lease kernel as the guard
 * of lease 'signer:<signer>' (signer_guard): a new grant locks it and writes
 * its token there.  An operation that holds the signer row lock and sees its
 * token there therefore commits before any newer grant can, which is L-2
 * without a second row lock on the lease.  The token itself is checked by
 * the kernel's spool_fence_check, like every other fenced write.
 *
 * The common case (no RELEASED holes) is one statement for a batch of n:
 * bump next_nonce with the token check, and insert the n rows.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "storage/itemptr.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "lease/lease.h"
#include "nonce/nonce.h"

PG_FUNCTION_INFO_V1(spool_nonce_allocate);
PG_FUNCTION_INFO_V1(spool_nonce_mark_used);
PG_FUNCTION_INFO_V1(spool_nonce_mark_recyclable);
PG_FUNCTION_INFO_V1(spool_nonce_set_next);

static SPIPlanPtr plan_find_req = NULL;
static SPIPlanPtr plan_forget_req = NULL;
static SPIPlanPtr plan_take_new = NULL;
static SPIPlanPtr plan_lock_signer = NULL;
static SPIPlanPtr plan_reuse = NULL;
static SPIPlanPtr plan_get_nonce = NULL;
static SPIPlanPtr plan_set_state = NULL;
static SPIPlanPtr plan_guard_lock = NULL;
static SPIPlanPtr plan_guard_stamp = NULL;
static SPIPlanPtr plan_below_count = NULL;
static SPIPlanPtr plan_below_consume = NULL;
static SPIPlanPtr plan_set_next = NULL;
static SPIPlanPtr plan_set_next_log = NULL;

static void signer_guard_lock(const char *signer);
static void signer_guard_granted(const char *signer, int64 token, Oid role);

const SpoolLeaseGuard spool_signer_guard = {
	.prefix = "signer:",
	.noun = "signer",
	.lock = signer_guard_lock,
	.granted = signer_guard_granted,
};

/* The rows of a batch's reported nonces, read under the signer lock. */
typedef struct ReportRows
{
	int			n;
	int64	   *nonce;
	const char **state;			/* 'allocated', 'released' or 'consumed' */
	char	  **rid;			/* request_id, or NULL */
	ItemPointerData *tid;		/* ctid, for the update */
	bool	   *changed;		/* state changed by this batch */
} ReportRows;

static bool nonce_take_new(const char *signer, const char *owner, int64 token,
						   int n, const char **request_ids, int64 *nonces, Oid role);
static int64 signer_lock_and_check(const char *signer, const char *owner,
									int64 token, Oid role);
static void nonce_reuse_lowest(const char *signer, const char *owner,
							   int64 token, int n, const char **request_ids,
							   int64 *nonces);
static int	nonce_lookup_requests(const char *signer, int n,
								  const char **request_ids, const bool *fresh_ids,
								  int64 *nonces);
static void nonce_forget_released_requests(const char *signer, int n,
										   const char **request_ids);
static bool nonce_removed(const char *signer, int64 nonce);
static void report_rows_read(const char *signer, int n, const SpoolNonceReport *reports,
							 ReportRows *rows);
static int	report_decide(const char *signer, SpoolNonceReport *rep, const ReportRows *rows);
static void report_rows_write(const char *signer, const char *owner, int64 token,
							  const ReportRows *rows, int64 nreleased);
static void nonce_mark(FunctionCallInfo fcinfo, bool to_released);

/*
 * This part's statements run generic plans (spool_plan_generic): a custom
 * plan would be planned again at every call (most of a small batch's CPU
 * time), and it would trust statistics that do not know a new signer yet.
 * The statements are written so that their plan does not depend on the
 * signer: probes of the primary key or of the request index per element,
 * updates by ctid.
 */

static ArrayType *
text_array(int n, const char **items)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			i;

	for (i = 0; i < n; i++)
	{
		nulls[i] = (items[i] == NULL);
		d[i] = nulls[i] ? (Datum) 0 : CStringGetTextDatum(items[i]);
	}
	return construct_md_array(d, nulls, 1, dims, lbs, TEXTOID, -1, false, 'i');
}

/*
 * Fill nonces[i] for request ids that already own a nonce that is not
 * RELEASED (a repeated request).  Returns how many looked-up ids own a
 * RELEASED nonce: those get a fresh allocation, and their old rows must
 * forget the id first (nonce_forget_released_requests).
 */
static int
nonce_lookup_requests(const char *signer, int n, const char **request_ids,
					  const bool *fresh_ids, int64 *nonces)
{
	Oid			t[2] = {TEXTOID, TEXTARRAYOID};
	Datum		v[2];
	SPITupleTable *tt;
	uint64		nfound;
	uint64		i;
	int			j;
	int			nreleased = 0;
	bool		any = false;

	/* Ids made for their call and never queued before own no nonce. */
	for (j = 0; j < n; j++)
		any |= (request_ids[j] != NULL && !(fresh_ids && fresh_ids[j]));
	if (!any)
		return 0;

	/* One index probe per id (see spool_nonce_report_batch). */
	spool_plan_generic(&plan_find_req,
					   "SELECT u.r, s.nonce, s.state = 'released'"
					   "  FROM unnest($2::text[]) AS u(r),"
					   "       LATERAL (SELECT nonce, state FROM spool.nonce_store"
					   "                 WHERE signer = $1 AND request_id = u.r OFFSET 0) s",
					   2, t);
	v[0] = CStringGetTextDatum(signer);
	v[1] = PointerGetDatum(text_array(n, request_ids));
	spool_exec(plan_find_req, v, NULL, false, SPI_OK_SELECT);
	tt = SPI_tuptable;
	nfound = SPI_processed;
	for (i = 0; i < nfound; i++)
	{
		bool		isnull;
		char	   *rid = SPI_getvalue(tt->vals[i], tt->tupdesc, 1);
		int64		nonce = DatumGetInt64(SPI_getbinval(tt->vals[i], tt->tupdesc, 2, &isnull));

		if (DatumGetBool(SPI_getbinval(tt->vals[i], tt->tupdesc, 3, &isnull)))
		{
			nreleased++;
			continue;
		}
		for (j = 0; j < n; j++)
			if (request_ids[j] && strcmp(request_ids[j], rid) == 0)
				nonces[j] = nonce;
	}
	return nreleased;
}

/* RELEASED rows forget the request ids about to be allocated afresh. */
static void
nonce_forget_released_requests(const char *signer, int n, const char **request_ids)
{
	Oid			t[2] = {TEXTOID, TEXTARRAYOID};
	Datum		v[2];

	spool_plan_generic(&plan_forget_req,
					   "UPDATE spool.nonce_store SET request_id = NULL"
					   " WHERE ctid = ANY (ARRAY("
					   "   SELECT s.ctid FROM unnest($2::text[]) AS u(r),"
					   "          LATERAL (SELECT ctid FROM spool.nonce_store"
					   "                    WHERE signer = $1 AND request_id = u.r"
					   "                      AND state = 'released' OFFSET 0) s))",
					   2, t);
	v[0] = CStringGetTextDatum(signer);
	v[1] = PointerGetDatum(text_array(n, request_ids));
	spool_exec(plan_forget_req, v, NULL, false, SPI_OK_UPDATE);
}

/* A new grant of the signer's lease locks the signer row first. */
static void
signer_guard_lock(const char *signer)
{
	Datum		arg = CStringGetTextDatum(signer);

	spool_exec(spool_plan_generic(&plan_guard_lock,
								  "SELECT FROM spool.nonce_signer WHERE signer = $1 FOR UPDATE",
								  1, (Oid[]) {TEXTOID}),
			   &arg, NULL, false, SPI_OK_SELECT);
}

/*
 * ... and stamps it with the new token.  The signer belongs to the client
 * role that leases it; one served by the workers belongs to its first
 * requester (worker.c).
 */
static void
signer_guard_granted(const char *signer, int64 token, Oid role)
{
	Datum		v[3];
	char		nulls[3] = {' ', ' ', role == SPOOL_LEASE_INTERNAL ? 'n' : ' '};

	spool_plan_generic(&plan_guard_stamp,
					   "INSERT INTO spool.nonce_signer (signer, lease_token, role) VALUES ($1, $2, $3)"
					   " ON CONFLICT (signer) DO UPDATE SET lease_token = EXCLUDED.lease_token,"
					   " role = coalesce(nonce_signer.role, EXCLUDED.role)",
					   3, (Oid[]) {TEXTOID, INT8OID, OIDOID});
	v[0] = CStringGetTextDatum(signer);
	v[1] = Int64GetDatum(token);
	v[2] = ObjectIdGetDatum(role);
	spool_exec(plan_guard_stamp, v, nulls, false, SPI_OK_INSERT);
}

/* The lease of a signer. */
char *
spool_signer_resource(const char *signer)
{
	return psprintf("%s%s", spool_signer_guard.prefix, signer);
}

/*
 * Fast path: when the signer has no RELEASED nonces and (owner, token) holds
 * its live lease, hand out the next n new nonces in one statement.  Returns
 * false (and does nothing) otherwise; signer_lock_and_check says why.  A
 * lease of a role that role may not use raises 42501, undoing the statement.
 */
static bool
nonce_take_new(const char *signer, const char *owner, int64 token,
			   int n, const char **request_ids, int64 *nonces, Oid role)
{
	Oid			t[5] = {TEXTOID, INT8OID, TEXTOID, INT8OID, TEXTARRAYOID};
	Datum		v[5];
	bool		isnull;
	bool		role_null;
	SpoolLeaseRow row = {.found = true, .owner = (char *) owner, .token = token, .live = true};
	int64		base;
	int			i;

	spool_plan_generic(&plan_take_new,
					   "WITH s AS ("
					   "  UPDATE spool.nonce_signer ns SET next_nonce = ns.next_nonce + $2"
					   "    FROM spool.lease_store l"
					   "   WHERE ns.signer = $1 AND ns.released = 0 AND ns.lease_token = $4"
					   "     AND l.resource = 'signer:' || $1 AND l.owner = $3"
					   "     AND l.token = $4 AND l.expires_at > clock_timestamp()"
					   "  RETURNING ns.next_nonce - $2 AS base, l.role),"
					   " ins AS ("
					   "  INSERT INTO spool.nonce_store (signer, nonce, state, owner, token, request_id)"
					   "  SELECT $1, s.base + u.o - 1, 'allocated', $3, $4, u.r"
					   "    FROM s, unnest($5::text[]) WITH ORDINALITY AS u(r, o))"
					   " SELECT base, role FROM s",
					   5, t);
	v[0] = CStringGetTextDatum(signer);
	v[1] = Int64GetDatum((int64) n);
	v[2] = CStringGetTextDatum(owner);
	v[3] = Int64GetDatum(token);
	v[4] = PointerGetDatum(text_array(n, request_ids));
	if (spool_exec(plan_take_new, v, NULL, false, SPI_OK_SELECT) == 0)
		return false;
	base = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
	row.role = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 2, &role_null));
	row.has_role = !role_null;
	(void) spool_fence_check(spool_signer_resource(signer), &spool_signer_guard, &row,
							 owner, token, role, true);
	for (i = 0; i < n; i++)
		nonces[i] = base + i;
	return true;
}

/*
 * Lock the signer row and check that role may use the signer and that
 * (owner, token) holds its live lease, raising the precise error otherwise.
 * Returns the number of RELEASED nonces.  After it returns, no newer grant of
 * the signer lease can commit before this transaction ends.
 */
static int64
signer_lock_and_check(const char *signer, const char *owner, int64 token, Oid role)
{
	Datum		v[1];
	SPITupleTable *tt;
	bool		isnull;
	bool		role_null;
	SpoolLeaseRow row = {.found = true};

	spool_plan_generic(&plan_lock_signer,
					   "SELECT ns.released, ns.lease_token, l.owner,"
					   "       coalesce(l.expires_at > clock_timestamp(), false), l.role"
					   "  FROM spool.nonce_signer ns"
					   "  LEFT JOIN spool.lease_store l ON l.resource = 'signer:' || ns.signer"
					   " WHERE ns.signer = $1 FOR NO KEY UPDATE OF ns",
					   1, (Oid[]) {TEXTOID});
	v[0] = CStringGetTextDatum(signer);
	if (spool_exec(plan_lock_signer, v, NULL, false, SPI_OK_SELECT) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("signer \"%s\" has no lease", signer),
				 errhint("Acquire the lease \"signer:%s\" with spool.lease_acquire first.", signer)));
	tt = SPI_tuptable;
	row.token = DatumGetInt64(SPI_getbinval(tt->vals[0], tt->tupdesc, 2, &isnull));
	row.owner = SPI_getvalue(tt->vals[0], tt->tupdesc, 3);
	row.live = DatumGetBool(SPI_getbinval(tt->vals[0], tt->tupdesc, 4, &isnull));
	row.role = DatumGetObjectId(SPI_getbinval(tt->vals[0], tt->tupdesc, 5, &role_null));
	row.has_role = !role_null;
	(void) spool_fence_check(spool_signer_resource(signer), &spool_signer_guard, &row,
							 owner, token, role, true);
	return DatumGetInt64(SPI_getbinval(tt->vals[0], tt->tupdesc, 1, &isnull));
}

/*
 * Reuse the n lowest RELEASED nonces of a signer whose row the caller has
 * locked and checked, for request_ids[0..n) in that order, in one
 * statement; their nonces go to nonces[].  The signer counts at least n.
 */
static void
nonce_reuse_lowest(const char *signer, const char *owner, int64 token,
				   int n, const char **request_ids, int64 *nonces)
{
	Oid			t[5] = {TEXTOID, TEXTOID, INT8OID, INT4OID, TEXTARRAYOID};
	Datum		v[5];
	uint64		got;
	uint64		i;

	spool_plan_generic(&plan_reuse,
					   "WITH h AS (SELECT nonce, ctid, row_number() OVER (ORDER BY nonce) AS o"
					   "             FROM spool.nonce_store"
					   "            WHERE signer = $1 AND state = 'released'"
					   "            ORDER BY nonce LIMIT $4),"
					   " u AS (UPDATE spool.nonce_store n SET state = 'allocated', owner = $2,"
					   "        token = $3, request_id = ($5::text[])[h.o],"
					   "        updated_at = clock_timestamp()"
					   "         FROM h WHERE n.ctid = h.ctid"
					   "       RETURNING n.nonce, h.o),"
					   " c AS (UPDATE spool.nonce_signer SET released = released - (SELECT count(*) FROM u)"
					   "        WHERE signer = $1)"
					   " SELECT nonce FROM u ORDER BY o",
					   5, t);
	v[0] = CStringGetTextDatum(signer);
	v[1] = CStringGetTextDatum(owner);
	v[2] = Int64GetDatum(token);
	v[3] = Int32GetDatum(n);
	v[4] = PointerGetDatum(text_array(n, request_ids));
	got = spool_exec(plan_reuse, v, NULL, false, SPI_OK_SELECT);
	if (got != (uint64) n)
		elog(ERROR, "signer \"%s\" counts %d released nonces but " UINT64_FORMAT " were found",
			 signer, n, got);
	for (i = 0; i < got; i++)
	{
		bool		isnull;

		nonces[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												SPI_tuptable->tupdesc, 1, &isnull));
	}
}

/*
 * Allocate n nonces for signer in the current transaction, fenced by
 * (owner, token), for role (a client's, or SPOOL_LEASE_INTERNAL).
 * request_ids[i] may be NULL; a repeated id returns the nonce it got before,
 * also when it repeats within the batch; fresh_ids (may be NULL) marks ids
 * known to own no nonce, which are not looked up.  locked_released >= 0 says
 * that this transaction already locked the signer row and checked the fence
 * (spool_nonce_report_batch returned it), and how many nonces are RELEASED:
 * the lock and the check are not repeated.  The caller is connected to SPI.
 */
void
spool_nonce_allocate_batch(const char *signer, const char *owner, int64 token,
						   int n, const char **request_ids, const bool *fresh_ids,
						   int64 *nonces, Oid role, int64 locked_released)
{
	const char **pending_ids = palloc(sizeof(char *) * n);
	int		   *pending_at = palloc(sizeof(int) * n);
	int64	   *got = palloc(sizeof(int64) * n);
	int			npending = 0;
	int			done = 0;
	int64		released;
	int			reissued;
	int			i;
	int			j;

	for (i = 0; i < n; i++)
		nonces[i] = -1;
	reissued = nonce_lookup_requests(signer, n, request_ids, fresh_ids, nonces);

	/* Pending: no nonce yet, and not a repeat of an earlier request in the batch. */
	for (i = 0; i < n; i++)
	{
		bool		repeat = false;

		if (nonces[i] >= 0)
			continue;
		for (j = 0; j < npending && request_ids[i]; j++)
			if (pending_ids[j] && strcmp(pending_ids[j], request_ids[i]) == 0)
				repeat = true;
		if (repeat)
			continue;
		pending_ids[npending] = request_ids[i];
		pending_at[npending] = i;
		npending++;
	}

	/*
	 * Common case: one fenced statement; otherwise lock, check, and reuse
	 * holes.  With the signer locked and checked already, go straight to the
	 * holes when there are any.
	 */
	if (npending == 0 || reissued > 0 || locked_released > 0 ||
		!nonce_take_new(signer, owner, token, npending, pending_ids, got, role))
	{
		released = locked_released >= 0 ? locked_released :
			signer_lock_and_check(signer, owner, token, role);
		if (npending > 0 && reissued > 0)
			nonce_forget_released_requests(signer, npending, pending_ids);
		if (npending > 0 && released > 0)
		{
			done = (int) Min((int64) npending, released);
			nonce_reuse_lowest(signer, owner, token, done, pending_ids, got);
		}
		if (done < npending &&
			!nonce_take_new(signer, owner, token, npending - done,
							pending_ids + done, got + done, role))
			elog(ERROR, "nonce allocation for signer \"%s\" failed under its lock", signer);
	}

	for (i = 0; i < npending; i++)
		nonces[pending_at[i]] = got[i];
	/* In-batch repeats of a request id share its nonce. */
	for (i = 0; i < n; i++)
		if (nonces[i] < 0)
			for (j = 0; j < npending; j++)
				if (pending_ids[j] && request_ids[i] &&
					strcmp(pending_ids[j], request_ids[i]) == 0)
					nonces[i] = got[j];
}

/*
 * SQL: spool.nonce_allocate(signer, owner, token, request_id) RETURNS bigint
 */
Datum
spool_nonce_allocate(PG_FUNCTION_ARGS)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	char	   *owner = spool_arg_name(fcinfo, 1, "owner");
	int64		token = spool_arg_int64(fcinfo, 2, "token", true);
	const char *request_id = spool_arg_name_opt(fcinfo, 3, "request_id");
	int64		nonce;
	SpoolCaller caller;

	spool_require_shmem();
	spool_enter(&caller);
	SPI_connect();
	spool_nonce_allocate_batch(signer, owner, token, 1, &request_id, NULL, &nonce,
							   caller.role, -1);
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_INT64(nonce);
}

/*
 * A nonce without a row that the signer has handed out (below next_nonce)
 * was consumed and removed by retention.  Only called on a miss.
 */
static bool
nonce_removed(const char *signer, int64 nonce)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute_with_args("SELECT next_nonce FROM spool.nonce_signer WHERE signer = $1",
							  1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(signer)},
							  NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.nonce_signer");
	if (SPI_processed == 0)
		return false;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return !isnull && nonce < DatumGetInt64(d);
}

/*
 * Read the rows of the reported nonces (each once) with their ctids, for
 * report_decide and report_rows_write.  The caller holds the signer lock.
 */
static void
report_rows_read(const char *signer, int n, const SpoolNonceReport *reports, ReportRows *rows)
{
	Oid			t2[2] = {TEXTOID, INT8ARRAYOID};
	Datum		v[2];
	Datum	   *nd = palloc(sizeof(Datum) * Max(n, 1));
	int			nd_n = 0;
	int			i;
	int			r;

	/* Each nonce once: a row is changed at most once. */
	for (i = 0; i < n; i++)
	{
		for (r = 0; r < nd_n && DatumGetInt64(nd[r]) != reports[i].nonce; r++)
			;
		if (r == nd_n)
			nd[nd_n++] = Int64GetDatum(reports[i].nonce);
	}

	/*
	 * One index probe per nonce (a lateral subquery that is not flattened):
	 * written as "nonce = ANY ($2)" or as a join, the planner may pick a scan
	 * of all the signer's rows, which looks cheap while the statistics do not
	 * know the signer yet (a new, hot signer) and costs O(rows) per batch.
	 * ctid names the row for the update; it cannot change before then,
	 * because every writer of a non-consumed row holds the signer row lock.
	 */
	spool_plan_generic(&plan_get_nonce,
					   "SELECT u.n, s.state::text, s.request_id, s.ctid"
					   "  FROM unnest($2::bigint[]) AS u(n),"
					   "       LATERAL (SELECT state, request_id, ctid FROM spool.nonce_store"
					   "                 WHERE signer = $1 AND nonce = u.n OFFSET 0) s",
					   2, t2);
	v[0] = CStringGetTextDatum(signer);
	v[1] = PointerGetDatum(construct_array(nd, nd_n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	rows->n = (int) spool_exec(plan_get_nonce, v, NULL, false, SPI_OK_SELECT);
	rows->nonce = palloc(sizeof(int64) * Max(rows->n, 1));
	rows->state = palloc(sizeof(char *) * Max(rows->n, 1));
	rows->rid = palloc(sizeof(char *) * Max(rows->n, 1));
	rows->tid = palloc(sizeof(ItemPointerData) * Max(rows->n, 1));
	rows->changed = palloc0(sizeof(bool) * Max(rows->n, 1));
	for (r = 0; r < rows->n; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		rows->nonce[r] = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		rows->state[r] = SPI_getvalue(tup, desc, 2);
		rows->rid[r] = SPI_getvalue(tup, desc, 3);
		ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(tup, desc, 4, &isnull)),
						&rows->tid[r]);
	}
}

/* Set rep's error: SP006 (illegal transition) with its message and detail. */
static void
report_transition_error(SpoolNonceReport *rep, const char *signer, const char *what,
						const char *detail)
{
	rep->sqlerrcode = ERRCODE_SPOOL_NONCE_TRANSITION;
	rep->errmsg = psprintf("nonce " INT64_FORMAT " of signer \"%s\" %s", rep->nonce, signer, what);
	rep->errdetail = unconstify(char *, detail);
}

/*
 * The state machine for one report against the rows read: returns the index
 * of the row to move from ALLOCATED to the reported state, or -1 when there
 * is nothing to change (a repeat) or the report fails (its error set in rep).
 */
static int
report_decide(const char *signer, SpoolNonceReport *rep, const ReportRows *rows)
{
	const char *target = rep->to_released ? "released" : "consumed";
	int			r;

	rep->sqlerrcode = 0;
	for (r = 0; r < rows->n && rows->nonce[r] != rep->nonce; r++)
		;
	if (r == rows->n && nonce_removed(signer, rep->nonce))
	{
		/*
		 * Every nonce below next_nonce has a row until retention removes it,
		 * and retention removes only consumed ones: CONSUMED stays final, and
		 * marking it used again is a repeat.
		 */
		if (rep->to_released)
			report_transition_error(rep, signer, "is consumed and cannot be released",
									"It was consumed and later removed by spool.nonce_history_retention.");
		return -1;
	}
	if (r == rows->n)
	{
		rep->sqlerrcode = ERRCODE_SPOOL_UNKNOWN_NONCE;
		rep->errmsg = psprintf("nonce " INT64_FORMAT " of signer \"%s\" was never allocated",
							   rep->nonce, signer);
		rep->errhint = "Only nonces returned by spool.nonce_allocate or spool.nonce_request can be marked.";
		return -1;
	}
	if (rep->match_request &&
		!((rep->request_id == NULL && rows->rid[r] == NULL) ||
		  (rep->request_id != NULL && rows->rid[r] != NULL &&
		   strcmp(rep->request_id, rows->rid[r]) == 0)))
	{
		/* The reported allocation was given back (and maybe reused). */
		if (!rep->to_released)
			report_transition_error(rep, signer, "was given back and cannot be marked used",
									"The allocation reported on was released; the nonce may have been handed out again.");
		return -1;				/* else a repeat */
	}
	if (strcmp(rows->state[r], target) == 0)
		return -1;				/* a repeat: nothing to do */
	if (strcmp(rows->state[r], "consumed") == 0)
	{
		report_transition_error(rep, signer, "is consumed and cannot be released",
								"CONSUMED is final.");
		return -1;
	}
	if (strcmp(rows->state[r], "released") == 0)
	{
		report_transition_error(rep, signer, "is released and cannot be marked used",
								"A released nonce was given back and may be handed out again.");
		rep->errhint = "Allocate it again with spool.nonce_allocate before using it.";
		return -1;
	}
	return r;
}

/*
 * Write the changed rows (by the ctids read under the signer lock: a TID
 * scan, whatever the statistics say) and the signer's count of released
 * ones, in one statement.
 */
static void
report_rows_write(const char *signer, const char *owner, int64 token,
				  const ReportRows *rows, int64 nreleased)
{
	Oid			t6[6] = {TEXTOID, TIDARRAYOID, TIDARRAYOID, TEXTOID, INT8OID, INT8OID};
	Datum		v[6];
	Datum	   *ct;
	Datum	   *rt;
	int			nchanged = 0;
	int			k = 0;
	int			kr = 0;
	int			r;

	for (r = 0; r < rows->n; r++)
		if (rows->changed[r])
			nchanged++;
	if (nchanged == 0)
		return;
	ct = palloc(sizeof(Datum) * nchanged);
	rt = palloc(sizeof(Datum) * Max(nreleased, 1));
	for (r = 0; r < rows->n; r++)
		if (rows->changed[r])
		{
			ct[k++] = PointerGetDatum(&rows->tid[r]);
			if (strcmp(rows->state[r], "released") == 0)
				rt[kr++] = PointerGetDatum(&rows->tid[r]);
		}

	spool_plan_generic(&plan_set_state,
					   "WITH u AS (UPDATE spool.nonce_store n"
					   "              SET state = CASE WHEN n.ctid = ANY ($3) THEN 'released'"
					   "                               ELSE 'consumed' END::spool.nonce_state,"
					   "                  owner = $4, token = $5, updated_at = clock_timestamp()"
					   "            WHERE n.ctid = ANY ($2))"
					   " UPDATE spool.nonce_signer SET released = released + $6"
					   "  WHERE signer = $1 AND $6 > 0",
					   6, t6);
	v[0] = CStringGetTextDatum(signer);
	v[1] = PointerGetDatum(construct_array(ct, nchanged, TIDOID, sizeof(ItemPointerData),
										   false, TYPALIGN_SHORT));
	v[2] = PointerGetDatum(construct_array(rt, kr, TIDOID, sizeof(ItemPointerData),
										   false, TYPALIGN_SHORT));
	v[3] = CStringGetTextDatum(owner);
	v[4] = Int64GetDatum(token);
	v[5] = Int64GetDatum(nreleased);
	spool_exec(plan_set_state, v, NULL, false, SPI_OK_UPDATE);
}

/*
 * The one state machine of a nonce, for basic mode and the worker queue:
 * apply reports[0..n) in order to signer's nonces, in the current
 * transaction, fenced by (owner, token) for role.  ALLOCATED may move to
 * either state; repeating a move is harmless; CONSUMED is final and a
 * RELEASED nonce cannot be consumed (it was given back).  A report that
 * names the allocation by its request id (match_request) and finds another
 * one on the nonce concerns an allocation that was given back since: a
 * repeat for 'recyclable', SP006 for 'used'.
 *
 * Fence and role problems raise (they concern every report); a report's own
 * problem (SP005, SP006) is returned in it, so one bad report fails nobody
 * else.  Changes are written with one statement whatever n is.  Returns
 * how many of the signer's nonces are RELEASED now; the signer row stays
 * locked until the transaction ends.  The caller is connected to SPI.
 */
int64
spool_nonce_report_batch(const char *signer, const char *owner, int64 token,
						 Oid role, int n, SpoolNonceReport *reports)
{
	ReportRows	rows;
	int64		nreleased = 0;
	int64		released;
	int			i;

	/*
	 * Signer row first, in the same order as allocation (no deadlock).  Every
	 * writer of the signer's nonce rows holds that lock, so the rows need no
	 * lock of their own.
	 */
	released = signer_lock_and_check(signer, owner, token, role);
	report_rows_read(signer, n, reports, &rows);
	for (i = 0; i < n; i++)
	{
		int			r = report_decide(signer, &reports[i], &rows);

		if (r < 0)
			continue;
		/* ALLOCATED -> the reported state */
		rows.state[r] = reports[i].to_released ? "released" : "consumed";
		rows.changed[r] = true;
		if (reports[i].to_released)
			nreleased++;
	}
	report_rows_write(signer, owner, token, &rows, nreleased);
	return released + nreleased;
}

/* Raise the error a report recorded, if any. */
void
spool_nonce_report_raise(const SpoolNonceReport *rep)
{
	if (rep->sqlerrcode == 0)
		return;
	ereport(ERROR,
			(errcode(rep->sqlerrcode),
			 errmsg("%s", rep->errmsg),
			 rep->errdetail ? errdetail("%s", rep->errdetail) : 0,
			 rep->errhint ? errhint("%s", rep->errhint) : 0));
}

/* SQL: nonce_mark_used and nonce_mark_recyclable, through the kernel. */
static void
nonce_mark(FunctionCallInfo fcinfo, bool to_released)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	int64		nonce = spool_arg_int64(fcinfo, 1, "nonce", true);
	char	   *owner = spool_arg_name(fcinfo, 2, "owner");
	int64		token = spool_arg_int64(fcinfo, 3, "token", true);
	SpoolNonceReport rep = {.nonce = nonce, .to_released = to_released};
	SpoolCaller caller;

	spool_require_shmem();
	spool_enter(&caller);
	SPI_connect();
	(void) spool_nonce_report_batch(signer, owner, token, caller.role, 1, &rep);
	spool_nonce_report_raise(&rep);
	SPI_finish();
	spool_leave(&caller);
}

/*
 * SQL: spool.nonce_mark_used(signer, nonce, owner, token) RETURNS void
 */
Datum
spool_nonce_mark_used(PG_FUNCTION_ARGS)
{
	nonce_mark(fcinfo, false);
	PG_RETURN_VOID();
}

/*
 * SQL: spool.nonce_mark_recyclable(signer, nonce, owner, token) RETURNS void
 */
Datum
spool_nonce_mark_recyclable(PG_FUNCTION_ARGS)
{
	nonce_mark(fcinfo, true);
	PG_RETURN_VOID();
}

/*
 * Bring signer in step with the chain, whose pending nonce is next: every
 * nonce below it is on chain.  In the current transaction, fenced by (owner,
 * token) for role; the caller is connected to SPI.  Returns the nonce the
 * allocator hands out next.
 *
 * - ALLOCATED and RELEASED nonces below next become CONSUMED: the chain has
 *   a transaction with each of them, so none may be handed out again.
 * - Forwards (next above next_nonce): next_nonce becomes next; the nonces
 *   in between were used outside the allocator and are never handed out.
 * - Backwards (next below next_nonce): nothing at or above next changes.
 *   ALLOCATED ones are held by someone who may still send them, CONSUMED
 *   ones were sent and may still be in flight (or return after a reorg), so
 *   handing either out again could put two transactions on one nonce;
 *   RELEASED ones are handed out again, lowest first, as always.
 *
 * The change is recorded in spool.nonce_set_next_log and the server log.
 */
int64
spool_nonce_set_next_kernel(const char *signer, int64 next, const char *owner,
							int64 token, Oid role)
{
	Datum		v[4];
	bool		isnull;
	int64		consumed;
	int64		was_released;
	int64		old_next;
	int64		new_next;
	int64		next_out;
	HeapTuple	tup;
	TupleDesc	desc;

	(void) signer_lock_and_check(signer, owner, token, role);
	v[0] = CStringGetTextDatum(signer);
	v[1] = Int64GetDatum(next);
	v[2] = CStringGetTextDatum(owner);
	v[3] = Int64GetDatum(token);

	/* Under the signer row lock, which every writer of these rows takes. */
	spool_plan_generic(&plan_below_count,
					   "SELECT count(*), count(*) FILTER (WHERE state = 'released')"
					   "  FROM spool.nonce_store"
					   " WHERE signer = $1 AND nonce < $2 AND state <> 'consumed'",
					   2, (Oid[]) {TEXTOID, INT8OID});
	spool_exec(plan_below_count, v, NULL, false, SPI_OK_SELECT);
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	consumed = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	was_released = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	if (consumed > 0)
	{
		spool_plan_generic(&plan_below_consume,
						   "UPDATE spool.nonce_store SET state = 'consumed', owner = $3, token = $4,"
						   " updated_at = clock_timestamp()"
						   " WHERE signer = $1 AND nonce < $2 AND state <> 'consumed'",
						   4, (Oid[]) {TEXTOID, INT8OID, TEXTOID, INT8OID});
		spool_exec(plan_below_consume, v, NULL, false, SPI_OK_UPDATE);
	}

	spool_plan_generic(&plan_set_next,
					   "WITH o AS (SELECT next_nonce FROM spool.nonce_signer WHERE signer = $1),"
					   " u AS (UPDATE spool.nonce_signer SET next_nonce = greatest(next_nonce, $2),"
					   "        released = released - $3 WHERE signer = $1"
					   "       RETURNING next_nonce)"
					   " SELECT o.next_nonce, u.next_nonce,"
					   "        coalesce((SELECT min(nonce) FROM spool.nonce_store"
					   "                   WHERE signer = $1 AND state = 'released' AND nonce >= $2),"
					   "                 u.next_nonce)"
					   "   FROM o, u",
					   3, (Oid[]) {TEXTOID, INT8OID, INT8OID});
	{
		Datum		sv[3] = {v[0], v[1], Int64GetDatum(was_released)};

		if (spool_exec(plan_set_next, sv, NULL, false, SPI_OK_SELECT) != 1)
			elog(ERROR, "signer \"%s\" has no row under its lock", signer);
	}
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	old_next = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	new_next = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	next_out = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));

	spool_plan_generic(&plan_set_next_log,
					   "INSERT INTO spool.nonce_set_next_log"
					   " (signer, chain_next, old_next, new_next, consumed, next_out, owner, token)"
					   " VALUES ($1, $2, $5, $6, $7, $8, $3, $4)",
					   8, (Oid[]) {TEXTOID, INT8OID, TEXTOID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID});
	{
		Datum		lv[8] = {v[0], v[1], v[2], v[3], Int64GetDatum(old_next),
		Int64GetDatum(new_next), Int64GetDatum(consumed), Int64GetDatum(next_out)};

		spool_exec(plan_set_next_log, lv, NULL, false, SPI_OK_INSERT);
	}
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("spool: signer \"%s\" set to chain nonce " INT64_FORMAT ": next new nonce "
					INT64_FORMAT " -> " INT64_FORMAT ", " INT64_FORMAT " below it consumed, next handed out "
					INT64_FORMAT, signer, next, old_next, new_next, consumed, next_out),
			 errdetail("Set by \"%s\" with token " INT64_FORMAT ".", owner, token)));
	return next_out;
}

/*
 * SQL: spool.nonce_set_next(signer, next_nonce, owner, token) RETURNS bigint
 * With owner and token: basic mode, in the caller's transaction.  Without
 * both: through the nonce worker that serves the signer (queue.c).
 */
Datum
spool_nonce_set_next(PG_FUNCTION_ARGS)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	int64		next = spool_arg_int64(fcinfo, 1, "next_nonce", true);
	char	   *owner;
	int64		token;
	int64		next_out;
	SpoolCaller caller;

	if (PG_ARGISNULL(2) && PG_ARGISNULL(3))
		PG_RETURN_INT64(spool_nonce_queue_call(signer, SPOOL_REQ_SET_NEXT, next, NULL, false,
											   NULL));
	owner = spool_arg_name(fcinfo, 2, "owner");
	token = spool_arg_int64(fcinfo, 3, "token", true);
	spool_require_shmem();
	spool_enter(&caller);
	SPI_connect();
	next_out = spool_nonce_set_next_kernel(signer, next, owner, token, caller.role);
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_INT64(next_out);
}

/*
 * How many signers have handed out nonces (their next nonce is not 0): what
 * DROP EXTENSION would lose.  The caller is connected to SPI.
 */
int64
spool_nonce_signers_in_use(void)
{
	bool		isnull;

	if (SPI_execute("SELECT count(*) FROM spool.nonce_signer WHERE next_nonce > 0",
					true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count the signers of spool.nonce_signer");
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
}
