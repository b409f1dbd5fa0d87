/*-------------------------------------------------------------------------
 *
 * outbox_target.c
 *	  Outbox targets: spool.create_target, spool.drop_target, spool.redrive,
 *	  and the option checks shared with the dispatcher that loads a target.
 *
 *	  A target is a row of spool.targets plus its partition of
 *	  spool.outbox_store (spool.outbox_t<id>), a ring of eight list
 *	  partitions, and one spool.outbox_positions row per shard.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "parser/parse_func.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "kafka/kafka.h"
#include "outbox/outbox.h"

PG_FUNCTION_INFO_V1(spool_create_target);
PG_FUNCTION_INFO_V1(spool_drop_target);
PG_FUNCTION_INFO_V1(spool_alter_target);
PG_FUNCTION_INFO_V1(spool_redrive);
PG_FUNCTION_INFO_V1(spool_grant_target);
PG_FUNCTION_INFO_V1(spool_revoke_target);

static void check_kafka(OutboxTarget *t, Oid role);
static void targets_changed(SpoolCaller *caller);
static Jsonb *target_options_jsonb(OutboxTarget *t);
static void function_option(const SpoolOptionTable *table, const SpoolOption *opt,
							JsonbValue *v, void *result);
static void transactional_option(const SpoolOptionTable *table, const SpoolOption *opt,
								 JsonbValue *v, void *result);
static bool transactional_render(const SpoolOption *opt, const void *result, StringInfo buf);

/* In the order of OutboxKind. */
static const char *const kind_names[] = {"sql", "notify", "kafka", NULL};

#define SQL		SPOOL_OPT_SCOPE(KIND_SQL)
#define NOTIFY	SPOOL_OPT_SCOPE(KIND_NOTIFY)
#define KAFKA	SPOOL_OPT_SCOPE(KIND_KAFKA)

#define TGT(member)	SPOOL_OPT_MEMBER(OutboxTarget, member)

static const SpoolOption target_option_specs[] = {
	{.name = "function", .type = SPOOL_OPT_STRING, .scopes = SQL, TGT(function),
		.doc = "Write schema.function, for example public.deliver: the dispatcher has no search_path of yours.",
		.parse = function_option},
	{.name = "run_as", .type = SPOOL_OPT_STRING, .scopes = SQL, TGT(run_as)},
	{.name = "channel", .type = SPOOL_OPT_STRING, .scopes = NOTIFY, TGT(channel)},
	{.name = "brokers", .type = SPOOL_OPT_STRING, .scopes = KAFKA, TGT(brokers)},
	{.name = "topic", .type = SPOOL_OPT_STRING, .scopes = KAFKA, TGT(topic)},
	{.name = "kafka", .type = SPOOL_OPT_OBJECT, .scopes = KAFKA, TGT(kafka), .dflt_text = "{}",
		.what = "librdkafka properties"},
	{.name = "transactional", .type = SPOOL_OPT_CUSTOM, .scopes = KAFKA, TGT(transactional),
		.doc = "true or false: true produces each batch in one Kafka transaction that also commits the shard's position.",
		.parse = transactional_option, .render = transactional_render},
	{.name = "shards", .type = SPOOL_OPT_INT, TGT(shards), .dflt = 1, .lo = 1,
		.hi = SPOOL_MAX_SHARDS},
	{.name = "batch_size", .type = SPOOL_OPT_INT, TGT(batch_size), .dflt = 1000, .lo = 1,
		.hi = 10000},
	{.name = "batch_interval", .type = SPOOL_OPT_DURATION, .flags = SPOOL_OPT_TEXT,
		TGT(batch_interval_us), .dflt = 10 * 1000, .hi = USECS_PER_MINUTE, .unit = 1},
	{.name = "retry_limit", .type = SPOOL_OPT_INT, TGT(retry_limit), .dflt = 10, .hi = 100},
	{.name = "retry_backoff", .type = SPOOL_OPT_DURATION, .flags = SPOOL_OPT_TEXT,
		TGT(retry_backoff_us), .dflt = 100 * 1000, .lo = 1000, .hi = USECS_PER_HOUR, .unit = 1},
	{.name = "retry_backoff_max", .type = SPOOL_OPT_DURATION, .flags = SPOOL_OPT_TEXT,
		TGT(retry_backoff_max_us), .dflt = 30 * USECS_PER_SEC, .lo = 1000, .hi = USECS_PER_DAY, .unit = 1},
};

