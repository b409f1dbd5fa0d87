/*-------------------------------------------------------------------------
 *
 * lease.c
 *	  Leases with fencing tokens: acquire, renew, release, fence.
 *
 * A lease is a row of spool.lease_store.  Its token only grows, and a row is
 * never deleted, so tokens keep increasing across restarts and crash
 * recovery (the row is WAL-logged).  The database clock decides expiry.
 *
 * The token epoch: a standby promoted after asynchronous replication may
 * lack the last grants of the old primary, so its stored tokens can be
 * below tokens already handed out.  A grant on timeline T > 1 therefore
 * issues at least T << 40 (token_floor): every timeline starts above
 * all tokens of the timelines before it, as long as no resource is granted
 * 2^40 times on one timeline.  On timeline 1 tokens count from 1 as before.
 *
 * The token floor: DROP EXTENSION removes spool.lease_store, and with it
 * every token.  So each grant also records the database's highest token in
 * the progress of a replication origin named after the database
 * (spool_ext_tokens_<database oid>): it is WAL-logged, replicated to
 * standbys, survives crash recovery, never moves backwards, and no DROP
 * EXTENSION (or DROP SCHEMA ... CASCADE, DROP OWNED) reaches it.  CREATE
 * EXTENSION copies it into spool.token_floor (spool._token_floor_init), and
 * every grant then issues at least floor + 1.  A fresh database has no
 * floor, so its first token is still 1.  Without max_replication_slots
 * there are no origins and no floor (CREATE EXTENSION warns).
 *
 * fence() takes a FOR KEY SHARE lock on the row; granting a new token takes
 * FOR UPDATE, which conflicts with it.  So a new token cannot be granted while
 * a transaction fenced with the old one is still open (L-2).  Renewal and
 * release only take FOR NO KEY UPDATE, which does not conflict with fences.
 *
 * A lease belongs to a role: the role that took it first (its row keeps the
 * role, like the token, forever).  Only members of that role (and
 * superusers) acquire, renew, release or fence it, whatever owner name they
 * give; role 0 marks leases of spool_ext's own workers ('processor:...', and
 * 'signer:...' leases of signers served by spool.nonce_request), which no
 * client call reaches.  Names starting with 'processor:' or 'spool:' are
 * reserved to the extension.
 *
 * Guards: another subsystem may register rows that a lease guards (the
 * nonce allocator registers spool.nonce_signer for leases 'signer:...').  A
 * new grant also locks the guarded row and stamps it with the new token, so
 * operations that lock that row anyway are fenced by it without a second
 * row lock; they still check their token with spool_fence_check, the one
 * check every fenced write goes through.
 *
 * A fenced transaction that outlives its lease would block a rival forever;
 * fence() therefore records (resource, token) in shared memory, and an
 * acquirer that waits longer than spool.lease_wait_timeout terminates the
 * backends holding fences with the stale token (those the acquirer could
 * signal with pg_terminate_backend), then waits once more.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "replication/origin.h"
#include "replication/slot.h"
#include "storage/proc.h"
#include "storage/spin.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "lease/lease.h"

static SpoolFenceSlot *spool_fence_slots = NULL;

PG_FUNCTION_INFO_V1(spool_lease_acquire);
PG_FUNCTION_INFO_V1(spool_lease_renew);
PG_FUNCTION_INFO_V1(spool_lease_release);
PG_FUNCTION_INFO_V1(spool_fence);
PG_FUNCTION_INFO_V1(spool_token_floor_init);

static char *floor_origin_name(void);
static int64 drop_floor(void);
static void note_token(int64 token);

typedef SpoolLeaseRow LeaseRow;

#define LEASE_COLS "owner, token, expires_at, " \
	"coalesce(expires_at > clock_timestamp(), false), role"

/* Lease names client calls may not use. */
static const char *const reserved_prefixes[] = {"processor:", "spool:", NULL};

static SPIPlanPtr plan_read = NULL;
static SPIPlanPtr plan_lock = NULL;
static SPIPlanPtr plan_fence = NULL;
static SPIPlanPtr plan_insert = NULL;
static SPIPlanPtr plan_renew = NULL;
static SPIPlanPtr plan_grant = NULL;
static SPIPlanPtr plan_release = NULL;
static bool fence_callback_registered = false;

#define MAX_GUARDS 4
static const SpoolLeaseGuard *guards[MAX_GUARDS];
static int	nguards = 0;

