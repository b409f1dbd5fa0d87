/*-------------------------------------------------------------------------
 *
 * source.h
 *	  Kafka sources: options, librdkafka helpers, and the entry points of the
 *	  ingest worker and the promoter.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_SOURCE_H
#define SPOOL_SOURCE_H

#include <librdkafka/rdkafka.h>

#include "utils/jsonb.h"

#define SPOOL_SOURCE_NAME_MAX 48

typedef enum SpoolFormat
{
	SPOOL_FORMAT_JSON,
	SPOOL_FORMAT_TEXT,
	SPOOL_FORMAT_BYTES
} SpoolFormat;

typedef struct SpoolSourceOptions
{
	SpoolFormat format;
	bool		start_latest;
	char	   *group_id;		/* NULL: spool_ext.<database>.<source> */
	int			batch_size;
	int			batch_ms;
	int			max_message_bytes;
	bool		on_gap_stop;
	int			nkafka;
	char	  **kafka_keys;
	char	  **kafka_values;
} SpoolSourceOptions;

extern SpoolSourceOptions *spool_parse_source_options(Jsonb *options);
extern char *spool_kafka_property_text(JsonbValue *v);
extern Jsonb *spool_source_options_jsonb(SpoolSourceOptions *o);
extern rd_kafka_conf_t *spool_kafka_conf(const char *brokers, SpoolSourceOptions *o,
										 const char *default_group,
										 char *errbuf, size_t errlen);
extern rd_kafka_t *spool_kafka_new(rd_kafka_type_t type, rd_kafka_conf_t *conf,
								   char *errbuf, size_t errlen);

/* Workers */
extern void spool_wake_promoter(void);

#endif							/* SPOOL_SOURCE_H */
