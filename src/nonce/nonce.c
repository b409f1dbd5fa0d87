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
#include "utils/array.h"
#include "utils/builtins.h"

#include "lease/lease.h"
#include "nonce/nonce.h"

PG_FUNCTION_INFO_V1(spool_nonce_allocate);
PG_FUNCTION_INFO_V1(spool_nonce_mark_used);
PG_FUNCTION_INFO_V1(spool_nonce_mark_recyclable);

static SPIPlanPtr plan_find_req = NULL;
static SPIPlanPtr plan_forget_req = NULL;
static SPIPlanPtr plan_take_new = NULL;
static SPIPlanPtr plan_lock_signer = NULL;
static SPIPlanPtr plan_reuse = NULL;
static SPIPlanPtr plan_unrelease = NULL;
static SPIPlanPtr plan_get_nonce = NULL;
static SPIPlanPtr plan_set_state = NULL;
static SPIPlanPtr plan_release_count = NULL;
static SPIPlanPtr plan_guard_lock = NULL;
static SPIPlanPtr plan_guard_stamp = NULL;

static void signer_guard_lock(const char *signer);
static void signer_guard_granted(const char *signer, int64 token, Oid role);

const SpoolLeaseGuard spool_signer_guard = {
	.prefix = "signer:",
	.noun = "signer",
	.lock = signer_guard_lock,
	.granted = signer_guard_granted,
};

static bool nonce_take_new(const char *signer, const char *owner, int64 token,
						   int n, const char **request_ids, int64 *nonces, Oid role);
static int64 signer_lock_and_check(const char *signer, const char *owner,
									int64 token, Oid role);
static int64 nonce_reuse_lowest(const char *signer, const char *owner,
								int64 token, const char *request_id);
static int	nonce_lookup_requests(const char *signer, int n,
								  const char **request_ids, int64 *nonces);
static void nonce_forget_released_requests(const char *signer, int n,
										   const char **request_ids);
