/*-------------------------------------------------------------------------
 *
 * kafka_util.c
 *	  Source options (their option table and the "kafka" properties) and
 *	  the librdkafka plumbing shared by create_source and the ingest worker:
 *	  building a configuration from options, and creating a handle with
 *	  signals blocked so librdkafka's threads never run PostgreSQL's signal
 *	  handlers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>
#include <signal.h>

#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "kafka/kafka.h"

static void kafka_option(const SpoolOptionTable *table, const SpoolOption *opt,
						 JsonbValue *v, void *result);
static bool kafka_render(const SpoolOption *opt, const void *result, StringInfo buf);
static void share_option(const SpoolOptionTable *table, const SpoolOption *opt,
						 JsonbValue *v, void *result);
static void partitions_option(const SpoolOptionTable *table, const SpoolOption *opt,
							  JsonbValue *v, void *result);
static bool partitions_render(const SpoolOption *opt, const void *result, StringInfo buf);
static bool claim_timeout_render(const SpoolOption *opt, const void *result, StringInfo buf);
static bool workers_render(const SpoolOption *opt, const void *result, StringInfo buf);

/* librdkafka properties spool_ext owns: exactly-once depends on them. */
static const char *const reserved_properties[] = {
	"bootstrap.servers", "metadata.broker.list", "group.id",
	"enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset",
	"enable.partition.eof", "isolation.level", NULL
};

#define MAX_KAFKA_PROPERTIES 64
#define MAX_SHARE_OF		1024	/* servers sharing a topic */
#define MAX_PARTITION		1000000 /* a partition number, as Kafka allows */
#define MAX_PARTITIONS		1024	/* listed in "partitions" */
#define MAX_WORKERS			8	/* ingest workers of one source */

/* In the order of SpoolFormat. */
static const char *const format_names[] = {"json", "text", "bytes", NULL};
static const char *const start_names[] = {"earliest", "latest", NULL};
static const char *const on_gap_names[] = {"continue", "stop", NULL};

#define SRC(member)	SPOOL_OPT_MEMBER(SpoolSourceOptions, member)

static const SpoolOption source_option_specs[] = {
	{.name = "format", .type = SPOOL_OPT_CHOICE, SRC(format), .dflt = SPOOL_FORMAT_JSON,
		.choices = format_names},
	{.name = "start", .type = SPOOL_OPT_CHOICE, SRC(start_latest), .choices = start_names},
	{.name = "group_id", .type = SPOOL_OPT_STRING, SRC(group_id), .hi = SPOOL_NAME_MAX},
	{.name = "batch_size", .type = SPOOL_OPT_INT, SRC(batch_size), .dflt = 10000,
		.lo = 1, .hi = 1000000},
	{.name = "batch_ms", .type = SPOOL_OPT_DURATION, SRC(batch_ms), .dflt = 100,
		.lo = 1, .hi = 60000, .unit = 1000},
	{.name = "max_message_bytes", .type = SPOOL_OPT_INT, SRC(max_message_bytes),
		.dflt = 1024 * 1024, .lo = 1, .hi = 256 * 1024 * 1024},
	{.name = "on_gap", .type = SPOOL_OPT_CHOICE, SRC(on_gap_stop), .dflt = true,
		.choices = on_gap_names},
	{.name = "share", .type = SPOOL_OPT_STRING, SRC(share), .hi = 16,
		.parse = share_option,
		.doc = "\"i/n\": this server consumes the partitions p with p % n = i - 1."},
	{.name = "partitions", .type = SPOOL_OPT_CUSTOM, .parse = partitions_option,
		.render = partitions_render,
		.doc = "A list of partition numbers: this server consumes only those."},
	{.name = "claim_timeout", .type = SPOOL_OPT_DURATION, SRC(claim_timeout_ms),
		.dflt = 30000, .lo = 1000, .hi = 3600000, .unit = 1000,
		.render = claim_timeout_render},
	{.name = "workers", .type = SPOOL_OPT_INT, SRC(workers), .dflt = 1,
		.lo = 1, .hi = MAX_WORKERS, .render = workers_render,
		.doc = "Ingest workers splitting the source's partitions between them."},
	{.name = "kafka", .type = SPOOL_OPT_CUSTOM, .what = "librdkafka properties",
		.parse = kafka_option, .render = kafka_render},
};

static const SpoolOptionTable source_options = {
	SPOOL_OPT_TABLE(source_option_specs, SpoolSourceOptions),
	.prefix = "", .noun = "source option", .subject = NULL, .listing = "Options are",
	.not_object = "source options must be a JSON object",
};

/*
 * A JSON scalar as the text librdkafka expects ("true", "5000", "PLAIN"), or
 * NULL if it is no string, number or boolean.
 */