static const SpoolOptionTable target_options = {
	SPOOL_OPT_TABLE(target_option_specs, OutboxTarget),
	.prefix = "", .noun = "option", .subject = "option ", .listing = "Options are",
	.not_object = "target options must be a JSON object",
	.scopes = kind_names, .scope_noun = "target",
};

const char *
spool_outbox_kind_name(OutboxKind kind)
{
	return kind_names[kind];
}

/*
 * function: a function name with its schema (resolved when the target is
 * created or altered).
 */
static void
function_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
				void *result)
{
	OutboxTarget *t = result;
	MemoryContext cxt = CurrentMemoryContext;
	volatile int n = 0;

	spool_option_value(table, opt, v, result);
	PG_TRY();
	{
		n = list_length(stringToQualifiedNameList(t->function));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		n = -1;
	}
	PG_END_TRY();
	if (n < 0 || n > 2)
		spool_option_bad(table, opt, NULL,
						 psprintf("is not a function name: \"%s\"", t->function));
	if (n < 2)
		spool_option_bad(table, opt, NULL,
						 psprintf("must be schema-qualified, not \"%s\"", t->function));
}

/* transactional: a JSON boolean. */
static void
transactional_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
					 void *result)
{
	if (v->type != jbvBool)
		spool_option_bad(table, opt, NULL, "must be true or false");
	((OutboxTarget *) result)->transactional = v->val.boolean;
}

/* Written back only when true, so that the options of other targets stay as they were. */
static bool
transactional_render(const SpoolOption *opt, const void *result, StringInfo buf)
{
	if (!((const OutboxTarget *) result)->transactional)
		return false;
	appendStringInfoString(buf, "true");
	return true;
}

/*
 * The function of a sql target, as fn(jsonb, text, bigint); InvalidOid when
 * missing_ok and there is none.
 */
Oid
spool_outbox_resolve_function(const char *name, bool missing_ok)
{
	Oid			argtypes[3] = {JSONBOID, TEXTOID, INT8OID};
	List	   *names = stringToQualifiedNameList(name);

	return LookupFuncName(names, 3, argtypes, missing_ok);
}

/*
 * Parse and check a target definition.  Everything that can be checked
 * without running the target is checked here, so that create_target rejects
 * a target that could never deliver.
 */
OutboxTarget *
spool_outbox_parse_target(const char *name, const char *kind, Jsonb *options)
{
	OutboxTarget *t;
	int			k;

	spool_check_object_name(name, "target");
	for (k = 0; kind_names[k] && strcmp(kind, kind_names[k]) != 0; k++)
		;
	if (kind_names[k] == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("unknown target kind \"%s\"", kind),
				 errhint("Kinds are sql, notify and kafka.")));
	t = spool_parse_options(&target_options, k, options);
	strlcpy(t->name, name, NAMEDATALEN);
	t->kind = (OutboxKind) k;

	if (t->retry_backoff_max_us < t->retry_backoff_us)
		spool_option_error(&target_options,
						   "option \"retry_backoff_max\" is shorter than \"retry_backoff\"", NULL);
	switch (t->kind)
	{
		case KIND_SQL:
			if (t->function == NULL)
				spool_option_error(&target_options, "a sql target needs option \"function\"",
								   "Name a function (payload jsonb, key text, outbox_id bigint).");
			break;
		case KIND_NOTIFY:
			if (t->channel == NULL)
				spool_option_error(&target_options, "a notify target needs option \"channel\"",
								   NULL);
			if (strlen(t->channel) >= NAMEDATALEN)
				spool_option_error(&target_options,
								   psprintf("channel name \"%s\" is too long", t->channel),
								   "At most 63 bytes are allowed.");
			break;
		case KIND_KAFKA:
			if (t->brokers == NULL || t->topic == NULL)
				spool_option_error(&target_options,
								   "a kafka target needs options \"brokers\" and \"topic\"",
								   NULL);
			break;
	}
	return t;
}

/*
 * Set a target's librdkafka properties (options->'kafka') on conf.  Raises
 * SP001, after destroying conf, when one is refused: librdkafka checks every
 * name and value as it is set.  An explicit enable.idempotence=false is
 * refused, since ids and order rely on it.
 */
