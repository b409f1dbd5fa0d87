/*-------------------------------------------------------------------------
 *
 * rewind.c
 *	  spool.rewind_processor: rebuild a processor's state from the spool as
 *	  of a cursor, and continue from there, with or without writing the
 *	  replayed range's outputs again.
 *
 *	  The state at cursor C is the fold of the processor's entries in
 *	  (start, C] from the initial state '{}'.  The checkpoint keeps one
 *	  snapshot; a rewind replays from it when it is at or below C, and from
 *	  the processor's start otherwise, which needs every entry after the
 *	  start still in the spool (retention may have dropped them: refused).
 *
 *	  In one transaction the rewind takes the gate's lease from its holder
 *	  (a new token: a newer grant waits for the active's open batch, and
 *	  every later write with an older token is rejected), resets the
 *	  checkpoint row to the replay point and bumps its epoch.  Replicas
 *	  commit only in the epoch they loaded, so one that computed its state
 *	  before the rewind reloads the checkpoint before it can take the gate
 *	  again.  The lease's owner name is a worker name no worker holds, so the
 *	  first replica to look takes it over at once after the commit.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"

#include "lease/lease.h"
#include "processor/processor.h"

PG_FUNCTION_INFO_V1(spool_rewind_processor);

/* Where a processor is, read under the locks of a rewind. */
typedef struct RewindPoint
{
	int64		committed;		/* its committed cursor */
	int64		state_cursor;	/* its snapshot's cursor */
	int64		start;			/* the cursor it started after */
	int64		head;			/* the spool's last cursor */
	int64		consumer;		/* its spool consumer's cursor */
} RewindPoint;

static bool steal_always(const char *holder);
static void hold_segments(int64 after, int64 upto);
static void check_retained(const char *name, int64 to, int64 replay_from, bool from_start);
static bool rewind_emits(const char *mode);
static int64 rewind_take_gate(const char *name, Oid role);
static RewindPoint rewind_point(const char *name, int64 to);
static int64 rewind_checkpoint(const char *name, int64 token, int64 committed,
							   int64 replay_from, bool from_start);

/* The rewind takes the gate from whoever holds it. */
static bool
steal_always(const char *holder)
{
	return true;
}

/*
 * Keep the promoter from dropping the segments holding cursors in
 * (after, upto] until this transaction ends: it decided on a consumer
 * cursor read before ours lowered it.  Its DROP needs an exclusive lock and
 * gives up after a short lock timeout.
 */
static void
hold_segments(int64 after, int64 upto)
{
	Datum		v[2] = {Int64GetDatum(after), Int64GetDatum(upto)};
	uint64		i;
	uint64		n;
	Oid		   *rels;

	if (upto <= after)
		return;
	if (SPI_execute_with_args("SELECT to_regclass('spool.entries_' || segment)::oid"
							  " FROM spool.segment_info"
							  " WHERE dropped_at IS NULL AND hi - 1 > $1 AND lo <= $2",
							  2, (Oid[]) {INT8OID, INT8OID}, v, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.segment_info");
	n = SPI_processed;
	rels = palloc(sizeof(Oid) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);

		rels[i] = isnull ? InvalidOid : DatumGetObjectId(d);
	}
	for (i = 0; i < n; i++)
		if (OidIsValid(rels[i]))
			LockRelationOid(rels[i], AccessShareLock);
}

/*
 * SP001 if retention dropped a segment holding a cursor after replay_from:
 * the fold up to to cannot be computed again.
 */
static void
check_retained(const char *name, int64 to, int64 replay_from, bool from_start)
{
	Datum		v[1] = {Int64GetDatum(replay_from)};
	bool		isnull;

	/* A new statement, a new snapshot: drops that committed meanwhile count. */
	if (SPI_execute_with_args("SELECT segment, lo, hi - 1 FROM spool.segment_info"
							  " WHERE dropped_at IS NOT NULL AND hi - 1 > $1"
							  " ORDER BY segment DESC LIMIT 1",
							  1, (Oid[]) {INT8OID}, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.segment_info");
	if (SPI_processed == 0)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("cannot rewind processor \"%s\" to cursor " INT64_FORMAT ": retention removed entries it would replay",
					name, to),
			 errdetail("The state at cursor " INT64_FORMAT " is rebuilt from %s at cursor " INT64_FORMAT ", but spool segment %d (cursors " INT64_FORMAT " to " INT64_FORMAT ") was dropped.",
					   to, from_start ? "the processor's start" : "its snapshot", replay_from,
					   DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)),
					   DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull)),
					   DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull))),
			 errhint("Rewind to a cursor at or after the processor's snapshot cursor (spool.processor_status.snapshot_cursor).")));
}