static LeaseRow lease_fetch(SPIPlanPtr plan, const char *resource);
static bool lease_lock(const char *resource, LeaseRow *row, Oid role);
static bool lease_try_lock(const char *resource, int timeout_ms, LeaseRow *row);
static bool lease_role_allows(const char *resource, LeaseRow *row, Oid role);
static void fence_xact_callback(XactEvent event, void *arg);
static int	fence_terminate_holders(const char *resource, int64 token, Oid role);
static void lease_report_not_held(const char *resource, const char *owner,
								  int64 token, const char *action, Oid role);
static const SpoolLeaseGuard *guard_of(const char *resource);
static void fence_reject(const char *resource, const SpoolLeaseGuard *guard,
						 const SpoolLeaseRow *row, const char *owner,
						 int64 token) pg_attribute_noreturn();
static void lease_attach(bool found);

static inline uint32
resource_hash(const char *resource)
{
	return hash_bytes((const unsigned char *) resource, strlen(resource));
}

static inline bool
same_owner(const char *a, const char *b)
{
	return a != NULL && b != NULL && strcmp(a, b) == 0;
}

static LeaseRow
lease_fetch(SPIPlanPtr plan, const char *resource)
{
	Datum		arg = CStringGetTextDatum(resource);
	LeaseRow	row = {0};
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;

	spool_exec(plan, &arg, NULL, false, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return row;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	row.found = true;
	row.owner = SPI_getvalue(tup, desc, 1);
	row.token = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	row.expires_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));
	if (isnull)
		row.expires_at = DT_NOBEGIN;
	row.live = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));
	row.role = DatumGetObjectId(SPI_getbinval(tup, desc, 5, &isnull));
	row.has_role = !isnull;
	return row;
}

/*
 * Check role (SPOOL_LEASE_INTERNAL: the extension's own code) against the role
 * a lease belongs to, as read into row.  A client that may not use the lease
 * gets 42501; the extension's own code gets false (the lease is a client's).
 * A lease never granted belongs to nobody yet.
 */
static bool
lease_role_allows(const char *resource, LeaseRow *row, Oid role)
{
	if (!row->has_role)
		return true;
	if (role == SPOOL_LEASE_INTERNAL)
		return row->role == SPOOL_LEASE_INTERNAL;
	spool_lease_check_role(resource, row->role, role);
	return true;
}

/*
 * Raise 42501 unless role (a client's) may use a lease that belongs to
 * lease_role.  The message names no owner and no token.
 */
void
spool_lease_check_role(const char *resource, Oid lease_role, Oid role)
{
	if (lease_role == SPOOL_LEASE_INTERNAL)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("lease \"%s\" belongs to spool_ext", resource),
				 errdetail("The leases of processors, and of signers served through spool.nonce_request, are held by the extension's workers.")));
	if (!spool_role_is_member(role, lease_role))
	{
		char	   *name = GetUserNameFromId(lease_role, true);

		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("lease \"%s\" belongs to another role", resource),
				 name ? errdetail("It belongs to role \"%s\".", name) : 0,
				 errhint("Only members of the role that first took a lease may acquire, renew, release or fence it.")));
	}
}

/* 42501 if resource is a name client calls may not use. */
static void
check_not_reserved(const char *resource)
{
	const char *const *p;

	for (p = reserved_prefixes; *p; p++)
		if (strncmp(resource, *p, strlen(*p)) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("lease names starting with \"%s\" are reserved to spool_ext", *p),
					 errhint("Choose another name for your lease.")));
}

static SPIPlanPtr
read_plan(void)
{
	Oid			t[1] = {TEXTOID};

	return spool_plan(&plan_read,
					  "SELECT " LEASE_COLS " FROM spool.lease_store WHERE resource = $1",
					  1, t);
}

/*
 * Lock the row FOR UPDATE, waiting at most spool.lease_wait_timeout; if a
 * fenced transaction with the old token still blocks, terminate it (if role
 * may signal it) and wait once more.  Returns false (and leaves the lease
 * alone) if still blocked.
 */
static bool
lease_lock(const char *resource, LeaseRow *row, Oid role)
{
	int64		stale_token = row->token;

	if (lease_try_lock(resource, spool_lease_wait_timeout_ms, row))
		return true;
	if (fence_terminate_holders(resource, stale_token, role) == 0)
		return false;
	return lease_try_lock(resource, spool_lease_wait_timeout_ms, row);
}