char *
spool_kafka_property_text(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out,
													   NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		default:
			return NULL;
	}
}

/* "kafka": librdkafka properties, as texts, except those spool_ext owns. */
static void
kafka_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			 void *result)
{
	SpoolSourceOptions *o = result;
	JsonbIterator *it = JsonbIteratorInit(spool_option_object(table, opt, v));
	JsonbValue	pv;
	char	   *prop;

	o->nkafka = 0;
	o->kafka_keys = palloc(sizeof(char *) * MAX_KAFKA_PROPERTIES);
	o->kafka_values = palloc(sizeof(char *) * MAX_KAFKA_PROPERTIES);
	while (spool_object_next(&it, &prop, &pv))
	{
		if (spool_str_in_list(prop, reserved_properties))
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("Kafka property \"%s\" is managed by spool_ext", prop),
					 errdetail("Offsets are stored in PostgreSQL; brokers and group_id are source arguments and options.")));
		if (o->nkafka >= MAX_KAFKA_PROPERTIES)
			spool_option_bad(table, opt, NULL,
							 psprintf("must have at most %d properties", MAX_KAFKA_PROPERTIES));
		o->kafka_keys[o->nkafka] = prop;
		o->kafka_values[o->nkafka] = spool_kafka_property_text(&pv);
		if (o->kafka_values[o->nkafka] == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("invalid value for Kafka property \"%s\"", prop),
					 errdetail("Kafka properties take strings, numbers or booleans.")));
		o->nkafka++;
	}
}

static bool
kafka_render(const SpoolOption *opt, const void *result, StringInfo buf)
{
	const SpoolSourceOptions *o = result;
	int			i;

	appendStringInfoChar(buf, '{');
	for (i = 0; i < o->nkafka; i++)
	{
		if (i > 0)
			appendStringInfoString(buf, ", ");
		escape_json(buf, o->kafka_keys[i]);
		appendStringInfoString(buf, ": ");
		escape_json(buf, o->kafka_values[i]);
	}
	appendStringInfoChar(buf, '}');
	return true;
}

/* "share": "i/n" with 1 <= i <= n. */
static void
share_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
			 void *result)
{
	SpoolSourceOptions *o = result;
	int			i,
				n,
				used = 0;

	spool_option_value(table, opt, v, result);
	if (sscanf(o->share, "%d/%d%n", &i, &n, &used) != 2 || o->share[used] != '\0' ||
		n < 1 || n > MAX_SHARE_OF || i < 1 || i > n)
		spool_option_bad(table, opt, NULL,
						 psprintf("must be \"i/n\" with 1 <= i <= n <= %d", MAX_SHARE_OF));
	o->share_member = i;
	o->share_of = n;
}

/* "partitions": a non-empty array of distinct partition numbers. */
static void
partitions_option(const SpoolOptionTable *table, const SpoolOption *opt, JsonbValue *v,
				  void *result)
{
	SpoolSourceOptions *o = result;
	const char *requirement = psprintf("must be a non-empty array of at most %d distinct partition numbers (0 .. %d)",
									   MAX_PARTITIONS, MAX_PARTITION);
	JsonbIterator *it;
	JsonbValue	ev;
	JsonbIteratorToken tok;

	if (v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data) ||
		JsonContainerSize(v->val.binary.data) < 1 ||
		JsonContainerSize(v->val.binary.data) > MAX_PARTITIONS)
		spool_option_bad(table, opt, NULL, requirement);
	o->partitions = palloc(sizeof(int) * JsonContainerSize(v->val.binary.data));
	o->npartitions = 0;
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &ev, true)) != WJB_DONE)
	{
		int			p,
					k;

		if (tok != WJB_ELEM)
			continue;
		p = (int) spool_option_integer(table, opt, &ev, 0, MAX_PARTITION);
		for (k = 0; k < o->npartitions; k++)
			if (o->partitions[k] == p)
				spool_option_bad(table, opt, NULL, requirement);
		o->partitions[o->npartitions++] = p;
	}
}

static bool
partitions_render(const SpoolOption *opt, const void *result, StringInfo buf)
{
	const SpoolSourceOptions *o = result;
	int			i;

	if (o->npartitions == 0)
		return false;
	appendStringInfoChar(buf, '[');
	for (i = 0; i < o->npartitions; i++)
		appendStringInfo(buf, i > 0 ? ", %d" : "%d", o->partitions[i]);
	appendStringInfoChar(buf, ']');
	return true;
}

/* claim_timeout matters only to a source that shares its topics. */
static bool
claim_timeout_render(const SpoolOption *opt, const void *result, StringInfo buf)
{
	const SpoolSourceOptions *o = result;

	if (o->share == NULL && o->npartitions == 0)
		return false;
	appendStringInfo(buf, "%d", o->claim_timeout_ms);
	return true;
}