/* true for 'emit', false for 'suppress'; SP001 otherwise. */
static bool
rewind_emits(const char *mode)
{
	if (strcmp(mode, "suppress") == 0)
		return false;
	if (strcmp(mode, "emit") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("outputs must be 'suppress' or 'emit', not \"%s\"", mode),
				 errhint("'suppress' does not write the replayed range's outputs again; 'emit' writes them again.")));
	return true;
}

/*
 * Lock the processor's row (checking that role owns it), then take its gate
 * as a replica's commit does (lease, then checkpoint row): this waits for
 * the active's open batch, and from here on every write with an older token
 * fails.  Returns the new token.  The caller is connected to SPI.
 */
static int64
rewind_take_gate(const char *name, Oid role)
{
	Datum		v[1] = {CStringGetTextDatum(name)};
	HeapTuple	tup;
	bool		isnull;
	int64		ttl_ms;
	SpoolLease	lease;

	if (SPI_execute_with_args("SELECT owner, (options->>'lease_ttl')::bigint FROM spool.processors"
							  " WHERE name = $1 FOR UPDATE",
							  1, (Oid[]) {TEXTOID}, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.processors");
	tup = spool_owned_row("processor", name, 1, role);
	ttl_ms = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));

	lease = spool_lease_acquire_internal(psprintf("processor:%s", name),
										 psprintf("rewind:%s:%d", name, (int) MyProcPid),
										 ttl_ms * 1000, steal_always, SPOOL_LEASE_INTERNAL);
	if (!lease.held)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_LEASE_BLOCKED),
				 errmsg("cannot rewind processor \"%s\": a stalled replica still holds its gate in an open transaction",
						name),
				 errhint("Try again once the replica's transaction has ended (see spool.processor_status).")));
	return lease.token;
}

/* Read (and lock) the processor's checkpoint; SP001 unless it can go back to "to". */
static RewindPoint
rewind_point(const char *name, int64 to)
{
	Datum		v[1] = {CStringGetTextDatum(name)};
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	RewindPoint p;

	if (SPI_execute_with_args("SELECT c.committed_cursor, c.state_cursor, c.start_cursor,"
							  " (SELECT next_cursor - 1 FROM spool.spool_state WHERE id = 1),"
							  " (SELECT committed_cursor FROM spool.consumers WHERE name = 'processor:' || $1)"
							  " FROM spool.processor_checkpoints c WHERE c.processor = $1 FOR UPDATE",
							  1, (Oid[]) {TEXTOID}, v, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "the checkpoint of processor \"%s\" is missing", name);
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	p.committed = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	p.state_cursor = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	p.start = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	p.head = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
	p.consumer = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
	if (isnull)
		p.consumer = p.state_cursor;

	if (to > p.head)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("cursor " INT64_FORMAT " is beyond the spool's head", to),
				 errdetail("The last cursor in the spool is " INT64_FORMAT ".", p.head)));
	if (to > p.committed)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("processor \"%s\" has not committed cursor " INT64_FORMAT " yet", name, to),
				 errdetail("Its committed cursor is " INT64_FORMAT "; a rewind goes back to a cursor it has passed.",
						   p.committed)));
	if (to < p.start)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("cursor " INT64_FORMAT " is before the start of processor \"%s\"", to, name),
				 errdetail("The processor starts after cursor " INT64_FORMAT ".", p.start)));
	return p;
}

/*
 * Reset the checkpoint to the replay point with the gate's new token, bump
 * its epoch and lower the processor's spool consumer so that the entries
 * after replay_from are kept.  Returns the new epoch.
 */
