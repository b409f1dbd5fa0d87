/*-------------------------------------------------------------------------
 *
 * kafka_policy.c
 *	  What a role may hand to librdkafka.  Some librdkafka properties act on
 *	  the server itself, as its OS user, inside the backend that sets them:
 *	  sasl.kerberos.kinit.cmd runs a shell command (and GSSAPI runs a default
 *	  one with the principal in it), plugin.library.paths, ssl.engine.location
 *	  and ssl.providers load libraries, the *.location properties read server
 *	  files, offset.store.path writes them, OAuth/OIDC endpoints and the
 *	  test.mock.* cluster open network connections.  Only superusers may set
 *	  such properties.  Everyone else gets an allow-list: tuning, and TLS/SASL
 *	  settings that carry their material inline (PEM strings, passwords) and
 *	  name no file, command, plugin or endpoint.
 *
 *	  The brokers themselves are addresses the server connects to: a
 *	  non-superuser may only name brokers listed by a superuser in
 *	  spool.kafka_allowed_brokers.
 *
 *	  Sources and kafka targets are checked at create and alter time (before
 *	  any property reaches librdkafka) and again, against their owner, each
 *	  time a worker starts: an owner demoted since then loses what it may no
 *	  longer set.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/varlena.h"

#include "kafka/kafka.h"

/* Properties any role may set (the rest need a superuser). */
static const char *const allowed_properties[] = {
	/* identification and metadata */
	"client.id", "client.rack", "allow.auto.create.topics",
	"topic.metadata.refresh.interval.ms", "metadata.max.age.ms",
	"topic.metadata.refresh.fast.interval.ms", "topic.metadata.refresh.fast.cnt",
	"topic.metadata.refresh.sparse", "topic.metadata.propagation.max.ms",
	"api.version.request", "api.version.request.timeout.ms",
	"api.version.fallback.ms", "broker.version.fallback",
	/* sizes and connections */
	"message.max.bytes", "message.copy.max.bytes", "receive.message.max.bytes",
	"max.in.flight.requests.per.connection", "max.in.flight",
	"socket.timeout.ms", "socket.send.buffer.bytes", "socket.receive.buffer.bytes",
	"socket.keepalive.enable", "socket.nagle.disable", "socket.max.fails",
	"socket.connection.setup.timeout.ms", "connections.max.idle.ms",
	"broker.address.ttl", "broker.address.family",
	"reconnect.backoff.jitter.ms", "reconnect.backoff.ms", "reconnect.backoff.max.ms",
	"log.connection.close",
	/* TLS and SASL with inline material */
	"security.protocol", "ssl.cipher.suites", "ssl.curves.list", "ssl.sigalgs.list",
	"ssl.key.pem", "ssl.key.password", "ssl.certificate.pem", "ssl.ca.pem",
	"enable.ssl.certificate.verification", "ssl.endpoint.identification.algorithm",
	"sasl.mechanisms", "sasl.mechanism", "sasl.username", "sasl.password",
	"sasl.oauthbearer.config", "enable.sasl.oauthbearer.unsecure.jwt",
	/* consumer tuning */
	"queued.min.messages", "queued.max.messages.kbytes", "fetch.wait.max.ms",
	"fetch.message.max.bytes", "max.partition.fetch.bytes", "fetch.max.bytes",
	"fetch.min.bytes", "fetch.error.backoff.ms", "check.crcs",
	/* producer tuning */
	"queue.buffering.max.messages", "queue.buffering.max.kbytes",
	"queue.buffering.max.ms", "linger.ms", "message.send.max.retries", "retries",
	"retry.backoff.ms", "queue.buffering.backpressure.threshold",
	"compression.codec", "compression.type", "compression.level",
	"batch.num.messages", "batch.size", "sticky.partitioning.linger.ms",
	"request.required.acks", "acks", "request.timeout.ms", "message.timeout.ms",
	"delivery.timeout.ms", "partitioner", "enable.gapless.guarantee",
	"enable.idempotence",
	NULL
};

