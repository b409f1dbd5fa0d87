/*-------------------------------------------------------------------------
 *
 * outbox_deliver.c
 *	  Delivering outbox rows to one target, for a dispatcher shard worker.
 *
 *	  sql and notify deliver inside the worker's transaction (the caller
 *	  commits the delivery together with the shard's position).  kafka
 *	  produces a batch with the idempotent producer and waits, on the latch,
 *	  until the broker has acknowledged every message; the caller marks the
 *	  batch only after that.  librdkafka's delivery reports are served by
 *	  rd_kafka_poll on this thread and only write into a fixed array.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "commands/async.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "kafka/kafka.h"
#include "outbox/outbox.h"

#define KAFKA_DEFAULT_MESSAGE_TIMEOUT "30000"
#define KAFKA_MAX_INFLIGHT 10000

static OutboxTarget *target;
static FmgrInfo fn_info;
static Oid	run_as_oid = InvalidOid;
static rd_kafka_t *rk = NULL;
static uint32 kafka_generation = 0;

/* Delivery reports of the current Kafka batch: error code per row. */
static rd_kafka_resp_err_t dr_err[KAFKA_MAX_INFLIGHT];
static int	dr_done;

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque);
static void kafka_start(void);
static char *notify_text(OutboxRow *row);

void
spool_deliver_init(OutboxTarget *t)
{
	target = t;
	switch (t->kind)
	{
		case KIND_SQL:
			{
				Oid			fn = spool_outbox_resolve_function(t->function, true);

				if (!OidIsValid(fn))
					ereport(ERROR,
							(errcode(ERRCODE_UNDEFINED_FUNCTION),
							 errmsg("function %s(jsonb, text, bigint) of target \"%s\" does not exist",
									t->function, t->name)));
				run_as_oid = get_role_oid(t->run_as, false);
				/* The owner must still be allowed to run code as run_as. */
				if (!spool_role_is_member(t->owner, run_as_oid))
					ereport(ERROR,
							(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
							 errmsg("the owner of target \"%s\" is no longer a member of role \"%s\"",
									t->name, t->run_as),
							 errhint("Grant the role back to the owner, or alter the target's run_as.")));
				if (pg_proc_aclcheck(fn, run_as_oid, ACL_EXECUTE) != ACLCHECK_OK)
					ereport(ERROR,
							(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
							 errmsg("role \"%s\" may not execute the function of target \"%s\"",
									t->run_as, t->name)));
				fmgr_info_cxt(fn, &fn_info, TopMemoryContext);
				break;
			}
		case KIND_NOTIFY:
			break;
		case KIND_KAFKA:
			/* What the owner may hand to librdkafka today (it may have been demoted). */
			spool_kafka_policy_check_jsonb(t->brokers, t->kafka, t->owner, "target", t->name);
			kafka_start();
			break;
	}
}

bool
spool_deliver_external(void)
{
	return target->kind == KIND_KAFKA;
}

/*
 * Open the box (usercode.c) in which a sql target's function is called for
 * the rows of one attempt; other kinds run no user code.
 */
void
spool_deliver_box_open(SpoolBox *box)
{
	if (target->kind == KIND_SQL)
		spool_box_open(box, run_as_oid, false);
}

/*
 * Deliver one row of a sql or notify target in the current transaction;
 * raises the target's error.  A sql target's function is called inside the
 * box the caller opened with spool_deliver_box_open.
 */
void
spool_deliver_row(OutboxRow *row)
{
	if (target->kind == KIND_SQL)
	{
		LOCAL_FCINFO(fcinfo, 3);

		InitFunctionCallInfoData(*fcinfo, &fn_info, 3, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = JsonbPGetDatum(row->payload);
		fcinfo->args[0].isnull = false;
		fcinfo->args[1].value = row->key ? CStringGetTextDatum(row->key) : (Datum) 0;
		fcinfo->args[1].isnull = row->key == NULL;
		fcinfo->args[2].value = Int64GetDatum(row->id);
		fcinfo->args[2].isnull = false;
		(void) FunctionCallInvoke(fcinfo);
	}
	else if (target->kind == KIND_NOTIFY)
		Async_Notify(target->channel, notify_text(row));
	else
		elog(ERROR, "kafka rows are delivered in batches");
}

/* {"id": N, "key": K, "payload": P}, or {"id": N, "barrier": true}. */
static char *
notify_text(OutboxRow *row)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"id\": " INT64_FORMAT, row->id);
	if (row->barrier)
		appendStringInfoString(&buf, ", \"barrier\": true}");
	else
	{
		appendStringInfoString(&buf, ", \"key\": ");
		if (row->key)
			escape_json(&buf, row->key);
		else
			appendStringInfoString(&buf, "null");
		appendStringInfoString(&buf, ", \"payload\": ");
		(void) JsonbToCString(&buf, &row->payload->root, VARSIZE(row->payload));
		appendStringInfoChar(&buf, '}');
	}
	return buf.data;
}

static void
kafka_start(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		err[512];

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
		kafka_start();
	kafka_generation++;
	dr_done = 0;
	for (i = 0; i < n; i++)
	{
		OutboxRow  *r = rows[i];
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
			if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
				break;
			/* The local queue is full: let it drain. */
			CHECK_FOR_INTERRUPTS();
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1,
							 PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			rd_kafka_poll(rk, 0);
			if (GetCurrentTimestamp() >= deadline)
				break;
		}
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			rd_kafka_headers_destroy(h);
			if (permanent_error(err))
			{
				r->failed = true;
				r->error = pstrdup(rd_kafka_err2str(err));
				dr_err[i] = err;
				continue;
			}
			transient = err;
			break;
		}
		expected++;
	}

	/* Wait for the report of every message produced. */
	while (dr_done < expected)
	{
		rd_kafka_poll(rk, 0);
		if (dr_done >= expected)
			break;
		if (GetCurrentTimestamp() >= deadline)
		{
			transient = RD_KAFKA_RESP_ERR__TIMED_OUT;
			break;
		}
		CHECK_FOR_INTERRUPTS();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	if (rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("fatal producer error: %s", fatal);
		spool_deliver_shutdown();
		return false;
	}
	if (transient == RD_KAFKA_RESP_ERR_NO_ERROR)
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
	if (transient != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("kafka delivery to topic \"%s\" failed: %s",
								 target->topic, rd_kafka_err2str(transient));
		return false;
	}
	return true;
}

/* Drop the producer (at exit, or after a fatal error): nothing is waited for. */
void
spool_deliver_shutdown(void)
{
	if (rk == NULL)
		return;
	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_poll(rk, 0);
	kafka_generation++;
	rd_kafka_destroy(rk);
	rk = NULL;
}
