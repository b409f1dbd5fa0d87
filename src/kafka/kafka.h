/*-------------------------------------------------------------------------
 *
 * kafka.h
 *	  The door to src/kafka: librdkafka configuration and clients
 *	  (client.c), and which properties and brokers a role may hand to
 *	  librdkafka (policy.c).  Used by the ingest workers and by kafka targets.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_KAFKA_H
#define SPOOL_KAFKA_H

#include "core/core.h"

#include <librdkafka/rdkafka.h>

typedef enum SpoolFormat
{
	SPOOL_FORMAT_JSON,
	SPOOL_FORMAT_TEXT,
	SPOOL_FORMAT_BYTES
} SpoolFormat;

/* A source's validated options, librdkafka properties included. */
typedef struct SpoolSourceOptions
{
	SpoolFormat format;
	bool		start_latest;
	char	   *group_id;		/* NULL: spool_ext.<database>.<source> */
	int			batch_size;
	int			batch_ms;
	int			max_message_bytes;
	bool		on_gap_stop;
	/* Which partitions this server consumes (docs/sources.md, "Sharing a topic"). */
	char	   *share;			/* "i/n": member i (1-based) of n; NULL: none */
	int			share_member;
	int			share_of;
	int			npartitions;	/* "partitions": only these; 0: every one */
	int		   *partitions;
	int			claim_timeout_ms;	/* how long another server's claim holds */
	int			workers;		/* ingest workers splitting its partitions */
	int			nkafka;
	char	  **kafka_keys;
	char	  **kafka_values;
} SpoolSourceOptions;

/* client.c */
extern SpoolSourceOptions *spool_parse_source_options(Jsonb *options);
extern char *spool_kafka_property_text(JsonbValue *v);
extern Jsonb *spool_source_options_jsonb(SpoolSourceOptions *o);
extern bool spool_source_takes_partition(const SpoolSourceOptions *o, int32 partition);
extern int	spool_source_worker_of(const SpoolSourceOptions *o, int32 partition);
extern rd_kafka_conf_t *spool_kafka_conf(const char *brokers, SpoolSourceOptions *o,
										 const char *default_group,
										 char *errbuf, size_t errlen);
extern rd_kafka_t *spool_kafka_new(rd_kafka_type_t type, rd_kafka_conf_t *conf,
								   char *errbuf, size_t errlen);

/* policy.c */
extern void spool_kafka_policy_check(const char *brokers, int nprops,
									 const char *const *keys,
									 const char *const *values, Oid role,
									 const char *kind, const char *name);
extern void spool_kafka_policy_check_jsonb(const char *brokers, Jsonb *kafka,
										   Oid role, const char *kind,
										   const char *name);

#endif							/* SPOOL_KAFKA_H */
