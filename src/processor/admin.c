/*-------------------------------------------------------------------------
 *
 * processor_admin.c
 *	  SQL functions that define and control processors: create_processor
 *	  (validating the handler, its run-as role and every option),
 *	  alter_processor (the options that do not change the fold),
 *	  start_processor, stop_processor, drop_processor, and the runtime view
 *	  behind spool.processor_status.  The launcher starts and stops the
 *	  replicas; these functions change spool.processors and wake it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "processor/processor.h"
#include "processor/handler.h"

PG_FUNCTION_INFO_V1(spool_create_processor);
PG_FUNCTION_INFO_V1(spool_start_processor);
PG_FUNCTION_INFO_V1(spool_stop_processor);
PG_FUNCTION_INFO_V1(spool_drop_processor);
PG_FUNCTION_INFO_V1(spool_alter_processor);
PG_FUNCTION_INFO_V1(spool_processor_runtime);
PG_FUNCTION_INFO_V1(spool_processor_histograms);

/* start_cursor: where a new processor starts, unless a cursor. */
#define START_EARLIEST	(-1)
#define START_LATEST	(-2)

static void check_handler(Oid handler);
static void check_sources(SpoolProcessorOptions *o);
static void lease_ttl_option(const SpoolOptionTable *table, const SpoolOption *opt,
							 JsonbValue *v, void *result);
static void start_option(const SpoolOptionTable *table, const SpoolOption *opt,
						 JsonbValue *v, void *result);
static bool start_render(const SpoolOption *opt, const void *result, StringInfo buf);

#define PROC(member)	SPOOL_OPT_MEMBER(SpoolProcessorOptions, member)

static const SpoolOption processor_option_specs[] = {
	{.name = "sources", .type = SPOOL_OPT_LIST, PROC(sources),
		.count_offset = offsetof(SpoolProcessorOptions, nsources), .what = "source names",
		.doc = "Leave it out to read every source."},
	{.name = "replicas", .type = SPOOL_OPT_INT, PROC(replicas),
		.dflt = SPOOL_PROCESSOR_DEFAULT_REPLICAS, .lo = 1, .hi = SPOOL_MAX_REPLICAS},
	{.name = "batch_size", .type = SPOOL_OPT_INT, PROC(batch_size),
		.dflt = SPOOL_PROCESSOR_DEFAULT_BATCH, .lo = 1, .hi = SPOOL_PROCESSOR_MAX_BATCH},
	{.name = "lease_ttl", .type = SPOOL_OPT_DURATION, PROC(lease_ttl_ms),
		.dflt = SPOOL_PROCESSOR_DEFAULT_TTL_MS, .lo = 100, .hi = SECS_PER_DAY * 1000,
		.unit = 1000, .what = "'2 s'", .parse = lease_ttl_option},
	{.name = "checkpoint_every", .type = SPOOL_OPT_INT, PROC(checkpoint_every),
		.dflt = SPOOL_PROCESSOR_DEFAULT_CHECKPOINT, .lo = 1, .hi = 1000000000},
	{.name = "start", .type = SPOOL_OPT_INT, PROC(start_cursor), .dflt = START_EARLIEST,
		.lo = 0, .hi = PG_INT64_MAX, .parse = start_option, .render = start_render},
	{.name = "run_as", .type = SPOOL_OPT_STRING, .flags = SPOOL_OPT_INPUT, PROC(run_as),
		.what = "a role name"},
	{.name = "handler", .type = SPOOL_OPT_OBJECT, PROC(handler), .what = "handler settings"},
};

const SpoolOptionTable spool_processor_options = {
	SPOOL_OPT_TABLE(processor_option_specs, SpoolProcessorOptions),
	.prefix = "", .noun = "processor option", .subject = "option ", .listing = "Options are",
	.not_object = "processor options must be a JSON object",
};

/*
 * lease_ttl: at least 100 ms, at most spool.lease_max_ttl (a bare number at
 * most a day, as always).
 */
static void
lease_ttl_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
				 void *result)
{
	int64		us = spool_option_duration_us(table, opt, v);

	if (us < opt->lo * opt->unit)
		spool_option_bad(table, opt, NULL,
						 psprintf("must be at least %s", spool_format_duration(opt->lo * opt->unit)));
	if (us > (int64) spool_lease_max_ttl_s * USECS_PER_SEC)
		spool_option_bad(table, opt, NULL, "is longer than spool.lease_max_ttl");
	((SpoolProcessorOptions *) result)->lease_ttl_ms = us / opt->unit;
}

