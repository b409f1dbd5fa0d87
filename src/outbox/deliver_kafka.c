/*-------------------------------------------------------------------------
 *
 * deliver_kafka.c
 *	  Delivering outbox rows to a kafka target, outside the worker's
 *	  transaction: a batch is produced with the idempotent producer, and the
 *	  worker waits, on its latch, until the broker has acknowledged every
 *	  message; the caller marks the batch only after that.  librdkafka's
 *	  delivery reports are served by rd_kafka_poll on this thread and only
 *	  write into a fixed array.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "kafka/kafka.h"
#include "outbox/outbox.h"

#define KAFKA_DEFAULT_MESSAGE_TIMEOUT "30000"
#define KAFKA_MAX_INFLIGHT 10000

static OutboxTarget *target;
static rd_kafka_t *rk = NULL;
static uint32 kafka_generation = 0;

/* Delivery reports of the current Kafka batch: error code per row. */
static rd_kafka_resp_err_t dr_err[KAFKA_MAX_INFLIGHT];
static int	dr_done;

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque);
static bool permanent_error(rd_kafka_resp_err_t err);
static rd_kafka_resp_err_t produce_row(OutboxRow *r, int i, TimestampTz deadline,
									   int *expected);
static bool await_reports(int expected, TimestampTz deadline);
static bool nap(TimestampTz deadline);
static rd_kafka_resp_err_t collect_reports(OutboxRow **rows, int n);

/* The idempotent producer of target t. */
void
spool_kafka_start(OutboxTarget *t)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		err[512];

	target = t;

#define SETPROP(key, val) \
	do { \
		if (rd_kafka_conf_set(conf, (key), (val), err, sizeof(err)) != RD_KAFKA_CONF_OK) \
		{ \
			rd_kafka_conf_destroy(conf); \
			ereport(ERROR, (errcode(ERRCODE_SPOOL_INVALID_ARGUMENT), \
							errmsg("target \"%s\": kafka property \"%s\": %s", \
								   target->name, (key), err))); \
		} \
	} while (0)

	SETPROP("bootstrap.servers", target->brokers);
	SETPROP("client.id", "spool_ext");
	SETPROP("message.timeout.ms", KAFKA_DEFAULT_MESSAGE_TIMEOUT);
	SETPROP("linger.ms", "1");
	spool_outbox_kafka_props(conf, target->kafka);
	/* Set last: the guarantees rely on it. */
	SETPROP("enable.idempotence", "true");
#undef SETPROP
	rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
	rk = spool_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
	if (rk == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
				 errmsg("target \"%s\": could not create a Kafka producer: %s", target->name, err)));
}

/* On librdkafka's poll, on our thread: no PostgreSQL calls here. */
static void
dr_msg_cb(rd_kafka_t *k, const rd_kafka_message_t *msg, void *opaque)
{
	uintptr_t	tag = (uintptr_t) msg->_private;
	uint32		gen = (uint32) (tag >> 20);
	int			idx = (int) (tag & 0xFFFFF) - 1;

	if (gen != (kafka_generation & 0xFFF) || idx < 0 || idx >= KAFKA_MAX_INFLIGHT)
		return;
	dr_err[idx] = msg->err;
	dr_done++;
}

/* A message the broker will never take, whatever we do: park the row. */
static bool
permanent_error(rd_kafka_resp_err_t err)
{
	return err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE ||
		err == RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE ||
		err == RD_KAFKA_RESP_ERR_INVALID_RECORD ||
		err == RD_KAFKA_RESP_ERR_INVALID_MSG ||
		err == RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE;
}

/*
 * Produce rows[0..n) and wait up to wait_ms for every acknowledgement.
 * Returns true when each row was either acknowledged or refused for good
 * (row->failed, row->error set); false, with *target_error, when the
 * target as a whole failed (unreachable, timed out): then nothing may be
 * marked, and the batch is tried again later.
 */