/* One bounded attempt at SELECT ... FOR UPDATE, in a subtransaction. */
static bool
lease_try_lock(const char *resource, int timeout_ms, LeaseRow *row)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	int			save_timeout = LockTimeout;
	volatile bool locked = false;
	Oid			t[1] = {TEXTOID};

	const SpoolLeaseGuard *guard = guard_of(resource);

	spool_plan(&plan_lock,
			   "SELECT " LEASE_COLS " FROM spool.lease_store WHERE resource = $1 FOR UPDATE",
			   1, t);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		LockTimeout = timeout_ms;
		*row = lease_fetch(plan_lock, resource);
		if (guard)
			guard->lock(resource + strlen(guard->prefix));
		LockTimeout = save_timeout;
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		locked = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		LockTimeout = save_timeout;
		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
			ReThrowError(edata);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return locked;
}

/*
 * Renew a live lease held by owner with token; false when it is not.  role
 * is the caller's (SPOOL_LEASE_INTERNAL for the extension's own code): a
 * lease of another role raises 42501, which also undoes the renewal.  The
 * caller is connected to SPI.
 */
bool
spool_lease_extend(const char *resource, const char *owner, int64 token,
				   int64 ttl_us, TimestampTz *expires, Oid role)
{
	Oid			t[4] = {TEXTOID, TEXTOID, INTERVALOID, INT8OID};
	Datum		v[4];
	bool		isnull;
	LeaseRow	row = {0};

	spool_plan(&plan_renew,
			   "UPDATE spool.lease_store SET expires_at = clock_timestamp() + $3,"
			   " renewed_at = clock_timestamp()"
			   " WHERE resource = $1 AND owner = $2 AND token = $4"
			   " AND expires_at > clock_timestamp() RETURNING expires_at, role",
			   4, t);
	v[0] = CStringGetTextDatum(resource);
	v[1] = CStringGetTextDatum(owner);
	v[2] = spool_ttl_datum(ttl_us);
	v[3] = Int64GetDatum(token);
	if (spool_exec(plan_renew, v, NULL, false, SPI_OK_UPDATE_RETURNING) == 0)
		return false;
	*expires = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
												 SPI_tuptable->tupdesc, 1, &isnull));
	row.role = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 2, &isnull));
	row.has_role = !isnull;
	if (!lease_role_allows(resource, &row, role))
		elog(ERROR, "lease \"%s\" of owner \"%s\" belongs to a client", resource, owner);
	return true;
}

/*
 * The least token a grant issues now: the token floor plus one (0 when
 * there is none), and on a timeline above 1 at least its epoch, timeline <<
 * 40 (see the top of this file).  A grant writes, so the server is out of
 * recovery and its WAL insertion timeline is known.  The caller is
 * connected to SPI.
 */
static int64
token_floor(void)
{
	TimeLineID	tli;
	int64		dropped = drop_floor();
	int64		least = dropped > 0 ? dropped + 1 : 0;

	if (RecoveryInProgress())
		return 0;				/* the grant's UPDATE fails anyway */
	tli = GetWALInsertionTimeLine();
	if (tli <= 1)
		return least;
	if (tli >= (TimeLineID) 1 << 22)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("timeline %u is too high for lease token epochs", tli)));
	return Max(least, (int64) tli << 40);
}

/* The replication origin that keeps this database's highest token. */
static char *
floor_origin_name(void)
{
	return psprintf("spool_ext_tokens_%u", MyDatabaseId);
}

/*
 * The floor this catalog was created on (spool.token_floor): grants issue
 * more.  0 on a 0.1 catalog, which has no such table until it is updated.
 * The caller is connected to SPI.
 */
static int64
drop_floor(void)
{
	static SPIPlanPtr plan_floor = NULL;
	Oid			nsp = get_namespace_oid("spool", true);
	bool		isnull;
	Datum		d;

	if (!OidIsValid(nsp) || !OidIsValid(get_relname_relid("token_floor", nsp)))
		return 0;
	spool_plan(&plan_floor, "SELECT floor FROM spool.token_floor", 0, NULL);
	if (spool_exec(plan_floor, NULL, NULL, true, SPI_OK_SELECT) != 1)
		return 0;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * Record a granted token as the database's highest, if it is (see the top
 * of this file).  Before the grant commits: its commit record follows this
 * one in the WAL, so no committed token is above the recorded floor, on
 * this server or on a standby.  An aborted grant leaves a floor a little
 * high, which only skips tokens.
 */