/* workers is shown once it is more than the one worker every source has. */
static bool
workers_render(const SpoolOption *opt, const void *result, StringInfo buf)
{
	const SpoolSourceOptions *o = result;

	if (o->workers <= 1)
		return false;
	appendStringInfo(buf, "%d", o->workers);
	return true;
}

/* Whether this server consumes partition (of every topic of the source). */
bool
spool_source_takes_partition(const SpoolSourceOptions *o, int32 partition)
{
	int			i;

	if (o->share_of > 0)
		return partition % o->share_of == o->share_member - 1;
	if (o->npartitions == 0)
		return true;
	for (i = 0; i < o->npartitions; i++)
		if (o->partitions[i] == partition)
			return true;
	return false;
}

/*
 * Which of the source's workers (0 .. workers - 1) consumes partition: the
 * partitions of this server's part are dealt out in turn (by rank in the
 * share or the list), so each worker gets as many as the others, give or
 * take one.  A partition outside this server's part belongs to a worker
 * too: that one hands it on (consumer_claims.c).
 */
int
spool_source_worker_of(const SpoolSourceOptions *o, int32 partition)
{
	int			i;

	if (o->workers <= 1)
		return 0;
	if (o->share_of > 0)
		return (partition / o->share_of) % o->workers;
	for (i = 0; i < o->npartitions; i++)
		if (o->partitions[i] == partition)
			return i % o->workers;
	return partition % o->workers;
}

/*
 * Parse and validate source options; unknown keys and bad values raise SP001.
 * The result has every default filled in.
 */
SpoolSourceOptions *
spool_parse_source_options(Jsonb *options)
{
	SpoolSourceOptions *o = spool_parse_options(&source_options, -1, options);

	if (o->share != NULL && o->npartitions > 0)
		spool_option_error(&source_options,
						   "source options \"share\" and \"partitions\" exclude each other", NULL);
	return o;
}

/* The options with defaults filled in, as stored in spool.sources. */
Jsonb *
spool_source_options_jsonb(SpoolSourceOptions *o)
{
	return spool_options_jsonb(&source_options, -1, o);
}

/*
 * Build a librdkafka configuration for a source.  Returns NULL and fills
 * errbuf when a property is rejected.  The caller owns the result.
 */
rd_kafka_conf_t *
spool_kafka_conf(const char *brokers, SpoolSourceOptions *o,
				 const char *default_group, char *errbuf, size_t errlen)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	int			i;

#define SETPROP(k, v) \
	do { \
		if (rd_kafka_conf_set(conf, (k), (v), errbuf, errlen) != RD_KAFKA_CONF_OK) \
		{ \
			rd_kafka_conf_destroy(conf); \
			return NULL; \
		} \
	} while (0)

	SETPROP("bootstrap.servers", brokers);
	SETPROP("group.id", o->group_id ? o->group_id : default_group);
	SETPROP("enable.auto.commit", "false");
	SETPROP("enable.auto.offset.store", "false");
	SETPROP("auto.offset.reset", "error");	/* a retention hole must be seen */
	SETPROP("enable.partition.eof", "false");
	SETPROP("isolation.level", "read_committed");
	SETPROP("client.id", "spool_ext");
	SETPROP("queued.max.messages.kbytes", "65536");

	/*
	 * librdkafka counts queued.min.messages per consumer queue, not per
	 * partition: its default (100000) is less than a second of a fast source,
	 * and librdkafka 2.0 looks at a full queue again only once a second, so
	 * the worker waited for messages.  With 500000 the 64 MB of payload
	 * above is the bound for messages of more than about 130 bytes; the
	 * count still bounds librdkafka's overhead per message for small ones.
	 */
	SETPROP("queued.min.messages", "500000");
	for (i = 0; i < o->nkafka; i++)
		SETPROP(o->kafka_keys[i], o->kafka_values[i]);
#undef SETPROP
	return conf;
}

/*
 * rd_kafka_new with every signal blocked in this thread, so that the threads
 * librdkafka starts inherit a fully blocked mask and PostgreSQL's handlers
 * only ever run on the backend's own thread.  Takes ownership of conf.
 */
rd_kafka_t *
spool_kafka_new(rd_kafka_type_t type, rd_kafka_conf_t *conf,
				char *errbuf, size_t errlen)
{
	sigset_t	all;
	sigset_t	old;
	rd_kafka_t *rk;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rk = rd_kafka_new(type, conf, errbuf, errlen);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rk == NULL)
		rd_kafka_conf_destroy(conf);
	return rk;
}