/* start: "earliest", "latest" or a cursor. */
static void
start_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			 void *result)
{
	int64	   *start = &((SpoolProcessorOptions *) result)->start_cursor;

	if (v->type == jbvString && v->val.string.len == 8 &&
		strncmp(v->val.string.val, "earliest", 8) == 0)
		*start = START_EARLIEST;
	else if (v->type == jbvString && v->val.string.len == 6 &&
			 strncmp(v->val.string.val, "latest", 6) == 0)
		*start = START_LATEST;
	else if (v->type == jbvNumeric)
		*start = spool_option_integer(table, opt, v, opt->lo, opt->hi);
	else
		spool_option_bad(table, opt, NULL, "must be \"earliest\", \"latest\" or a cursor");
}

static bool
start_render(const SpoolOption *opt, const void *result, StringInfo buf)
{
	int64		start = ((const SpoolProcessorOptions *) result)->start_cursor;

	if (start == START_EARLIEST)
		appendStringInfoString(buf, "\"earliest\"");
	else if (start == START_LATEST)
		appendStringInfoString(buf, "\"latest\"");
	else
		appendStringInfo(buf, INT64_FORMAT, start);
	return true;
}

/* handler(state jsonb, entries spool.entries[]) RETURNS spool.step, a plain function. */
static void
check_handler(Oid handler)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(handler));
	Form_pg_proc p;
	Oid			nsp = get_namespace_oid("spool", false);
	Oid			step = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
									   CStringGetDatum("step"), ObjectIdGetDatum(nsp));
	Oid			entries = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
										  CStringGetDatum("entries"), ObjectIdGetDatum(nsp));
	const char *hint = "A handler is declared as handler(state jsonb, entries spool.entries[]) RETURNS spool.step.";

	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("handler function %u does not exist", handler)));
	p = (Form_pg_proc) GETSTRUCT(tup);
	if (p->prokind != PROKIND_FUNCTION || p->proretset ||
		p->pronargs != 2 || p->prorettype != step ||
		p->proargtypes.values[0] != JSONBOID ||
		p->proargtypes.values[1] != get_array_type(entries))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("function %s cannot be a processor handler",
						format_procedure(handler)),
				 errhint("%s", hint)));
	ReleaseSysCache(tup);
}

static void
check_sources(SpoolProcessorOptions *o)
{
	int			i;
	int			j;

	for (i = 0; i < o->nsources; i++)
	{
		Oid			t[1] = {TEXTOID};
		Datum		v[1] = {CStringGetTextDatum(o->sources[i])};

		for (j = 0; j < i; j++)
			if (strcmp(o->sources[i], o->sources[j]) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
						 errmsg("source \"%s\" is listed twice", o->sources[i])));
		if (SPI_execute_with_args("SELECT 1 FROM spool.sources WHERE name = $1",
								  1, t, v, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read spool.sources");
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
					 errmsg("source \"%s\" does not exist", o->sources[i])));
	}
}

/*
 * SQL: spool.create_processor(name, handler, options) RETURNS void
 */
