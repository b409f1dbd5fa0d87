/*-------------------------------------------------------------------------
 *
 * source.c
 *	  SQL functions that define and control Kafka sources: create_source,
 *	  alter_source, start_source, stop_source, drop_source.  The launcher
 *	  starts and stops the ingest workers; these functions change
 *	  spool.sources and wake it.  (Seeks and dead-letter replays:
 *	  source_ops.c.)
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "ingest/ingest.h"
#include "kafka/kafka.h"

PG_FUNCTION_INFO_V1(spool_create_source);
PG_FUNCTION_INFO_V1(spool_start_source);
PG_FUNCTION_INFO_V1(spool_stop_source);
PG_FUNCTION_INFO_V1(spool_drop_source);
PG_FUNCTION_INFO_V1(spool_alter_source);

#define PROBE_TIMEOUT_MS 3000

static void check_brokers(const char *brokers);
static int	check_topics(ArrayType *topics, char ***out);
static rd_kafka_conf_t *source_conf(const char *brokers, SpoolSourceOptions *o,
									const char *client_id, const char *message);
static void probe_topics(const char *brokers, SpoolSourceOptions *o,
						 char **topics, int ntopics);

/* brokers is a comma-separated list of host:port. */
static void
check_brokers(const char *brokers)
{
	char	   *copy = pstrdup(brokers);
	char	   *save = NULL;
	char	   *item;
	int			n = 0;

	for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save))
	{
		char	   *colon = strrchr(item, ':');
		char	   *end;
		long		port;

		while (*item == ' ')
			item++;
		if (colon == NULL || colon == item)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("invalid broker address \"%s\"", item),
					 errhint("Use host:port, separated by commas, e.g. 'kafka1:9092,kafka2:9092'.")));
		port = strtol(colon + 1, &end, 10);
		if (*end != '\0' || port < 1 || port > 65535)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("invalid port in broker address \"%s\"", item)));
		n++;
	}
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("brokers must not be empty")));
}

static int
check_topics(ArrayType *topics, char ***out)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	int			i;

	if (ARR_NDIM(topics) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("topics must be a one-dimensional array")));
	deconstruct_array(topics, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("topics must not be empty")));
	if (n > 64)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("a source reads at most 64 topics")));
	*out = palloc(sizeof(char *) * n);
	for (i = 0; i < n; i++)
	{
		char	   *t;
		int			j;

		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("topics must not contain NULL")));
		t = TextDatumGetCString(elems[i]);
		if (t[0] == '\0' || strlen(t) > 249)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("invalid topic name \"%s\"", t),
					 errdetail("Kafka topic names have 1 to 249 characters.")));
		if (!spool_name_chars_ok(t))
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("invalid topic name \"%s\"", t),
					 errdetail("Kafka topic names use letters, digits, '_', '.' and '-' only.")));
		for (j = 0; j < i; j++)
			if (strcmp((*out)[j], t) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
						 errmsg("topic \"%s\" is listed twice", t)));
		(*out)[i] = t;
	}
	return n;
}

/* librdkafka's configuration for a source; SP001 with message if it is bad. */
static rd_kafka_conf_t *
source_conf(const char *brokers, SpoolSourceOptions *o, const char *client_id,
			const char *message)
{
	char		errbuf[512];
	rd_kafka_conf_t *conf = spool_kafka_conf(brokers, o, client_id, errbuf, sizeof(errbuf));

	if (conf == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("%s", message),
				 errdetail("%s", errbuf)));
	return conf;
}

/*
 * Ask the brokers, briefly, whether the topics exist.  An unreachable
 * cluster is only a warning (it may come up later; the source status will
 * show the error); a reachable cluster without the topic is an error.
 */