bool
spool_kafka_deliver(OutboxRow **rows, int n, int64 wait_ms, char **target_error)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
	int			expected = 0;
	int			i;
	rd_kafka_resp_err_t transient = RD_KAFKA_RESP_ERR_NO_ERROR;
	char		fatal[512];

	Assert(n <= KAFKA_MAX_INFLIGHT);
	if (rk == NULL)
		spool_kafka_start(target);
	kafka_generation++;
	dr_done = 0;
	for (i = 0; i < n && transient == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
		transient = produce_row(rows[i], i, deadline, &expected);
	/* Even after an error, the reports of what was produced are awaited. */
	if (!await_reports(expected, deadline))
		transient = RD_KAFKA_RESP_ERR__TIMED_OUT;
	if (rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("fatal producer error: %s", fatal);
		spool_kafka_stop();
		return false;
	}
	if (transient == RD_KAFKA_RESP_ERR_NO_ERROR)
		transient = collect_reports(rows, n);
	if (transient != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("kafka delivery to topic \"%s\" failed: %s",
								 target->topic, rd_kafka_err2str(transient));
		return false;
	}
	return true;
}

/*
 * Produce row (number i of the batch), waiting while librdkafka's local
 * queue is full.  A row the broker will never take is marked failed; a
 * transient error is returned and ends the batch.  *expected counts the
 * messages whose delivery report is to come.
 */
static rd_kafka_resp_err_t
produce_row(OutboxRow *r, int i, TimestampTz deadline, int *expected)
{
	rd_kafka_headers_t *h = rd_kafka_headers_new(2);
	char		idbuf[32];
	char	   *value = r->barrier ? "{\"barrier\": true}" :
		JsonbToCString(NULL, &r->payload->root, VARSIZE(r->payload));
	rd_kafka_resp_err_t err;

	dr_err[i] = RD_KAFKA_RESP_ERR_NO_ERROR;
	snprintf(idbuf, sizeof(idbuf), INT64_FORMAT, r->id);
	rd_kafka_header_add(h, "spool-outbox-id", -1, idbuf, -1);
	if (r->barrier)
		rd_kafka_header_add(h, "spool-barrier", -1, "true", -1);
	for (;;)
	{
		err = rd_kafka_producev(rk,
								RD_KAFKA_V_TOPIC(target->topic),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_KEY(r->key, r->key ? strlen(r->key) : 0),
								RD_KAFKA_V_VALUE(value, strlen(value)),
								RD_KAFKA_V_HEADERS(h),
								RD_KAFKA_V_OPAQUE((void *) (((uintptr_t) (kafka_generation & 0xFFF) << 20) |
															(uintptr_t) (i + 1))),
								RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL || !nap(deadline))
			break;
	}
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		(*expected)++;
		return err;
	}
	rd_kafka_headers_destroy(h);
	if (!permanent_error(err))
		return err;
	r->failed = true;
	r->error = pstrdup(rd_kafka_err2str(err));
	dr_err[i] = err;
	return RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* Serve delivery reports until expected have come; false at the deadline. */
static bool
await_reports(int expected, TimestampTz deadline)
{
	for (;;)
	{
		rd_kafka_poll(rk, 0);
		if (dr_done >= expected)
			return true;
		if (!nap(deadline))
			return false;
	}
}

/*
 * 1 ms on the latch (interrupts served), then librdkafka's callbacks;
 * false, without waiting, once deadline has passed.
 */
static bool
nap(TimestampTz deadline)
{
	if (GetCurrentTimestamp() >= deadline)
		return false;
	CHECK_FOR_INTERRUPTS();
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1,
					 PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	rd_kafka_poll(rk, 0);
	return true;
}

/*
 * After every report came: rows refused for good are marked failed; the
 * first other error is returned (the batch is tried again).
 */
static rd_kafka_resp_err_t
collect_reports(OutboxRow **rows, int n)
{
	rd_kafka_resp_err_t transient = RD_KAFKA_RESP_ERR_NO_ERROR;
	int			i;

	for (i = 0; i < n; i++)
	{
		if (dr_err[i] == RD_KAFKA_RESP_ERR_NO_ERROR || rows[i]->failed)
			continue;
		if (permanent_error(dr_err[i]))
		{
			rows[i]->failed = true;
			rows[i]->error = pstrdup(rd_kafka_err2str(dr_err[i]));
		}
		else if (transient == RD_KAFKA_RESP_ERR_NO_ERROR)
			transient = dr_err[i];
	}
	return transient;
}

/* Drop the producer (at exit, or after a fatal error): nothing is waited for. */
void
spool_kafka_stop(void)
{
	if (rk == NULL)
		return;
	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_poll(rk, 0);
	kafka_generation++;
	rd_kafka_destroy(rk);
	rk = NULL;
}