Datum
spool_create_processor(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	Oid			handler;
	SpoolProcessorOptions *o;
	Oid			run_as;
	Oid			t[5] = {TEXTOID, OIDOID, OIDOID, OIDOID, JSONBOID};
	Datum		v[5];
	Datum		cv[2];
	Oid			ct[2] = {TEXTOID, INT8OID};
	int64		start;
	int			rc;
	SpoolCaller caller;
	const SpoolNativeHandler *native;

	spool_require_pipeline_database("processor");
	spool_check_object_name(name, "processor");
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("handler must not be null")));
	handler = PG_GETARG_OID(1);
	/* Handler settings live under "handler"; they are checked with the handler. */
	o = spool_parse_options(&spool_processor_options, -1,
							spool_arg_jsonb(fcinfo, 2, "options must not be null",
											"Pass '{}' for the defaults."));

	spool_enter(&caller);
	check_handler(handler);
	run_as = spool_check_run_as(caller.role, o->run_as, "processor", "processor handler");
	if (pg_proc_aclcheck(handler, run_as, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" may not execute handler %s",
						GetUserNameFromId(run_as, false), format_procedure(handler)),
				 errhint("GRANT EXECUTE on the handler to the role it runs as.")));
	native = spool_native_handler(handler);
	if (native)
	{
		if (o->handler == NULL)
			spool_option_error(&spool_processor_options,
							   psprintf("spool.%s needs its settings in options.handler", native->name),
							   native->example);
		(void) native->configure(o->handler);
	}

	SPI_connect();
	check_sources(o);
	if (o->start_cursor == START_EARLIEST)
		start = 0;
	else if (o->start_cursor == START_LATEST)
	{
		bool		isnull;

		if (SPI_execute("SELECT next_cursor - 1 FROM spool.spool_state WHERE id = 1",
						true, 1) != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not read spool.spool_state");
		start = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	else
		start = o->start_cursor;

	v[0] = CStringGetTextDatum(name);
	v[1] = ObjectIdGetDatum(handler);
	v[2] = ObjectIdGetDatum(run_as);
	v[3] = ObjectIdGetDatum(caller.role);
	v[4] = JsonbPGetDatum(spool_options_jsonb(&spool_processor_options, -1, o));
	rc = SPI_execute_with_args("INSERT INTO spool.processors (name, handler, run_as, owner, options)"
							   " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
							   5, t, v, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not insert processor: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_DUPLICATE_OBJECT),
				 errmsg("processor \"%s\" already exists", name)));
	cv[0] = v[0];
	cv[1] = Int64GetDatum(start);
	if (SPI_execute_with_args("INSERT INTO spool.processor_checkpoints"
							  " (processor, committed_cursor, state_cursor, start_cursor)"
							  " VALUES ($1, $2, $2, $2)",
							  2, ct, cv, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert the processor checkpoint");
	/* A spool consumer at its snapshot cursor: replay needs what follows it. */
	if (SPI_execute_with_args("INSERT INTO spool.consumers (name, committed_cursor)"
							  " VALUES ('processor:' || $1, $2)"
							  " ON CONFLICT (name) DO UPDATE SET committed_cursor = $2, updated_at = now(),"
							  " moved_at = now()",
							  2, ct, cv, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not register the processor as a spool consumer");
	SPI_finish();
	spool_leave(&caller);
	PG_RETURN_VOID();
}

/*
 * SQL: spool.start_processor(name).  Refused for a processor that
 * spool.max_retention_action = 'drop' detached from the spool: the entries
 * after its snapshot may be gone, so a replay would skip them.
 */
Datum
spool_start_processor(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	Oid			t[1] = {TEXTOID};
	Datum		v[1] = {CStringGetTextDatum(name)};
	bool		isnull;
	SpoolCaller caller;

	spool_require_pipeline_database("processor");
	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args("SELECT owner, detached_at FROM spool.processors WHERE name = $1 FOR UPDATE",
							  1, t, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.processors");
	(void) spool_owned_row("processor", name, 1, caller.role);
	(void) SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (!isnull)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("processor \"%s\" was detached from the spool by spool.max_retention", name),
				 errdetail("It did not move for spool.max_retention and spool.max_retention_action is 'drop'; the entries it had not read may be gone."),
				 errhint("Drop it with spool.drop_processor and create it again.")));
	if (SPI_execute_with_args("UPDATE spool.processors SET enabled = true WHERE name = $1",
							  1, t, v, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not start processor \"%s\"", name);
	SPI_finish();
	spool_leave(&caller);
	spool_wake_launcher();
	PG_RETURN_VOID();
}

/* SQL: spool.stop_processor(name) */
Datum
spool_stop_processor(PG_FUNCTION_ARGS)
{
	spool_change_owned("spool.processors", "processor", spool_arg_name(fcinfo, 0, "name"),
					   "UPDATE spool.processors SET enabled = false WHERE name = $1");
	PG_RETURN_VOID();
}

/* SQL: spool.drop_processor(name).  Its outbox rows stay. */
Datum
spool_drop_processor(PG_FUNCTION_ARGS)
{
	spool_change_owned("spool.processors", "processor", spool_arg_name(fcinfo, 0, "name"),
					   "WITH c AS (DELETE FROM spool.consumers WHERE name = 'processor:' || $1)"
					   " DELETE FROM spool.processors WHERE name = $1");
	PG_RETURN_VOID();
}

/*
 * The options alter_processor changes.  None of them changes what the state
 * at a cursor is: batches may be cut anywhere (a handler is a fold),
 * snapshots only say when the state is written down, the lease how long a
 * stalled active keeps the gate, and replicas how many compute it.  The
 * others define the fold (sources, handler settings, start) or who runs it
 * (run_as): replicas and snapshots computed before and after such a change
 * would disagree at the same cursor, so they are refused.
 */
static const char *const alterable_options[] = {
	"replicas", "batch_size", "lease_ttl", "checkpoint_every", NULL
};

/* SP001 unless every key of changes is an option alter_processor may change. */
static void
check_alterable(Jsonb *changes)
{
	JsonbIterator *it = JsonbIteratorInit(&changes->root);
	JsonbValue	v;
	char	   *key;
	const char *hint = "Options alter_processor changes are replicas, batch_size, lease_ttl and checkpoint_every.";

	while (spool_object_next(&it, &key, &v))
	{
		int			i;
		bool		known = false;

		if (spool_str_in_list(key, alterable_options))
			continue;
		for (i = 0; i < spool_processor_options.noptions; i++)
			known |= strcmp(key, spool_processor_options.options[i].name) == 0;
		if (!known)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("unknown processor option \"%s\"", key),
					 errhint("%s", hint)));
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("processor option \"%s\" cannot be changed", key),
				 errdetail("It defines what the processor computes or who runs its handler: replicas and snapshots computed before and after the change would disagree."),
				 errhint("%s  To change it, create a new processor (it can start at \"latest\" or at a cursor).", hint)));
	}
}