static void
probe_topics(const char *brokers, SpoolSourceOptions *o, char **topics, int ntopics)
{
	char		errbuf[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	int			i;
	char	   *missing = NULL;
	char	   *unreachable = NULL;

	conf = source_conf(brokers, o, "spool_ext.probe", "invalid Kafka configuration for source");
	rd_kafka_conf_set(conf, "allow.auto.create.topics", "false", NULL, 0);
	rd_kafka_conf_set(conf, "socket.connection.setup.timeout.ms", "2000", NULL, 0);
	rk = spool_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf, sizeof(errbuf));
	if (rk == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("invalid Kafka configuration for source"),
				 errdetail("%s", errbuf)));

	for (i = 0; i < ntopics && !missing && !unreachable; i++)
	{
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topics[i], NULL);
		const struct rd_kafka_metadata *md = NULL;
		rd_kafka_resp_err_t err;

		err = rd_kafka_metadata(rk, 0, rkt, &md, PROBE_TIMEOUT_MS);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			unreachable = pstrdup(rd_kafka_err2str(err));
		else if (md->topic_cnt < 1 ||
				 md->topics[0].err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
				 md->topics[0].partition_cnt == 0)
			missing = topics[i];
		if (md)
			rd_kafka_metadata_destroy(md);
		rd_kafka_topic_destroy(rkt);
	}
	rd_kafka_destroy(rk);

	if (missing)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_UNKNOWN_OBJECT),
				 errmsg("Kafka topic \"%s\" does not exist", missing),
				 errdetail("The brokers at \"%s\" answered and do not know it.", brokers)));
	if (unreachable)
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not reach Kafka at \"%s\": %s", brokers, unreachable),
				 errdetail("The source was created; spool.source_status will show the error until the brokers answer.")));
}

/*
 * SQL: spool.create_source(name, brokers, topics, options) RETURNS void
 */
Datum
spool_create_source(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	char	   *brokers = spool_arg_name(fcinfo, 1, "brokers");
	ArrayType  *topics_arr;
	Jsonb	   *options;
	SpoolSourceOptions *o;
	char	  **topics;
	int			ntopics;
	rd_kafka_conf_t *conf;
	Oid			t[5] = {TEXTOID, TEXTOID, TEXTARRAYOID, JSONBOID, OIDOID};
	Datum		v[5];
	int			rc;
	SpoolCaller caller;

	spool_require_pipeline_database("source");
	if (GetDatabaseEncoding() != PG_UTF8)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("Kafka sources need a UTF8 database"),
				 errdetail("This database uses %s.", GetDatabaseEncodingName())));
	spool_check_object_name(name, "source");
	check_brokers(brokers);
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("topics must not be null")));
	topics_arr = PG_GETARG_ARRAYTYPE_P(2);
	ntopics = check_topics(topics_arr, &topics);
	options = spool_arg_jsonb(fcinfo, 3, "options must not be null",
							   "Pass '{}' for the defaults.");
	o = spool_parse_source_options(options);

	spool_enter(&caller);
	/* Before librdkafka sees any of them: some would run at once. */
	spool_kafka_policy_check(brokers, o->nkafka, (const char **) o->kafka_keys,
							 (const char **) o->kafka_values, caller.role,
							 "source", name);
	conf = source_conf(brokers, o, "spool_ext.check", "invalid Kafka property in source options");
	rd_kafka_conf_destroy(conf);

	SPI_connect();
	v[0] = CStringGetTextDatum(name);
	v[1] = CStringGetTextDatum(brokers);
	v[2] = PointerGetDatum(topics_arr);
	v[3] = JsonbPGetDatum(spool_source_options_jsonb(o));
	v[4] = ObjectIdGetDatum(caller.role);
	rc = SPI_execute_with_args("INSERT INTO spool.sources (name, brokers, topics, options, owner)"
							   " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
							   5, t, v, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not insert source: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_DUPLICATE_OBJECT),
				 errmsg("source \"%s\" already exists", name)));
	SPI_finish();

	/* Last, so that bad arguments fail fast without touching the network. */
	probe_topics(brokers, o, topics, ntopics);
	spool_leave(&caller);
	PG_RETURN_VOID();
}

/*
 * SQL: spool.start_source(name).  After a stop on a retention gap, starting
 * again accepts that gap: the worker continues from the log start.
 */
Datum
spool_start_source(PG_FUNCTION_ARGS)
{
	spool_require_pipeline_database("source");
	spool_change_owned("spool.sources", "source", spool_arg_name(fcinfo, 0, "name"),
					   "UPDATE spool.sources SET enabled = true,"
					   " skip_gap = coalesce(stopped_reason LIKE 'gap%', false),"
					   " stopped_reason = NULL WHERE name = $1");
	PG_RETURN_VOID();
}

/* SQL: spool.stop_source(name) */
Datum
spool_stop_source(PG_FUNCTION_ARGS)
{
	spool_change_owned("spool.sources", "source", spool_arg_name(fcinfo, 0, "name"),
					   "UPDATE spool.sources SET enabled = false,"
					   " stopped_reason = 'stopped by spool.stop_source' WHERE name = $1");
	PG_RETURN_VOID();
}