static void
note_token(int64 token)
{
	RepOriginId origin;

	if (max_replication_slots == 0 || token <= 0)
		return;
	origin = replorigin_by_name(floor_origin_name(), true);
	if (origin == InvalidRepOriginId)
		return;					/* no floor kept (see spool._token_floor_init) */
	if (replorigin_get_progress(origin, false) >= (XLogRecPtr) token)
		return;
	replorigin_advance(origin, (XLogRecPtr) token, InvalidXLogRecPtr, false, true);
}

/*
 * Acquire or renew resource for owner.  The caller is connected to SPI.
 * role is the caller's, or SPOOL_LEASE_INTERNAL for the extension's own
 * workers: a client may not use a lease of another role (42501), the
 * workers never take a client's lease (not held).  may_steal, when given,
 * allows taking a live lease from a holder it approves (the workers use it to
 * take over from a dead or replaced worker).
 */
SpoolLease
spool_lease_acquire_internal(const char *resource, const char *owner,
							 int64 ttl_us, spool_may_steal_fn may_steal, Oid role)
{
	SpoolLease	result = {0};
	const SpoolLeaseGuard *guard = guard_of(resource);
	int			attempt;

	for (attempt = 0; attempt < 4; attempt++)
	{
		LeaseRow	row = lease_fetch(read_plan(), resource);
		Oid			t[5] = {TEXTOID, TEXTOID, INTERVALOID, OIDOID, INT8OID};
		Datum		v[5];
		bool		isnull;

		if (!row.found)
		{
			Oid			ti[1] = {TEXTOID};
			Datum		arg = CStringGetTextDatum(resource);

			spool_plan(&plan_insert,
					   "INSERT INTO spool.lease_store (resource) VALUES ($1)"
					   " ON CONFLICT DO NOTHING",
					   1, ti);
			spool_exec(plan_insert, &arg, NULL, false, SPI_OK_INSERT);
			continue;
		}
		if (!lease_role_allows(resource, &row, role))
			return result;		/* a client's lease: not for the workers */

		/* Same owner, live lease: a renewal that keeps the token. */
		if (row.live && same_owner(row.owner, owner))
		{
			if (spool_lease_extend(resource, owner, row.token, ttl_us,
								   &result.expires_at, role))
			{
				result.held = true;
				result.token = row.token;
				return result;
			}
			continue;			/* it expired or moved meanwhile */
		}

		if (row.live && !(may_steal && row.owner && may_steal(row.owner)))
			return result;		/* another owner holds a live lease */

		/* Free, expired or stealable: a new grant needs the row lock. */
		if (!lease_lock(resource, &row, role))
		{
			ereport(DEBUG1,
					(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
					 errmsg("lease \"%s\" is still fenced by a transaction of its previous holder",
							resource)));
			result.blocked = true;
			return result;
		}
		if (!lease_role_allows(resource, &row, role))
			return result;		/* taken by a client meanwhile */
		if (row.live && same_owner(row.owner, owner))
		{
			if (!spool_lease_extend(resource, owner, row.token, ttl_us,
									&result.expires_at, role))
				elog(ERROR, "could not renew locked lease \"%s\"", resource);
			result.held = true;
			result.token = row.token;
			return result;
		}
		if (row.live && !(may_steal && row.owner && may_steal(row.owner)))
			return result;

		/* The first grant gives the lease to the role; later ones keep it. */
		spool_plan(&plan_grant,
				   "UPDATE spool.lease_store SET owner = $2,"
				   " token = greatest(token + 1, $5),"
				   " expires_at = clock_timestamp() + $3,"
				   " granted_at = clock_timestamp(), renewed_at = NULL,"
				   " grants = grants + 1, role = coalesce(role, $4)"
				   " WHERE resource = $1 RETURNING token, expires_at",
				   5, t);
		v[0] = CStringGetTextDatum(resource);
		v[1] = CStringGetTextDatum(owner);
		v[2] = spool_ttl_datum(ttl_us);
		v[3] = ObjectIdGetDatum(role);
		v[4] = Int64GetDatum(token_floor());
		if (spool_exec(plan_grant, v, NULL, false, SPI_OK_UPDATE_RETURNING) != 1)
			elog(ERROR, "lease \"%s\" vanished while locked", resource);
		result.held = true;
		result.took_over = row.owner != NULL && !same_owner(row.owner, owner);
		result.token = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
												   SPI_tuptable->tupdesc, 1, &isnull));
		result.expires_at = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
															  SPI_tuptable->tupdesc, 2, &isnull));
		note_token(result.token);
		if (guard)
			guard->granted(resource + strlen(guard->prefix), result.token, role);
		return result;
	}
	elog(ERROR, "could not acquire lease \"%s\": it kept changing", resource);
	return result;				/* keep compiler quiet */
}