/*
 * SQL: spool.alter_processor(name, options).  The options given are merged
 * over the stored ones (a JSON null resets one to its default) and the
 * result is checked by the option table exactly as create_processor checks
 * it.  The checkpoint is not touched.  After the commit the launcher
 * publishes the new options' version: replicas re-read batch_size,
 * lease_ttl and checkpoint_every in place, and the supervisor starts or
 * stops replicas to match the new count (a stopped active hands the gate
 * over as on any clean exit).
 */
Datum
spool_alter_processor(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	Jsonb	   *changes;
	Oid			t[2] = {TEXTOID, JSONBOID};
	Datum		v[2];
	bool		isnull;
	HeapTuple	tup;
	SpoolProcessorOptions *o;
	Jsonb	   *stored;
	SpoolCaller caller;

	spool_require_pipeline_database("processor");
	changes = spool_arg_jsonb(fcinfo, 1, "options must not be null",
							  "Pass the options to change, e.g. '{\"batch_size\": 500}'.");
	if (!JB_ROOT_IS_OBJECT(changes) || JB_ROOT_IS_SCALAR(changes))
		spool_option_error(&spool_processor_options, spool_processor_options.not_object,
						   "Pass the options to change, e.g. '{\"batch_size\": 500}'.");
	check_alterable(changes);

	spool_enter(&caller);
	SPI_connect();
	v[0] = CStringGetTextDatum(name);
	v[1] = JsonbPGetDatum(changes);
	if (SPI_execute_with_args("SELECT owner, (options - ARRAY(SELECT k FROM jsonb_each($2) j(k, v)"
							  "                           WHERE v = 'null'))"
							  "   || (SELECT coalesce(jsonb_object_agg(k, v), '{}') FROM jsonb_each($2) j(k, v)"
							  "        WHERE v <> 'null')"
							  " FROM spool.processors WHERE name = $1 FOR UPDATE",
							  2, t, v, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.processors");
	tup = spool_owned_row("processor", name, 1, caller.role);
	o = spool_parse_options(&spool_processor_options, -1,
							DatumGetJsonbPCopy(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull)));
	stored = spool_options_jsonb(&spool_processor_options, -1, o);
	v[1] = JsonbPGetDatum(stored);
	if (SPI_execute_with_args("UPDATE spool.processors SET options = $2 WHERE name = $1",
							  2, t, v, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update spool.processors");
	SPI_finish();
	spool_leave(&caller);
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("processor \"%s\" altered: replicas %d, batch_size %d, lease_ttl " INT64_FORMAT " ms, checkpoint_every " INT64_FORMAT,
					name, o->replicas, o->batch_size, o->lease_ttl_ms, o->checkpoint_every)));
	spool_wake_launcher();
	PG_RETURN_VOID();
}

static const char *
role_name(SpoolReplicaRole role, pid_t pid)
{
	if (pid == 0)
		return "down";
	switch (role)
	{
		case ROLE_STARTING:
			return "starting";
		case ROLE_STANDBY:
			return "standby";
		case ROLE_ACTIVE:
			return "active";
		default:
			return "down";
	}
}

/*
 * SQL: spool._processor_histograms() — each replica's histograms, in the
 * row shape of spool.stage_histograms.
 */
Datum
spool_processor_histograms(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;
	int			r;

	spool_require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; i < SPOOL_MAX_PROCESSORS; i++)
	{
		for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
		{
			SpoolReplicaSlot rs;
			char		name[NAMEDATALEN];
			bool		in_use;

			LWLockAcquire(spool_processor_shared->lock, LW_SHARED);
			in_use = spool_processor_shared->processors[i].in_use;
			strlcpy(name, spool_processor_shared->processors[i].name, NAMEDATALEN);
			rs = spool_processor_shared->processors[i].replicas[r];
			LWLockRelease(spool_processor_shared->lock);
			if (!in_use || (rs.started_at == 0 && rs.errors == 0))
				continue;
			spool_hist_put(rsinfo, "processor", name, r + 1, "batch_entries", "entries",
						   &rs.batch_entries);
			spool_hist_put(rsinfo, "processor", name, r + 1, "batch_ms", "ms", &rs.batch_ms);
			spool_hist_put(rsinfo, "processor", name, r + 1, "handler_ms", "ms", &rs.handler_ms);
			spool_hist_put(rsinfo, "processor", name, r + 1, "commit_ms", "ms", &rs.commit_ms);
			spool_hist_put(rsinfo, "processor", name, r + 1, "snapshot_ms", "ms", &rs.snapshot_ms);
		}
	}
	return (Datum) 0;
}

