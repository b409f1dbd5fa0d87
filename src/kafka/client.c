/*-------------------------------------------------------------------------
 *
 * kafka_util.c
 *	  Source options (parsing, validation, defaults) and the librdkafka
 *	  plumbing shared by create_source and the ingest worker: building a
 *	  configuration from options, and creating a handle with signals blocked
 *	  so librdkafka's threads never run PostgreSQL's signal handlers.
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

/* librdkafka properties spool_ext owns: exactly-once depends on them. */
static const char *const reserved_properties[] = {
	"bootstrap.servers", "metadata.broker.list", "group.id",
	"enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset",
	"enable.partition.eof", "isolation.level", NULL
};

static const char *const known_options[] = {
	"format", "start", "group_id", "batch_size", "batch_ms",
	"max_message_bytes", "on_gap", "kafka", NULL
};

static void
option_error(const char *key, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
			 errmsg("invalid value for source option \"%s\"", key),
			 errdetail("%s", detail)));
}

static char *
jbv_string(JsonbValue *v, const char *key)
{
	if (v->type != jbvString)
		option_error(key, "It must be a JSON string.");
	return pnstrdup(v->val.string.val, v->val.string.len);
}

static int
jbv_int(JsonbValue *v, const char *key, int lo, int hi)
{
	int64		n;
	char		detail[128];

	if (v->type != jbvNumeric)
		option_error(key, "It must be a JSON number.");
	n = DatumGetInt64(DirectFunctionCall1(numeric_int8,
										  NumericGetDatum(v->val.numeric)));
	if (n < lo || n > hi)
	{
		snprintf(detail, sizeof(detail), "It must be between %d and %d.", lo, hi);
		option_error(key, detail);
	}
	return (int) n;
}

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

static char *
jbv_property(JsonbValue *v, const char *key)
{
	char	   *val = spool_kafka_property_text(v);

	if (val == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("invalid value for Kafka property \"%s\"", key),
				 errdetail("Kafka properties take strings, numbers or booleans.")));
	return val;
}

/*
 * Parse and validate source options; unknown keys and bad values raise SP001.
 * The result has every default filled in.
 */
SpoolSourceOptions *
spool_parse_source_options(Jsonb *options)
{
	SpoolSourceOptions *o = palloc0(sizeof(SpoolSourceOptions));
	JsonbIterator *it;
	JsonbValue	v;
	char	   *key;
	int			nkafka = 0;

	o->format = SPOOL_FORMAT_JSON;
	o->start_latest = false;
	o->group_id = NULL;
	o->batch_size = 10000;
	o->batch_ms = 100;
	o->max_message_bytes = 1024 * 1024;
	o->on_gap_stop = true;
	o->kafka_keys = palloc(sizeof(char *) * 64);
	o->kafka_values = palloc(sizeof(char *) * 64);

	if (!JB_ROOT_IS_OBJECT(options))
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("source options must be a JSON object")));

	it = JsonbIteratorInit(&options->root);
	while (spool_object_next(&it, &key, &v))
	{
		if (!spool_str_in_list(key, known_options))
			ereport(ERROR,
					(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
					 errmsg("unknown source option \"%s\"", key),
					 errhint("Valid options are format, start, group_id, batch_size, batch_ms, max_message_bytes, on_gap and kafka.")));

		if (strcmp(key, "format") == 0)
		{
			char	   *f = jbv_string(&v, key);

			if (strcmp(f, "json") == 0)
				o->format = SPOOL_FORMAT_JSON;
			else if (strcmp(f, "text") == 0)
				o->format = SPOOL_FORMAT_TEXT;
			else if (strcmp(f, "bytes") == 0)
				o->format = SPOOL_FORMAT_BYTES;
			else
				option_error(key, "It must be \"json\", \"text\" or \"bytes\".");
		}
		else if (strcmp(key, "start") == 0)
		{
			char	   *s = jbv_string(&v, key);

			if (strcmp(s, "earliest") != 0 && strcmp(s, "latest") != 0)
				option_error(key, "It must be \"earliest\" or \"latest\".");
			o->start_latest = (strcmp(s, "latest") == 0);
		}
		else if (strcmp(key, "group_id") == 0)
		{
			o->group_id = jbv_string(&v, key);
			if (o->group_id[0] == '\0' || strlen(o->group_id) > SPOOL_NAME_MAX)
				option_error(key, "It must be a non-empty string of at most 200 bytes.");
		}
		else if (strcmp(key, "batch_size") == 0)
			o->batch_size = jbv_int(&v, key, 1, 1000000);
		else if (strcmp(key, "batch_ms") == 0)
			o->batch_ms = jbv_int(&v, key, 1, 60000);
		else if (strcmp(key, "max_message_bytes") == 0)
			o->max_message_bytes = jbv_int(&v, key, 1, 256 * 1024 * 1024);
		else if (strcmp(key, "on_gap") == 0)
		{
			char	   *g = jbv_string(&v, key);

			if (strcmp(g, "stop") != 0 && strcmp(g, "continue") != 0)
				option_error(key, "It must be \"stop\" or \"continue\".");
			o->on_gap_stop = (strcmp(g, "stop") == 0);
		}
		else if (strcmp(key, "kafka") == 0)
		{
			JsonbIterator *kit;
			JsonbValue	kv;
			char	   *prop;

			if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
				option_error(key, "It must be a JSON object of librdkafka properties.");
			kit = JsonbIteratorInit(v.val.binary.data);
			while (spool_object_next(&kit, &prop, &kv))
			{
				if (spool_str_in_list(prop, reserved_properties))
					ereport(ERROR,
							(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
							 errmsg("Kafka property \"%s\" is managed by spool_ext", prop),
							 errdetail("Offsets are stored in PostgreSQL; brokers and group_id are source arguments and options.")));
				if (nkafka >= 64)
					option_error(key, "At most 64 Kafka properties are allowed.");
				o->kafka_keys[nkafka] = prop;
				o->kafka_values[nkafka] = jbv_property(&kv, prop);
				nkafka++;
			}
		}
	}
	o->nkafka = nkafka;
	return o;
}

/* The options with defaults filled in, as stored in spool.sources. */
Jsonb *
spool_source_options_jsonb(SpoolSourceOptions *o)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"format\": \"%s\", \"start\": \"%s\", ",
					 o->format == SPOOL_FORMAT_JSON ? "json" :
					 o->format == SPOOL_FORMAT_TEXT ? "text" : "bytes",
					 o->start_latest ? "latest" : "earliest");
	if (o->group_id)
	{
		appendStringInfoString(&buf, "\"group_id\": ");
		escape_json(&buf, o->group_id);
		appendStringInfoString(&buf, ", ");
	}
	appendStringInfo(&buf, "\"batch_size\": %d, \"batch_ms\": %d, "
					 "\"max_message_bytes\": %d, \"on_gap\": \"%s\", \"kafka\": {",
					 o->batch_size, o->batch_ms, o->max_message_bytes,
					 o->on_gap_stop ? "stop" : "continue");
	for (i = 0; i < o->nkafka; i++)
	{
		if (i > 0)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, o->kafka_keys[i]);
		appendStringInfoString(&buf, ": ");
		escape_json(&buf, o->kafka_values[i]);
	}
	appendStringInfoString(&buf, "}}");
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
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