void
spool_outbox_kafka_props(rd_kafka_conf_t *conf, Jsonb *kafka)
{
	char		err[512];
	char	   *bad = NULL;
	const char *hint = NULL;
	JsonbIterator *it;
	JsonbValue	v;
	char	   *key;

	if (kafka == NULL)
		return;
	it = JsonbIteratorInit(&kafka->root);
	while (bad == NULL && spool_object_next(&it, &key, &v))
	{
		char	   *val = spool_kafka_property_text(&v);

		if (val == NULL)
			bad = psprintf("kafka property \"%s\" must be a string, number or boolean", key);
		else if (strcmp(key, "enable.idempotence") == 0 && strcmp(val, "true") != 0)
		{
			bad = "kafka targets always use enable.idempotence=true";
			hint = "Ordering per key and the at-least-once guarantee rely on the idempotent producer.";
		}
		else if (strcmp(key, "bootstrap.servers") == 0 || strcmp(key, "metadata.broker.list") == 0)
			bad = psprintf("kafka property \"%s\" is set by option \"brokers\"", key);
		else if (strcmp(key, "transactional.id") == 0)
		{
			/* A chosen id could fence another target's (or database's) producer. */
			bad = "kafka targets set transactional.id themselves";
			hint = "Use option \"transactional\": true; the id is spool-<database>-<target>-<shard>.";
		}
		else if (rd_kafka_conf_set(conf, key, val, err, sizeof(err)) != RD_KAFKA_CONF_OK)
		{
			/* Some librdkafka messages end with a newline. */
			while (strlen(err) > 0 && err[strlen(err) - 1] == '\n')
				err[strlen(err) - 1] = '\0';
			bad = psprintf("kafka property \"%s\": %s", key, err);
		}
	}
	if (bad)
	{
		rd_kafka_conf_destroy(conf);
		spool_option_error(&target_options, bad, hint);
	}
}

/*
 * A kafka target's brokers and properties: first whether role may use them
 * (kafka_policy.c; before librdkafka sees any), then whether librdkafka
 * takes each one.
 */
static void
check_kafka(OutboxTarget *t, Oid role)
{
	rd_kafka_conf_t *conf;

	spool_kafka_policy_check_jsonb(t->brokers, t->kafka, role, "target", t->name);
	conf = rd_kafka_conf_new();
	spool_outbox_kafka_props(conf, t->kafka);
	rd_kafka_conf_destroy(conf);
}

/* The options with defaults filled in, as stored in spool.targets. */
static Jsonb *
target_options_jsonb(OutboxTarget *t)
{
	return spool_options_jsonb(&target_options, t->kind, t);
}

/*
 * Load target_id's definition into the current memory context (in a
 * transaction, SPI connected); NULL if it is gone.
 */
OutboxTarget *
spool_outbox_load_target(int target_id)
{
	Oid			argt[1] = {INT4OID};
	Datum		argv[1] = {Int32GetDatum(target_id)};
	OutboxTarget *t;
	bool		isnull;
	MemoryContext cxt = CurrentMemoryContext;

	if (SPI_execute_with_args("SELECT name, kind, options, owner FROM spool.targets WHERE id = $1",
							  1, argt, argv, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	if (SPI_processed == 0)
		return NULL;
	/* SPI leaves us in its own context: the target must live in the caller's. */
	MemoryContextSwitchTo(cxt);
	t = spool_outbox_parse_target(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1),
								  SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2),
								  DatumGetJsonbP(SPI_getbinval(SPI_tuptable->vals[0],
															   SPI_tuptable->tupdesc, 3,
															   &isnull)));
	t->id = target_id;
	t->owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4,
											  &isnull));
	t->options_hash = spool_outbox_options_hash(SPI_getvalue(SPI_tuptable->vals[0],
															 SPI_tuptable->tupdesc, 3));
	return t;
}

/*
 * A hash of a target's stored options (their jsonb text): the launcher
 * restarts a shard worker whose loaded options no longer match the table.
 */
uint32
spool_outbox_options_hash(const char *options_text)
{
	return hash_bytes((const unsigned char *) options_text, strlen(options_text));
}

/*
 * A sql target's function exists with the right signature, is not STRICT,
 * and run_as may execute it; the function is stored schema-qualified and
 * run_as by name.
 */