/* SQL: spool.processor_runtime(), one row per replica that has run. */
Datum
spool_processor_runtime(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;
	int			r;

	spool_require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	LWLockAcquire(spool_processor_shared->lock, LW_SHARED);
	for (i = 0; i < SPOOL_MAX_PROCESSORS; i++)
	{
		SpoolProcessorSlot *ps = &spool_processor_shared->processors[i];

		if (!ps->in_use)
			continue;
		for (r = 0; r < SPOOL_MAX_REPLICAS; r++)
		{
			SpoolReplicaSlot *rs = &ps->replicas[r];
			Datum		v[21];
			bool		n[21];

			if (rs->started_at == 0 && rs->errors == 0)
				continue;
			memset(n, 0, sizeof(n));
			v[0] = CStringGetTextDatum(ps->name);
			v[1] = Int32GetDatum(r + 1);
			v[2] = Int32GetDatum(rs->pid);
			n[2] = rs->pid == 0;
			v[3] = CStringGetTextDatum(role_name(rs->role, rs->pid));
			v[4] = Int64GetDatum(rs->cursor);
			v[5] = Int64GetDatum(ps->committed_cursor);
			v[6] = Int64GetDatum((int64) rs->state_hash);
			n[6] = rs->state_hash_cursor < 0;
			v[7] = Int64GetDatum(rs->state_hash_cursor);
			n[7] = rs->state_hash_cursor < 0;
			v[8] = Int64GetDatum(rs->token);
			n[8] = rs->role != ROLE_ACTIVE;
			v[9] = Int64GetDatum((int64) rs->takeovers);
			v[10] = TimestampTzGetDatum(rs->last_takeover_at);
			n[10] = rs->last_takeover_at == 0;
			v[11] = Float8GetDatum(rs->last_takeover_ms);
			n[11] = rs->last_takeover_ms < 0;
			v[12] = Int64GetDatum((int64) rs->entries);
			v[13] = Int64GetDatum((int64) rs->batches);
			v[14] = Int64GetDatum((int64) rs->outputs);
			v[15] = Int64GetDatum((int64) rs->hash_checks);
			v[16] = Int64GetDatum((int64) rs->hash_mismatches);
			v[17] = Int64GetDatum((int64) rs->errors);
			v[18] = CStringGetTextDatum(rs->last_error);
			n[18] = rs->last_error[0] == '\0';
			v[19] = TimestampTzGetDatum(rs->last_error_at);
			n[19] = rs->last_error_at == 0;
			v[20] = TimestampTzGetDatum(rs->started_at);
			n[20] = rs->started_at == 0;
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
		}
	}
	LWLockRelease(spool_processor_shared->lock);
	return (Datum) 0;
}