/* SQL: spool.drop_source(name).  Entries stay until retention removes them. */
Datum
spool_drop_source(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");

	spool_change_owned("spool.sources", "source", name,
					   "WITH d AS (DELETE FROM spool.sources WHERE name = $1 RETURNING name),"
					   " r AS (DELETE FROM spool.source_runtime WHERE source = $1),"
					   " p AS (DELETE FROM spool.partition_runtime WHERE source = $1)"
					   " SELECT * FROM d");
	spool_source_stats_forget(name);
	PG_RETURN_VOID();
}

/*
 * SQL: spool.alter_source(name, brokers, options).  NULL leaves brokers or
 * options as they are.  options are merged over the stored ones (a JSON
 * null resets an option to its default); "kafka" is merged property by
 * property (a JSON null removes one).  The result is checked as at create
 * time, for the caller: option table, librdkafka policy, librdkafka itself.
 * Offsets are untouched; config_version moves, so the launcher restarts a
 * running ingest worker, which resumes after what is durable or staged.
 */
Datum
spool_alter_source(PG_FUNCTION_ARGS)
{
	char	   *name = spool_arg_name(fcinfo, 0, "name");
	char	   *brokers = NULL;
	Jsonb	   *patch = NULL;
	SpoolSourceOptions *o;
	rd_kafka_conf_t *conf;
	HeapTuple	tup;
	TupleDesc	desc;
	Datum		v[3];
	char		nulls[3] = {' ', ' ', ' '};
	bool		isnull;
	char	  **topics;
	int			ntopics;
	bool		new_brokers;
	SpoolCaller caller;

	spool_require_pipeline_database("source");
	if (!PG_ARGISNULL(1))
	{
		brokers = spool_arg_name(fcinfo, 1, "brokers");
		check_brokers(brokers);
	}
	if (!PG_ARGISNULL(2))
	{
		patch = PG_GETARG_JSONB_P(2);
		if (!JB_ROOT_IS_OBJECT(patch) || JB_ROOT_IS_SCALAR(patch))
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("source options must be a JSON object"),
					 errhint("Pass the options to change, e.g. '{\"batch_size\": 500}'.")));
	}

	spool_enter(&caller);
	SPI_connect();
	v[0] = CStringGetTextDatum(name);
	v[1] = patch ? JsonbPGetDatum(patch) : (Datum) 0;
	nulls[1] = patch ? ' ' : 'n';
	if (SPI_execute_with_args("SELECT brokers, topics, owner,"
							  " jsonb_strip_nulls(options || coalesce($2, '{}') - 'kafka'"
							  "   || CASE WHEN jsonb_typeof($2->'kafka') = 'object'"
							  "           THEN jsonb_build_object('kafka',"
							  "                coalesce(options->'kafka', '{}') || ($2->'kafka'))"
							  "           WHEN $2 ? 'kafka' THEN jsonb_build_object('kafka', $2->'kafka')"
							  "           ELSE '{}' END)"
							  " FROM spool.sources WHERE name = $1 FOR UPDATE",
							  2, (Oid[]) {TEXTOID, JSONBOID}, v, nulls, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read spool.sources");
	tup = spool_owned_row("source", name, 3, caller.role);
	desc = SPI_tuptable->tupdesc;
	new_brokers = brokers != NULL && strcmp(brokers, SPI_getvalue(tup, desc, 1)) != 0;
	if (brokers == NULL)
		brokers = SPI_getvalue(tup, desc, 1);
	ntopics = check_topics(DatumGetArrayTypePCopy(SPI_getbinval(tup, desc, 2, &isnull)), &topics);
	o = spool_parse_source_options(DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 4, &isnull)));

	/* As create_source: the policy before librdkafka sees anything. */
	spool_kafka_policy_check(brokers, o->nkafka, (const char **) o->kafka_keys,
							 (const char **) o->kafka_values, caller.role,
							 "source", name);
	conf = source_conf(brokers, o, "spool_ext.check", "invalid Kafka property in source options");
	rd_kafka_conf_destroy(conf);

	v[1] = CStringGetTextDatum(brokers);
	v[2] = JsonbPGetDatum(spool_source_options_jsonb(o));
	nulls[1] = ' ';
	if (SPI_execute_with_args("UPDATE spool.sources SET brokers = $2, options = $3,"
							  " config_version = config_version + 1 WHERE name = $1",
							  3, (Oid[]) {TEXTOID, TEXTOID, JSONBOID}, v, nulls, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update source \"%s\"", name);
	SPI_finish();

	/* New brokers: do they know the topics?  (Unreachable: a WARNING only.) */
	if (new_brokers)
		probe_topics(brokers, o, topics, ntopics);
	spool_leave(&caller);
	spool_wake_launcher();
	PG_RETURN_VOID();
}