/*
 * Raise the precise reason why owner does not hold resource with token.  A
 * caller of another role learns only that (42501), not who holds it.
 */
static void
lease_report_not_held(const char *resource, const char *owner, int64 token,
					  const char *action, Oid role)
{
	LeaseRow	row = lease_fetch(read_plan(), resource);

	if (!row.found)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("lease \"%s\" does not exist", resource),
				 errhint("Call spool.lease_acquire first.")));
	(void) lease_role_allows(resource, &row, role);
	if (!same_owner(row.owner, owner))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_LEASE_NOT_HELD),
				 errmsg("cannot %s lease \"%s\": it is not held by \"%s\"",
						action, resource, owner),
				 row.owner ? errdetail("It was last granted to \"%s\" with token " INT64_FORMAT ".",
									   row.owner, row.token) : 0));
	if (row.token != token)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_LEASE_NOT_HELD),
				 errmsg("cannot %s lease \"%s\": token " INT64_FORMAT " is not current",
						action, resource, token),
				 errdetail("The current token is " INT64_FORMAT ".", row.token),
				 errhint("The lease was granted again since; acquire it again.")));
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_LEASE_NOT_HELD),
			 errmsg("cannot %s lease \"%s\": it has expired", action, resource),
			 errhint("Acquire it again; the new grant will carry a new token.")));
}

/*
 * The fence: check that token is the current token of the live lease on
 * resource that role may use, and lock the lease row FOR KEY SHARE until the
 * end of the transaction, so no newer grant commits before it.  With raise,
 * a failed check raises the precise error; without, it returns false (the
 * processors' commit, which then steps down).
 */
bool
spool_fence_lease(const char *resource, int64 token, Oid role, bool raise)
{
	Oid			t[1] = {TEXTOID};
	LeaseRow	row;

	row = lease_fetch(spool_plan(&plan_fence,
								 "SELECT " LEASE_COLS " FROM spool.lease_store"
								 " WHERE resource = $1 FOR KEY SHARE",
								 1, t),
					  resource);
	return spool_fence_check(resource, NULL, &row, NULL, token, role, raise);
}

/*
 * The one check of a fencing token.  row is the lease as the caller read it
 * under a lock that keeps newer grants out until the transaction ends: the
 * lease row (spool_fence_lease), or a row guard registered for the lease
 * (the guard then names the messages' subject).  owner, if given, must hold
 * the lease too.  On success the fence is recorded for this backend
 * (spool_fence_register) and true is returned; otherwise the precise error
 * is raised, or false returned when raise is false.
 */
bool
spool_fence_check(const char *resource, const SpoolLeaseGuard *guard,
				  const SpoolLeaseRow *row, const char *owner, int64 token,
				  Oid role, bool raise)
{
	if (row->found && row->owner != NULL)
	{
		if (!lease_role_allows(resource, (LeaseRow *) row, role))
			elog(ERROR, "lease \"%s\" is not spool_ext's", resource);
		if (row->token == token && (owner == NULL || same_owner(row->owner, owner)) &&
			row->live)
		{
			spool_fence_register(resource, token);
			return true;
		}
	}
	if (raise)
		fence_reject(resource, guard, row, owner, token);
	return false;
}

/*
 * Raise why a fence check failed.  The messages name the guarded thing
 * ("signer \"s\"") when the check went through a guard, else the lease.
 */