static void
check_sql_target(OutboxTarget *t, Oid caller)
{
	Oid			fn = spool_outbox_resolve_function(t->function, true);
	Oid			run_as;
	HeapTuple	tup;
	bool		strict;

	if (!OidIsValid(fn))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("function %s(jsonb, text, bigint) does not exist", t->function),
				 errhint("A sql target calls fn(payload jsonb, key text, outbox_id bigint).")));
	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", fn);
	strict = ((Form_pg_proc) GETSTRUCT(tup))->proisstrict;
	ReleaseSysCache(tup);
	if (strict)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("function %s must not be STRICT", format_procedure(fn)),
				 errdetail("Barriers and rows without a key are delivered with key NULL.")));
	run_as = spool_check_run_as(caller, t->run_as, "target", "target function");
	if (pg_proc_aclcheck(fn, run_as, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" may not execute function %s",
						GetUserNameFromId(run_as, false), format_procedure(fn))));
	/* Stored qualified, so that the worker's search_path does not matter. */
	t->function = format_procedure_qualified(fn);
	*strchr(t->function, '(') = '\0';
	t->run_as = GetUserNameFromId(run_as, false);
}

/* SQL: spool.create_target(name, kind, options) */
Datum
spool_create_target(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "target name");
	char	   *kind = spool_arg_name(fcinfo, 1, "target kind");
	Jsonb	   *options;
	OutboxTarget *t;
	Oid			argt[5] = {TEXTOID, INT4OID, TEXTOID, JSONBOID, OIDOID};
	Datum		argv[5];
	bool		isnull;
	int			s;
	SpoolCaller caller;

	spool_require_pipeline_database("target");
	options = spool_arg_jsonb(fcinfo, 2, "target options must not be NULL",
							   "Pass '{}' for the defaults.");
	t = spool_outbox_parse_target(name, kind, options);

	spool_enter(&caller);
	if (t->kind == KIND_SQL)
		check_sql_target(t, caller.role);
	else if (t->kind == KIND_KAFKA)
		check_kafka(t, caller.role);

	SPI_connect();
	if (SPI_execute_with_args("SELECT 1 FROM spool.targets WHERE name = $1", 1, argt,
							  (Datum[]) {CStringGetTextDatum(name)}, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_DUPLICATE_OBJECT),
				 errmsg("target \"%s\" already exists", name)));
	if (SPI_execute("SELECT nextval('spool.target_id_seq')::int", false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not allocate a target id");
	t->id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

	argv[0] = CStringGetTextDatum(name);
	argv[1] = Int32GetDatum(t->id);
	argv[2] = CStringGetTextDatum(kind);
	argv[3] = JsonbPGetDatum(target_options_jsonb(t));
	argv[4] = ObjectIdGetDatum(caller.role);
	if (SPI_execute_with_args("INSERT INTO spool.targets (name, id, kind, options, owner)"
							  " VALUES ($1, $2, $3, $4, $5)", 5, argt, argv, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert into spool.targets");

	/*
	 * The ring is built apart and attached, which takes only a
	 * share-update-exclusive lock on spool.outbox_store: enqueues to other
	 * targets go on.
	 */
	if (SPI_execute(psprintf("CREATE TABLE spool.outbox_t%d (LIKE spool.outbox_store"
							 " INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY LIST (slot)",
							 t->id), false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not create the outbox of target \"%s\"", name);
	for (s = 0; s < SPOOL_OUTBOX_SLOTS; s++)
		if (SPI_execute(psprintf("CREATE TABLE spool.outbox_t%d_%d PARTITION OF spool.outbox_t%d"
								 " FOR VALUES IN (%d)", t->id, s, t->id, s), false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "could not create the outbox of target \"%s\"", name);
	if (SPI_execute(psprintf("ALTER TABLE spool.outbox_store ATTACH PARTITION spool.outbox_t%d"
							 " FOR VALUES IN (%d)", t->id, t->id), false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not attach the outbox of target \"%s\"", name);
	if (SPI_execute(psprintf("INSERT INTO spool.outbox_positions (target_id, shard)"
							 " SELECT %d, s FROM generate_series(0, %d) s", t->id, t->shards - 1),
					false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert into spool.outbox_positions");
	targets_changed(&caller);
	PG_RETURN_VOID();
}

/*
 * The end of a change to the targets, connected to SPI as the caller's door
 * opened: back to the caller, then tell enqueuers and the launcher.
 */
static void
targets_changed(SpoolCaller *caller)
{
	SPI_finish();
	spool_leave(caller);
	spool_outbox_targets_changed();
	spool_wake_launcher();
}

/* SQL: spool.drop_target(name, force) */
Datum
spool_drop_target(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "target name");
	bool		force = !PG_ARGISNULL(1) && PG_GETARG_BOOL(1);
	Oid			argt[1] = {TEXTOID};
	Datum		argv[1] = {CStringGetTextDatum(name)};
	bool		isnull;
	int			id;
	SpoolCaller caller;

	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args("SELECT id, owner FROM spool.targets WHERE name = $1 FOR UPDATE",
							  1, argt, argv, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	id = DatumGetInt32(SPI_getbinval(spool_owned_row("target", name, 2, caller.role),
									 SPI_tuptable->tupdesc, 1, &isnull));
	/* The DROP below would take it anyway; first, as everyone does. */
	spool_outbox_lock_store(AccessExclusiveLock);
	if (!force)
	{
		int64		undelivered;

		if (SPI_execute(psprintf("SELECT (SELECT count(*) FROM spool.outbox_t%d o"
								 "          JOIN spool.outbox_positions p ON p.target_id = %d"
								 "           AND p.shard = greatest(o.shard, 0)"
								 "         WHERE o.id > p.position)"
								 "     + (SELECT count(*) FROM spool.outbox_retry WHERE target_id = %d)",
								 id, id, id), true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not count undelivered rows");
		undelivered = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (undelivered > 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("target \"%s\" has " INT64_FORMAT " undelivered rows", name, undelivered),
					 errhint("Wait until spool.outbox_status shows no backlog, or pass force => true to drop them.")));
	}
	if (SPI_execute(psprintf("DROP TABLE spool.outbox_t%d;"
							 " DELETE FROM spool.outbox_positions WHERE target_id = %d;"
							 " DELETE FROM spool.outbox_retry WHERE target_id = %d;"
							 " DELETE FROM spool.outbox_dead WHERE target_id = %d;"
							 " DELETE FROM spool.target_grants WHERE target_id = %d;"
							 " DELETE FROM spool.targets WHERE id = %d",
							 id, id, id, id, id, id), false, 0) < 0)
		elog(ERROR, "could not drop target \"%s\"", name);
	targets_changed(&caller);
	PG_RETURN_VOID();
}

/*
 * SQL: spool.alter_target(name, options).  The options are merged over the
 * stored ones (a JSON null resets one to its default) and checked as at
 * create time, for the caller; the shard count cannot change, since keys
 * were routed at enqueue.  After the commit the launcher sees the new
 * options and restarts the target's shard workers, each delivering the batch
 * it holds first.
 */
Datum
spool_alter_target(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "target name");
	Oid			argt[2] = {TEXTOID, JSONBOID};
	Datum		argv[2];
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;
	int			id;
	int			old_shards;
	char	   *kind;
	OutboxTarget *t;
	SpoolCaller caller;

	argv[1] = JsonbPGetDatum(spool_arg_jsonb(fcinfo, 1, "target options must not be NULL",
											 "Pass the options to change, e.g. '{\"batch_size\": 500}'."));
	argv[0] = CStringGetTextDatum(name);
	if (!JB_ROOT_IS_OBJECT(DatumGetJsonbP(argv[1])) || JB_ROOT_IS_SCALAR(DatumGetJsonbP(argv[1])))
		spool_option_error(&target_options, target_options.not_object, NULL);

	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args("SELECT id, kind, owner, (options->>'shards')::int,"
							  " jsonb_strip_nulls(options || $2) FROM spool.targets"
							  " WHERE name = $1 FOR UPDATE",
							  2, argt, argv, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	tup = spool_owned_row("target", name, 3, caller.role);
	desc = SPI_tuptable->tupdesc;
	id = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
	kind = SPI_getvalue(tup, desc, 2);
	old_shards = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));

	t = spool_outbox_parse_target(name, kind,
								  DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 5, &isnull)));
	if (t->shards != old_shards)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("the shard count of target \"%s\" cannot be changed", name),
				 errdetail("Rows are routed to a shard when they are enqueued."),
				 errhint("Create a new target with the shard count you want.")));
	if (t->kind == KIND_SQL)
		check_sql_target(t, caller.role);
	else if (t->kind == KIND_KAFKA)
		check_kafka(t, caller.role);

	argv[0] = Int32GetDatum(id);
	argv[1] = JsonbPGetDatum(target_options_jsonb(t));
	if (SPI_execute_with_args("UPDATE spool.targets SET options = $2 WHERE id = $1", 2,
							  (Oid[]) {INT4OID, JSONBOID}, argv, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update spool.targets");
	SPI_finish();
	spool_leave(&caller);
	spool_wake_launcher();
	PG_RETURN_VOID();
}

/*
 * SQL: spool.redrive(outbox_id).  The dead row is parked again, due now; its
 * shard worker retries it before any later parked row of its key.  Only
 * members of the target's owner may redrive its rows.
 */
Datum
spool_redrive(PG_FUNCTION_ARGS)
{
	int64		id = spool_arg_int64(fcinfo, 0, "outbox_id", true);
	Oid			argt[1] = {INT8OID};
	Datum		argv[1] = {Int64GetDatum(id)};
	bool		isnull;
	int			target_id;
	int			shard;
	SpoolDispatchSlot *ds;
	SpoolCaller caller;

	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args("SELECT d.target, t.owner FROM spool.outbox_dead d"
							  " JOIN spool.targets t ON t.id = d.target_id WHERE d.id = $1"
							  " FOR UPDATE OF d",
							  1, argt, argv, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.outbox_dead");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("outbox row " INT64_FORMAT " is not a dead letter", id),
				 errhint("spool.outbox_dead lists the dead letters.")));
	spool_check_owner(caller.role,
					  DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2,
													 &isnull)),
					  "target", SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
	if (SPI_execute_with_args("WITH d AS (DELETE FROM spool.outbox_dead WHERE id = $1 RETURNING *)"
							  " INSERT INTO spool.outbox_retry (id, target, target_id, shard, key, payload,"
							  "   barrier, processor, cursor, created_at, attempts, next_attempt_at, last_error)"
							  " SELECT id, target, target_id, shard, key, payload, barrier, processor, cursor,"
							  "   created_at, 0, now(), last_error FROM d"
							  " RETURNING target_id, shard",
							  1, argt, argv, NULL, false, 0) != SPI_OK_INSERT_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "could not redrive outbox row " INT64_FORMAT, id);
	target_id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	shard = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	SPI_finish();
	spool_leave(&caller);

	/* A hint only: the worker also re-reads its parked rows when it polls. */
	ds = spool_dispatch_slot_of(target_id, Max(shard, 0));
	if (ds)
	{
		pg_atomic_write_u32(&ds->retry_dirty, 1);
		if (ds->latch)
			SetLatch(ds->latch);
	}
	PG_RETURN_VOID();
}

/*
 * grant_target / revoke_target: the owner of a target decides which roles
 * may write into it (spool.enqueue, spool.enqueue_barrier, processor
 * outputs).  Members of a granted role may too.
 */
static void
target_grant(FunctionCallInfo fcinfo, bool grant)
{
	char	   *name = spool_arg_name(fcinfo, 0, "target name");
	char	   *rolename = spool_arg_name(fcinfo, 1, "role");
	Oid			role = get_role_oid(rolename, true);
	bool		isnull;
	int			id;
	SpoolCaller caller;

	if (!OidIsValid(role))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("role \"%s\" does not exist", rolename)));
	spool_enter(&caller);
	SPI_connect();
	if (SPI_execute_with_args("SELECT id, owner FROM spool.targets WHERE name = $1 FOR UPDATE",
							  1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(name)},
							  NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.targets");
	id = DatumGetInt32(SPI_getbinval(spool_owned_row("target", name, 2, caller.role),
									 SPI_tuptable->tupdesc, 1, &isnull));
	if (SPI_execute_with_args(grant ?
							  "INSERT INTO spool.target_grants (target_id, role) VALUES ($1, $2)"
							  " ON CONFLICT DO NOTHING" :
							  "DELETE FROM spool.target_grants WHERE target_id = $1 AND role = $2",
							  2, (Oid[]) {INT4OID, OIDOID},
							  (Datum[]) {Int32GetDatum(id), ObjectIdGetDatum(role)},
							  NULL, false, 0) < 0)
		elog(ERROR, "could not change the grants of target \"%s\"", name);
	SPI_finish();
	spool_leave(&caller);
	spool_outbox_targets_changed();
}

/* SQL: spool.grant_target(target, role) */
Datum
spool_grant_target(PG_FUNCTION_ARGS)
{
	target_grant(fcinfo, true);
	PG_RETURN_VOID();
}

/* SQL: spool.revoke_target(target, role) */
Datum
spool_revoke_target(PG_FUNCTION_ARGS)
{
	target_grant(fcinfo, false);
	PG_RETURN_VOID();
}