/* SASL mechanisms that run nothing and call no endpoint (not GSSAPI). */
static const char *const allowed_mechanisms[] = {
	"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", NULL
};

/* Is one host:port of a broker list in spool.kafka_allowed_brokers? */
static bool
broker_allowed(const char *broker)
{
	char	   *copy;
	List	   *entries;
	ListCell   *lc;
	const char *colon = strrchr(broker, ':');
	size_t		hostlen = colon ? (size_t) (colon - broker) : strlen(broker);
	const char *port = colon ? colon + 1 : "";

	if (spool_kafka_allowed_brokers == NULL || spool_kafka_allowed_brokers[0] == '\0')
		return false;
	copy = pstrdup(spool_kafka_allowed_brokers);
	if (!SplitIdentifierString(copy, ',', &entries))
		return false;			/* the setting's check hook refuses this */
	foreach(lc, entries)
	{
		const char *e = lfirst(lc);
		const char *ecolon = strrchr(e, ':');

		if (strcmp(e, "*") == 0)
			return true;
		if (ecolon == NULL)
			continue;
		if ((size_t) (ecolon - e) == hostlen && pg_strncasecmp(e, broker, hostlen) == 0 &&
			(strcmp(ecolon + 1, "*") == 0 || strcmp(ecolon + 1, port) == 0))
			return true;
	}
	return false;
}

/*
 * Raise 42501 unless role may use brokers and every property keys[i] =
 * values[i]; kind and name say which source or target they belong to.
 * Superusers may use anything.
 */
void
spool_kafka_policy_check(const char *brokers, int nprops,
						 const char *const *keys, const char *const *values,
						 Oid role, const char *kind, const char *name)
{
	const char *hint_props = "Only superusers may set Kafka properties that name files, commands, plugins or endpoints; use the inline forms (ssl.key.pem, ssl.certificate.pem, ssl.ca.pem) or ask a superuser to create it.";
	char	   *copy;
	char	   *save = NULL;
	char	   *item;
	int			i;

	if (superuser_arg(role))
		return;
	for (i = 0; i < nprops; i++)
	{
		if (!spool_str_in_list(keys[i], allowed_properties))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("%s \"%s\": only superusers may set Kafka property \"%s\"",
							kind, name, keys[i]),
					 errhint("%s", hint_props)));
		if ((strcmp(keys[i], "sasl.mechanisms") == 0 || strcmp(keys[i], "sasl.mechanism") == 0) &&
			!spool_str_in_list(values[i], allowed_mechanisms))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("%s \"%s\": only superusers may use SASL mechanism \"%s\"",
							kind, name, values[i]),
					 errdetail("Others may use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 and OAUTHBEARER with inline settings."),
					 errhint("%s", hint_props)));
	}
	copy = pstrdup(brokers);
	for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save))
	{
		while (*item == ' ')
			item++;
		if (!broker_allowed(item))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("%s \"%s\": broker \"%s\" is not in spool.kafka_allowed_brokers",
							kind, name, item),
					 errhint("A superuser lists the brokers other roles may connect the server to in spool.kafka_allowed_brokers (postgresql.conf), e.g. 'kafka1:9092, kafka2:*'.")));
	}
}

/* As spool_kafka_policy_check, for properties kept as a JSON object. */
void
spool_kafka_policy_check_jsonb(const char *brokers, Jsonb *kafka, Oid role,
							   const char *kind, const char *name)
{
	int			n = kafka ? JsonContainerSize(&kafka->root) : 0;
	const char **keys = palloc(sizeof(char *) * Max(n, 1));
	const char **values = palloc(sizeof(char *) * Max(n, 1));
	int			i = 0;

	if (kafka)
	{
		JsonbIterator *it = JsonbIteratorInit(&kafka->root);
		JsonbValue	v;
		char	   *key;

		while (i < n && spool_object_next(&it, &key, &v))
		{
			char	   *val = spool_kafka_property_text(&v);

			keys[i] = key;
			values[i++] = val ? val : "";
		}
	}
	spool_kafka_policy_check(brokers, i, keys, values, role, kind, name);
}