static bool nonce_removed(const char *signer, int64 nonce);
static void nonce_mark(FunctionCallInfo fcinfo, const char *target);

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
					  int64 *nonces)
{
	Oid			t[2] = {TEXTOID, TEXTARRAYOID};
	Datum		v[2];
	SPITupleTable *tt;
	uint64		nfound;
	uint64		i;
	int			j;
	int			nreleased = 0;
	bool		any = false;

	for (j = 0; j < n; j++)
		any |= (request_ids[j] != NULL);
	if (!any)
		return 0;

	spool_plan(&plan_find_req,
			   "SELECT request_id, nonce, state = 'released'"
			   " FROM spool.nonce_store"
			   " WHERE signer = $1 AND request_id = ANY ($2)",
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

	spool_plan(&plan_forget_req,
			   "UPDATE spool.nonce_store SET request_id = NULL"
			   " WHERE signer = $1 AND request_id = ANY ($2) AND state = 'released'",
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

	spool_exec(spool_plan(&plan_guard_lock,
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

	spool_plan(&plan_guard_stamp,
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

	spool_plan(&plan_take_new,
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

	spool_plan(&plan_lock_signer,
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
 * Reuse the lowest RELEASED nonce of a signer whose row the caller has
 * locked and checked.
 */
static int64
nonce_reuse_lowest(const char *signer, const char *owner, int64 token,
				   const char *request_id)
{
	Oid			t1[1] = {TEXTOID};
	Oid			t4[4] = {TEXTOID, TEXTOID, INT8OID, TEXTOID};
	Datum		v[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	bool		isnull;
	int64		nonce;

	spool_plan(&plan_reuse,
			   "UPDATE spool.nonce_store SET state = 'allocated', owner = $2,"
			   " token = $3, request_id = $4, updated_at = clock_timestamp()"
			   " WHERE signer = $1 AND nonce = (SELECT min(nonce)"
			   "   FROM spool.nonce_store WHERE signer = $1 AND state = 'released')"
			   " RETURNING nonce",
			   4, t4);
	v[0] = CStringGetTextDatum(signer);
	v[1] = CStringGetTextDatum(owner);
	v[2] = Int64GetDatum(token);
	spool_text_param(v, nulls, 3, request_id);
	if (spool_exec(plan_reuse, v, nulls, false, SPI_OK_UPDATE_RETURNING) != 1)
		elog(ERROR, "signer \"%s\" counts released nonces but none was found", signer);
	nonce = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										SPI_tuptable->tupdesc, 1, &isnull));

	spool_plan(&plan_unrelease,
			   "UPDATE spool.nonce_signer SET released = released - 1"
			   " WHERE signer = $1",
			   1, t1);
	spool_exec(plan_unrelease, v, NULL, false, SPI_OK_UPDATE);
	return nonce;
}

/*
 * Allocate n nonces for signer in the current transaction, fenced by
 * (owner, token), for role (a client's, or SPOOL_LEASE_INTERNAL).
 * request_ids[i] may be NULL; a repeated id returns the nonce it got before,
 * also when it repeats within the batch.  The caller is connected to SPI.
 */
void
spool_nonce_allocate_batch(const char *signer, const char *owner, int64 token,
						   int n, const char **request_ids, int64 *nonces, Oid role)
{
	const char **pending_ids = palloc(sizeof(char *) * n);
	int		   *pending_at = palloc(sizeof(int) * n);
	int64	   *got = palloc(sizeof(int64) * n);
	int			npending = 0;
	int			done = 0;
	int64		released;
	int			i;
	int			j;

	for (i = 0; i < n; i++)
		nonces[i] = -1;
	released = nonce_lookup_requests(signer, n, request_ids, nonces);

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

	/* Common case: one fenced statement; otherwise lock, check, and reuse holes. */
	if (npending == 0 || released > 0 ||
		!nonce_take_new(signer, owner, token, npending, pending_ids, got, role))
	{
		released = signer_lock_and_check(signer, owner, token, role);
		if (npending > 0)
			nonce_forget_released_requests(signer, npending, pending_ids);
		for (; done < npending && released > 0; released--)
		{
			got[done] = nonce_reuse_lowest(signer, owner, token, pending_ids[done]);
			done++;
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
	spool_nonce_allocate_batch(signer, owner, token, 1, &request_id, &nonce, caller.role);
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
 * Move a nonce to target ('consumed' or 'released').  ALLOCATED may move to
 * either; repeating the same move is harmless; CONSUMED is final and a
 * RELEASED nonce cannot be consumed (it was given back).
 */
static void
nonce_mark(FunctionCallInfo fcinfo, const char *target)
{
	char	   *signer = spool_arg_signer(fcinfo, 0);
	int64		nonce = spool_arg_int64(fcinfo, 1, "nonce", true);
	char	   *owner = spool_arg_name(fcinfo, 2, "owner");
	int64		token = spool_arg_int64(fcinfo, 3, "token", true);
	bool		to_released = strcmp(target, "released") == 0;
	Oid			t2[2] = {TEXTOID, INT8OID};
	Oid			t5[5] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, INT8OID};
	Datum		v[5];
	char	   *state;
	bool		found;
	SpoolCaller caller;

	spool_require_shmem();
	spool_enter(&caller);
	SPI_connect();
	/* Signer row first, in the same order as allocation (no deadlock). */
	(void) signer_lock_and_check(signer, owner, token, caller.role);

	v[0] = CStringGetTextDatum(signer);
	v[1] = Int64GetDatum(nonce);
	spool_plan(&plan_get_nonce,
			   "SELECT state::text FROM spool.nonce_store"
			   " WHERE signer = $1 AND nonce = $2 FOR UPDATE",
			   2, t2);
	found = spool_exec(plan_get_nonce, v, NULL, false, SPI_OK_SELECT) > 0;
	if (!found && nonce_removed(signer, nonce))
	{
		/*
		 * Every nonce below next_nonce has a row until retention removes it,
		 * and retention removes only consumed ones: CONSUMED stays final.
		 */
		if (to_released)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_NONCE_TRANSITION),
					 errmsg("nonce " INT64_FORMAT " of signer \"%s\" is consumed and cannot be released",
							nonce, signer),
					 errdetail("It was consumed and later removed by spool.nonce_history_retention.")));
		SPI_finish();
		spool_leave(&caller);
		return;					/* a repeat of mark_used */
	}
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_NONCE),
				 errmsg("nonce " INT64_FORMAT " of signer \"%s\" was never allocated",
						nonce, signer),
				 errhint("Only nonces returned by spool.nonce_allocate or spool.nonce_request can be marked.")));
	state = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

	if (strcmp(state, target) == 0)
	{
		SPI_finish();
		spool_leave(&caller);
		return;					/* a repeat: nothing to do */
	}
	if (strcmp(state, "consumed") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_NONCE_TRANSITION),
				 errmsg("nonce " INT64_FORMAT " of signer \"%s\" is consumed and cannot be released",
						nonce, signer),
				 errdetail("CONSUMED is final.")));
	if (strcmp(state, "released") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_NONCE_TRANSITION),
				 errmsg("nonce " INT64_FORMAT " of signer \"%s\" is released and cannot be marked used",
						nonce, signer),
				 errdetail("A released nonce was given back and may be handed out again."),
				 errhint("Allocate it again with spool.nonce_allocate before using it.")));

	spool_plan(&plan_set_state,
			   "UPDATE spool.nonce_store SET state = $3::spool.nonce_state,"
			   " owner = $4, token = $5, updated_at = clock_timestamp()"
			   " WHERE signer = $1 AND nonce = $2",
			   5, t5);
	v[2] = CStringGetTextDatum(target);
	v[3] = CStringGetTextDatum(owner);
	v[4] = Int64GetDatum(token);
	spool_exec(plan_set_state, v, NULL, false, SPI_OK_UPDATE);

	if (to_released)
	{
		Oid			t1[1] = {TEXTOID};

		spool_plan(&plan_release_count,
				   "UPDATE spool.nonce_signer SET released = released + 1"
				   " WHERE signer = $1",
				   1, t1);
		spool_exec(plan_release_count, v, NULL, false, SPI_OK_UPDATE);
	}
	SPI_finish();
	spool_leave(&caller);
}

/*
 * SQL: spool.nonce_mark_used(signer, nonce, owner, token) RETURNS void
 */
Datum
spool_nonce_mark_used(PG_FUNCTION_ARGS)
{
	nonce_mark(fcinfo, "consumed");
	PG_RETURN_VOID();
}

/*
 * SQL: spool.nonce_mark_recyclable(signer, nonce, owner, token) RETURNS void
 */
Datum
spool_nonce_mark_recyclable(PG_FUNCTION_ARGS)
{
	nonce_mark(fcinfo, "released");
	PG_RETURN_VOID();
}