static void
fence_reject(const char *resource, const SpoolLeaseGuard *guard,
			 const SpoolLeaseRow *row, const char *owner, int64 token)
{
	const char *name = guard ? resource + strlen(guard->prefix) : resource;
	char	   *subject = guard ? psprintf("%s \"%s\"", guard->noun, name) :
		psprintf("lease \"%s\"", name);
	char	   *lease = guard ? psprintf("lease of %s \"%s\"", guard->noun, name) : subject;

	if (!row->found || row->owner == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("%s does not exist", lease),
				 errhint("Call spool.lease_acquire first.")));
	if (row->token != token)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_FENCE_REJECTED),
				 errmsg("fencing token " INT64_FORMAT " for %s is not current",
						token, subject),
				 errdetail("The current token is " INT64_FORMAT ", held by \"%s\".",
						   row->token, row->owner),
				 guard ? errhint("Another owner took the %s lease over; this write must not happen.", guard->noun) :
				 errhint("Another owner took the lease over; this write must not happen.")));
	if (owner != NULL && !same_owner(row->owner, owner))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_LEASE_NOT_HELD),
				 errmsg("%s is not held by \"%s\"", lease, owner),
				 errdetail("Token " INT64_FORMAT " belongs to \"%s\".",
						   token, row->owner)));
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_FENCE_REJECTED),
			 errmsg("%s with token " INT64_FORMAT " has expired", lease, token),
			 errhint("Renew the lease before it expires, or acquire it again.")));
}

/* Record (resource, token) for this backend until the transaction ends. */
void
spool_fence_register(const char *resource, int64 token)
{
	SpoolFenceSlot *slot;
	uint32		h = resource_hash(resource);
	int			i;

	spool_require_shmem();
	if (!fence_callback_registered)
	{
		RegisterXactCallback(fence_xact_callback, NULL);
		fence_callback_registered = true;
	}
	slot = &spool_fence_slots[MyProc->pgprocno];
	SpinLockAcquire(&slot->mutex);
	slot->pid = MyProcPid;
	for (i = 0; i < slot->nfences; i++)
		if (slot->reshash[i] == h && slot->token[i] == token)
			break;
	if (i == slot->nfences && i < SPOOL_FENCES_PER_BACKEND)
	{
		slot->reshash[i] = h;
		slot->token[i] = token;
		slot->nfences++;
	}
	SpinLockRelease(&slot->mutex);
}

static void
fence_xact_callback(XactEvent event, void *arg)
{
	SpoolFenceSlot *slot;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			if (spool_fence_slots == NULL || MyProc == NULL)
				return;
			slot = &spool_fence_slots[MyProc->pgprocno];
			if (slot->nfences == 0)
				return;
			SpinLockAcquire(&slot->mutex);
			slot->nfences = 0;
			SpinLockRelease(&slot->mutex);
			break;
		default:
			break;
	}
}

/*
 * Terminate the backends whose open transaction fenced resource with token,
 * the way pg_terminate_backend would, and only those role could terminate
 * with it (the extension's own code may terminate any).  Returns how many
 * were signalled.
 */
static int
fence_terminate_holders(const char *resource, int64 token, Oid role)
{
	uint32		h = resource_hash(resource);
	int			n = 0;
	int			i;

	for (i = 0; i < MaxBackends; i++)
	{
		SpoolFenceSlot *slot = &spool_fence_slots[i];
		pid_t		pid = 0;
		int			j;

		SpinLockAcquire(&slot->mutex);
		for (j = 0; j < slot->nfences; j++)
			if (slot->reshash[j] == h && slot->token[j] == token)
				pid = slot->pid;
		SpinLockRelease(&slot->mutex);
		if (pid == 0 || pid == MyProcPid)
			continue;
		if (role != SPOOL_LEASE_INTERNAL && !spool_may_signal(role, pid))
		{
			ereport(LOG,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("backend %d keeps lease \"%s\" fenced with token " INT64_FORMAT
							"; the acquiring role may not terminate it", (int) pid, resource, token)));
			continue;
		}
		ereport(LOG,
				(errcode(ERRCODE_ADMIN_SHUTDOWN),
				 errmsg("terminating backend %d: its transaction fenced with token " INT64_FORMAT
						" outlived lease \"%s\"", (int) pid, token, resource)));
		if (kill(pid, SIGTERM) == 0)
			n++;
	}
	return n;
}

/*
 * Register a guard for the leases whose names start with its prefix.  Called
 * from _PG_init, so every backend inherits the registry.
 */
void
spool_lease_register_guard(const SpoolLeaseGuard *guard)
{
	if (nguards == MAX_GUARDS)
		elog(ERROR, "too many lease guards");
	guards[nguards++] = guard;
}