static int64
rewind_checkpoint(const char *name, int64 token, int64 committed, int64 replay_from,
				  bool from_start)
{
	Datum		v[5];
	bool		isnull;
	int64		epoch;

	v[0] = CStringGetTextDatum(name);
	v[1] = Int64GetDatum(token);
	v[2] = Int64GetDatum(committed);
	v[3] = Int64GetDatum(replay_from);
	v[4] = BoolGetDatum(from_start);
	if (SPI_execute_with_args("UPDATE spool.processor_checkpoints SET token = $2, epoch = epoch + 1,"
							  " committed_cursor = $3, state_cursor = $4,"
							  " state = CASE WHEN $5 THEN NULL ELSE state END,"
							  " state_hash = CASE WHEN $5 THEN NULL ELSE state_hash END,"
							  " updated_at = now()"
							  " WHERE processor = $1 RETURNING epoch",
							  5, (Oid[]) {TEXTOID, INT8OID, INT8OID, INT8OID, BOOLOID}, v, NULL,
							  false, 0) != SPI_OK_UPDATE_RETURNING || SPI_processed != 1)
		elog(ERROR, "could not rewind the checkpoint of processor \"%s\"", name);
	epoch = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (SPI_execute_with_args("UPDATE spool.consumers SET committed_cursor = least(committed_cursor, $4),"
							  " updated_at = now() WHERE name = 'processor:' || $1",
							  4, (Oid[]) {TEXTOID, INT8OID, INT8OID, INT8OID}, v, NULL,
							  false, 0) < 0)
		elog(ERROR, "could not move the spool consumer of processor \"%s\"", name);
	return epoch;
}

/*
 * SQL: spool.rewind_processor(name, to_cursor, outputs) RETURNS bigint
 *
 * outputs 'suppress': the committed cursor stays; replicas replay up to it
 * without outputs and continue after it.  'emit': the committed cursor goes
 * back to to_cursor; the outputs after it are written again.  Returns the
 * processor's new epoch (its number of rewinds).
 */
Datum
spool_rewind_processor(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	int64		to = spool_arg_int64(fcinfo, 1, "to_cursor", true);
	char	   *mode = spool_arg_name(fcinfo, 2, "outputs");
	bool		emit;
	Datum		v[8];
	int64		token;
	RewindPoint p;
	bool		from_start;
	int64		replay_from;
	int64		epoch;
	SpoolCaller caller;

	spool_require_pipeline_database("processor");
	emit = rewind_emits(mode);

	spool_enter(&caller);
	SPI_connect();
	token = rewind_take_gate(name, caller.role);
	p = rewind_point(name, to);

	from_start = p.state_cursor > to;
	replay_from = from_start ? p.start : p.state_cursor;
	hold_segments(replay_from, p.consumer);
	check_retained(name, to, replay_from, from_start);
	/* Replicas load this; the entries after replay_from are kept for them. */
	epoch = rewind_checkpoint(name, token, emit ? to : p.committed, replay_from, from_start);

	v[0] = CStringGetTextDatum(name);
	v[1] = Int64GetDatum(epoch);
	v[2] = Int64GetDatum(p.committed);
	v[3] = Int64GetDatum(to);
	v[4] = Int64GetDatum(replay_from);
	v[5] = CStringGetTextDatum(mode);
	v[6] = ObjectIdGetDatum(caller.role);
	v[7] = Int64GetDatum(token);
	if (SPI_execute_with_args("INSERT INTO spool.processor_rewinds"
							  " (processor, epoch, from_cursor, to_cursor, replay_from, outputs, by_role, token)"
							  " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
							  8, (Oid[]) {TEXTOID, INT8OID, INT8OID, INT8OID, INT8OID, TEXTOID, OIDOID, INT8OID},
							  v, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record the rewind of processor \"%s\"", name);
	SPI_finish();
	spool_leave(&caller);

	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("processor \"%s\" rewound to cursor " INT64_FORMAT " (outputs %s) by role \"%s\": epoch " INT64_FORMAT ", committed cursor was " INT64_FORMAT ", state replays from cursor " INT64_FORMAT,
					name, to, mode, GetUserNameFromId(caller.role, false), epoch,
					p.committed, replay_from)));
	PG_RETURN_INT64(epoch);
}
