/*-------------------------------------------------------------------------
 *
 * kafka_policy.h
 *	  Which librdkafka properties and brokers a role may hand to librdkafka
 *	  (kafka_policy.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SPOOL_KAFKA_POLICY_H
#define SPOOL_KAFKA_POLICY_H

#include "postgres.h"

#include "utils/jsonb.h"

extern char *spool_kafka_allowed_brokers;

extern void spool_kafka_policy_check(const char *brokers, int nprops,
									 const char *const *keys,
									 const char *const *values, Oid role,
									 const char *kind, const char *name);
extern void spool_kafka_policy_check_jsonb(const char *brokers, Jsonb *kafka,
										   Oid role, const char *kind,
										   const char *name);

#endif							/* SPOOL_KAFKA_POLICY_H */