/* The guard of resource, or NULL. */
static const SpoolLeaseGuard *
guard_of(const char *resource)
{
	int			i;

	for (i = 0; i < nguards; i++)
		if (strncmp(resource, guards[i]->prefix, strlen(guards[i]->prefix)) == 0 &&
			resource[strlen(guards[i]->prefix)] != '\0')
			return guards[i];
	return NULL;
}

/*
 * SQL: spool.lease_acquire(resource, owner, ttl) RETURNS spool.lease
 */
Datum
spool_lease_acquire(PG_FUNCTION_ARGS)
{
	char	   *resource = spool_arg_name(fcinfo, 0, "resource");
	char	   *owner = spool_arg_name(fcinfo, 1, "owner");
	int64		ttl_us = spool_arg_ttl(fcinfo, 2);
	SpoolLease	lease;
	TupleDesc	desc;
	Datum		values[4];
	bool		nulls[4] = {0};
	SpoolCaller caller;

	spool_require_shmem();
	/* A standby would answer "held by another" where it cannot grant. */
	PreventCommandDuringRecovery("spool.lease_acquire()");
	check_not_reserved(resource);
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	spool_enter(&caller);
	SPI_connect();
	lease = spool_lease_acquire_internal(resource, owner, ttl_us, NULL, caller.role);
	SPI_finish();
	spool_leave(&caller);

	if (!lease.held)
		PG_RETURN_NULL();
	values[0] = CStringGetTextDatum(resource);
	values[1] = CStringGetTextDatum(owner);
	values[2] = Int64GetDatum(lease.token);
	values[3] = TimestampTzGetDatum(lease.expires_at);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc),
													  values, nulls)));
}

/*
 * SQL: spool.lease_renew(resource, owner, token, ttl) RETURNS timestamptz
 */
Datum
spool_lease_renew(PG_FUNCTION_ARGS)
{
	char	   *resource = spool_arg_name(fcinfo, 0, "resource");
	char	   *owner = spool_arg_name(fcinfo, 1, "owner");
	int64		token = spool_arg_int64(fcinfo, 2, "token", true);
	int64		ttl_us = spool_arg_ttl(fcinfo, 3);
	TimestampTz expires;
	SpoolCaller caller;

	check_not_reserved(resource);
	spool_enter(&caller);
	SPI_connect();
	if (!spool_lease_extend(resource, owner, token, ttl_us, &expires, caller.role))
		lease_report_not_held(resource, owner, token, "renew", caller.role);
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_TIMESTAMPTZ(expires);
}

/*
 * SQL: spool.lease_release(resource, owner, token) RETURNS boolean
 *
 * true when the live lease was released now; false when this owner's lease
 * with this token had already expired or been released (a harmless repeat).
 * Another owner, a stale token or a lease of another role is an error.
 */
Datum
spool_lease_release(PG_FUNCTION_ARGS)
{
	char	   *resource = spool_arg_name(fcinfo, 0, "resource");
	char	   *owner = spool_arg_name(fcinfo, 1, "owner");
	int64		token = spool_arg_int64(fcinfo, 2, "token", true);
	Oid			t[3] = {TEXTOID, TEXTOID, INT8OID};
	Datum		v[3];
	bool		released;
	bool		isnull;
	SpoolCaller caller;

	check_not_reserved(resource);
	spool_enter(&caller);
	SPI_connect();
	spool_plan(&plan_release,
			   "UPDATE spool.lease_store SET expires_at = clock_timestamp(),"
			   " released_at = clock_timestamp()"
			   " WHERE resource = $1 AND owner = $2 AND token = $3"
			   " AND expires_at > clock_timestamp() RETURNING role",
			   3, t);
	v[0] = CStringGetTextDatum(resource);
	v[1] = CStringGetTextDatum(owner);
	v[2] = Int64GetDatum(token);
	released = spool_exec(plan_release, v, NULL, false, SPI_OK_UPDATE_RETURNING) > 0;
	if (released)
	{
		/* Of another role: the error undoes the release. */
		spool_lease_check_role(resource,
							   DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
															  SPI_tuptable->tupdesc, 1, &isnull)),
							   caller.role);
	}
	else
	{
		LeaseRow	row = lease_fetch(read_plan(), resource);

		/* A repeat of a release (or an expired lease) is harmless. */
		if (!(row.found && same_owner(row.owner, owner) && row.token == token &&
			  lease_role_allows(resource, &row, caller.role)))
			lease_report_not_held(resource, owner, token, "release", caller.role);
	}
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_BOOL(released);
}

/*
 * SQL: spool.fence(resource, token) RETURNS void
 */
Datum
spool_fence(PG_FUNCTION_ARGS)
{
	char	   *resource = spool_arg_name(fcinfo, 0, "resource");
	int64		token = spool_arg_int64(fcinfo, 1, "token", true);
	SpoolCaller caller;

	spool_require_shmem();
	check_not_reserved(resource);
	spool_enter(&caller);
	SPI_connect();
	(void) spool_fence_lease(resource, token, caller.role, true);
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_VOID();
}

/*
 * Record the highest token of spool.lease_store as the floor, whether or
 * not a grant recorded it (rows restored by pg_restore were never granted
 * here): called by DROP EXTENSION before it drops the table.  The caller
 * is connected to SPI.
 */
void
spool_token_floor_record(void)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute("SELECT max(token) FROM spool.lease_store", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.lease_store");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		note_token(DatumGetInt64(d));
}

/*
 * SQL: spool._token_floor_init() RETURNS bigint — from CREATE EXTENSION and
 * ALTER EXTENSION UPDATE (superuser only): make sure the database's token
 * origin exists and holds a replication state (so no grant fails for want
 * of one), record the tokens already in spool.lease_store (an update), and
 * copy the floor into spool.token_floor; returns it.  Calling it again
 * changes nothing but raising the floor to what grants have since recorded.
 */
Datum
spool_token_floor_init(PG_FUNCTION_ARGS)
{
	int64		floor = 0;
	char	   *name = floor_origin_name();
	bool		kept = max_replication_slots > 0;
	Oid			t[2] = {INT8OID, TEXTOID};
	Datum		v[2];
	char		nulls[2] = {' ', ' '};

	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only a superuser may set the lease token floor"),
				 errdetail("It is set by CREATE EXTENSION spool_ext and ALTER EXTENSION spool_ext UPDATE.")));
	SPI_connect();
	if (kept)
	{
		RepOriginId origin = replorigin_by_name(name, true);
		int64		highest;
		bool		isnull;
		Datum		d;

		if (origin == InvalidRepOriginId)
			origin = replorigin_create(name);
		floor = (int64) replorigin_get_progress(origin, false);
		if (SPI_execute("SELECT max(token) FROM spool.lease_store", true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read spool.lease_store");
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		highest = isnull ? 0 : DatumGetInt64(d);
		/* Also claims the origin's replication state if it has none yet. */
		replorigin_advance(origin, (XLogRecPtr) Max(floor, highest), InvalidXLogRecPtr,
						   false, true);
	}
	else
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("max_replication_slots is 0: lease tokens may repeat after DROP and CREATE EXTENSION spool_ext"),
				 errdetail("The highest token of a database is kept in replication origin \"%s\", which needs a replication state.", name),
				 errhint("Set max_replication_slots to at least 1 per database with spool_ext (plus what replication uses), restart, and run ALTER EXTENSION spool_ext UPDATE or CREATE EXTENSION again.")));
	v[0] = Int64GetDatum(floor);
	v[1] = CStringGetTextDatum(name);
	if (!kept)
		nulls[1] = 'n';
	if (SPI_execute_with_args("INSERT INTO spool.token_floor AS f (floor, origin) VALUES ($1, $2)"
							  " ON CONFLICT (one) DO UPDATE SET floor = greatest(f.floor, excluded.floor),"
							  " origin = excluded.origin, set_at = clock_timestamp()"
							  " RETURNING floor",
							  2, t, v, nulls, false, 1) != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not write spool.token_floor");
	{
		bool		isnull;

		floor = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											SPI_tuptable->tupdesc, 1, &isnull));
	}
	SPI_finish();
	PG_RETURN_INT64(floor);
}

static void
lease_attach(bool found)
{
	int			i;

	if (!found)
		for (i = 0; i < MaxBackends; i++)
			SpinLockInit(&spool_fence_slots[i].mutex);
}

/* Shared memory: one fence slot per backend. */
const SpoolShmemArea spool_lease_shmem = {
	"spool_ext fences", false, 0, NULL,
	sizeof(SpoolFenceSlot), &MaxBackends, (void **) &spool_fence_slots, lease_attach
};
