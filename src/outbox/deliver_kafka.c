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
 *	  The default (idempotent) mode can also be pipelined: the dispatcher
 *	  produces a batch into one of KAFKA_PIPE_DEPTH slots
 *	  (spool_kafka_produce) and goes on reading while the acknowledgements
 *	  come; it collects each slot's outcome in order (spool_kafka_finish).
 *	  Each slot has its own report array and generation, so a slot that is
 *	  abandoned (spool_kafka_abandon) ignores reports that come late.
 *
 *	  A target with "transactional": true uses the transactional producer
 *	  instead (transactional.id spool-<database>-<target>-<shard>): a batch
 *	  is produced in one Kafka transaction that also commits the shard's
 *	  position, as the offset of partition 0 of the target's topic, for the
 *	  consumer group named like the transactional id (send_offsets_to_
 *	  transaction).  The dispatcher reads that offset back when it starts
 *	  and after any failure (spool_kafka_txn_committed), to settle a batch
 *	  Kafka committed but PostgreSQL did not mark.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

#include "kafka/kafka.h"
#include "outbox/outbox.h"

#define KAFKA_DEFAULT_MESSAGE_TIMEOUT "30000"
#define KAFKA_MAX_INFLIGHT 10000

static OutboxTarget *target;
static rd_kafka_t *rk = NULL;
static rd_kafka_topic_t *rkt = NULL;	/* target->topic's handle, while rk lives */
static int64 batch_wait_ms = 0;	/* idempotent mode: the target's message.timeout.ms */

/* Transactional mode: the id (and group), and whether init_transactions ran. */
static char *txn_id = NULL;
static bool txn_ready = false;

#define TXN_CALL_MIN_MS 100		/* the least a transaction call is given */
#define TXN_READ_TIMEOUT_MS 10000	/* reading the committed offset */
#define TXN_META_MAX 4000		/* bytes of offset metadata (Kafka's default limit: 4096) */

/*
 * Delivery reports per slot: error code per row of the slot's batch, the
 * reports that came, and the number expected.  Slots 0 .. KAFKA_PIPE_DEPTH-1
 * are the pipeline's; SYNC_SLOT is for the batches that are waited for at
 * once (spool_kafka_deliver, transactions).  A message's opaque tag holds
 * the slot's generation (12 bits), the slot (4 bits) and the row's index
 * plus one (16 bits).
 */
#define KAFKA_SLOTS (KAFKA_PIPE_DEPTH + 1)
#define SYNC_SLOT KAFKA_PIPE_DEPTH
#define TAG(slot, i) ((void *) (((uintptr_t) (slot_gen[slot] & 0xFFF) << 20) | \
								((uintptr_t) (slot) << 16) | (uintptr_t) ((i) + 1)))
static rd_kafka_resp_err_t dr_err[KAFKA_SLOTS][KAFKA_MAX_INFLIGHT];
static int	dr_done[KAFKA_SLOTS];
static int	dr_expected[KAFKA_SLOTS];
static uint32 slot_gen[KAFKA_SLOTS];

StaticAssertDecl(KAFKA_SLOTS <= 16 && KAFKA_MAX_INFLIGHT < 0xFFFF, "tag layout");

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque);
static bool permanent_error(rd_kafka_resp_err_t err);
static void slot_reset(int slot);
static rd_kafka_resp_err_t produce_row(int slot, OutboxRow *r, int i, TimestampTz deadline);
static bool await_reports(int slot, TimestampTz deadline);
static bool nap(TimestampTz deadline);
static rd_kafka_resp_err_t collect_reports(int slot, OutboxRow **rows, int n);

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
	SETPROP("socket.nagle.disable", "true");
	spool_outbox_kafka_props(conf, target->kafka);

	/*
	 * Idempotent mode: librdkafka's own message timeout is turned off, and
	 * the target's message.timeout.ms bounds the dispatcher's wait instead
	 * (spool_kafka_wait_ms), after which everything still queued is purged.
	 * librdkafka times messages out one by one, in the order produced: a
	 * later message of a partition could then still be written after an
	 * earlier one of the same key timed out, and the earlier one, sent
	 * again, would land after it.  A purge takes every queued message of a
	 * partition at once, so what reaches the broker is always a prefix.
	 */
	if (!target->transactional)
	{
		char		val[64];
		size_t		len = sizeof(val);

		if (rd_kafka_conf_get(conf, "message.timeout.ms", val, &len) != RD_KAFKA_CONF_OK)
			strlcpy(val, KAFKA_DEFAULT_MESSAGE_TIMEOUT, sizeof(val));
		batch_wait_ms = strtol(val, NULL, 10);
		SETPROP("message.timeout.ms", "0");
	}
	/* Set last: the guarantees rely on it. */
	SETPROP("enable.idempotence", "true");
	if (target->transactional && txn_id != NULL)
		SETPROP("transactional.id", txn_id);
#undef SETPROP
	rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
	rk = spool_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
	txn_ready = false;
	if (rk == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
				 errmsg("target \"%s\": could not create a Kafka producer: %s", target->name, err)));

	/*
	 * The topic's handle, kept: producing by name would look the topic up,
	 * under librdkafka's instance-wide write lock, for every message.
	 */
	rkt = rd_kafka_topic_new(rk, target->topic, NULL);
	if (rkt == NULL)
	{
		rd_kafka_resp_err_t terr = rd_kafka_last_error();

		rd_kafka_destroy(rk);
		rk = NULL;
		ereport(ERROR,
				(errcode(ERRCODE_SPOOL_INVALID_ARGUMENT),
				 errmsg("target \"%s\": kafka topic \"%s\": %s", target->name, target->topic,
						rd_kafka_err2str(terr))));
	}
}

/*
 * How long a batch of the idempotent mode may wait for its acknowledgements
 * (the target's message.timeout.ms, 30 s by default); -1: no limit (0 was
 * set).  Starts the producer if it is not running.
 */
int64
spool_kafka_wait_ms(void)
{
	if (rk == NULL)
		spool_kafka_start(target);
	return batch_wait_ms > 0 ? batch_wait_ms : -1;
}

/*
 * Fetch the topic's metadata now (bounded, errors ignored), so that the
 * first batch does not wait for it (and for the connections) when it comes.
 * Outside any transaction.
 */
void
spool_kafka_warm(void)
{
	const struct rd_kafka_metadata *md = NULL;

	if (rk == NULL)
		return;
	if (rd_kafka_metadata(rk, 0, rkt, &md, 2000) == RD_KAFKA_RESP_ERR_NO_ERROR)
		rd_kafka_metadata_destroy(md);
}

/* On librdkafka's poll, on our thread: no PostgreSQL calls here. */
static void
dr_msg_cb(rd_kafka_t *k, const rd_kafka_message_t *msg, void *opaque)
{
	uintptr_t	tag = (uintptr_t) msg->_private;
	uint32		gen = (uint32) ((tag >> 20) & 0xFFF);
	int			slot = (int) ((tag >> 16) & 0xF);
	int			idx = (int) (tag & 0xFFFF) - 1;

	if (slot >= KAFKA_SLOTS || gen != (slot_gen[slot] & 0xFFF) ||
		idx < 0 || idx >= KAFKA_MAX_INFLIGHT)
		return;
	dr_err[slot][idx] = msg->err;
	dr_done[slot]++;
}

/* A new batch in slot: reports of its earlier batches are ignored from now on. */
static void
slot_reset(int slot)
{
	slot_gen[slot]++;
	dr_done[slot] = 0;
	dr_expected[slot] = 0;
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
 * Produce rows[0..n) and wait until deadline (DT_NOEND: no limit) for
 * every acknowledgement.
 * Returns true when each row was either acknowledged or refused for good
 * (row->failed, row->error set); false, with *target_error, when the
 * target as a whole failed (unreachable, timed out): then nothing may be
 * marked, and the batch is tried again later.
 */
bool
spool_kafka_deliver(OutboxRow **rows, int n, TimestampTz deadline, char **target_error)
{
	char	   *produce_error = NULL;
	bool		produced = spool_kafka_produce(SYNC_SLOT, rows, n, deadline, &produce_error);

	/* Even after an error, the reports of what was produced are awaited. */
	if (!await_reports(SYNC_SLOT, deadline))
		produce_error = psprintf("kafka delivery to topic \"%s\" failed: %s", target->topic,
								 rd_kafka_err2str(RD_KAFKA_RESP_ERR__TIMED_OUT));
	if (!spool_kafka_finish(SYNC_SLOT, rows, n, target_error))
		return false;
	if (!produced || produce_error != NULL)
	{
		*target_error = produce_error;
		return false;
	}
	return true;
}

/*
 * Produce rows[0..n) into slot (a pipeline slot, 0 .. KAFKA_PIPE_DEPTH-1,
 * or the one spool_kafka_deliver uses) without waiting for the
 * acknowledgements, only while librdkafka's queue is full (until
 * deadline).  Returns false, with *target_error, when a row could not be
 * produced for a reason other than its own (the target failed as a whole);
 * the reports of what was produced are then still to come, and the slot
 * is to be abandoned.
 */
bool
spool_kafka_produce(int slot, OutboxRow **rows, int n, TimestampTz deadline, char **target_error)
{
	rd_kafka_resp_err_t transient = RD_KAFKA_RESP_ERR_NO_ERROR;
	int			i;

	Assert(n <= KAFKA_MAX_INFLIGHT && slot >= 0 && slot < KAFKA_SLOTS);
	if (rk == NULL)
		spool_kafka_start(target);
	slot_reset(slot);
	memset(dr_err[slot], 0, sizeof(rd_kafka_resp_err_t) * n);	/* NO_ERROR is 0 */
	for (i = 0; i < n && transient == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
		transient = produce_row(slot, rows[i], i, deadline);
	if (transient != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("kafka delivery to topic \"%s\" failed: %s",
								 target->topic, rd_kafka_err2str(transient));
		return false;
	}
	return true;
}

/*
 * Serve delivery reports; have all of slot's come?  Without a producer
 * (dropped after a fatal error) yes: spool_kafka_finish then says so.
 */
bool
spool_kafka_done(int slot)
{
	if (rk == NULL)
		return true;
	rd_kafka_poll(rk, 0);
	return dr_done[slot] >= dr_expected[slot];
}

/* Wait up to 1 ms for a delivery report (batches are in flight). */
void
spool_kafka_nap(void)
{
	if (rk != NULL)
		(void) nap(DT_NOEND);
}

/* Wait until every report of slot came; false at the deadline. */
bool
spool_kafka_wait(int slot, TimestampTz deadline)
{
	return rk != NULL && await_reports(slot, deadline);
}

/*
 * Once every report of slot came (rows[0..n) are the rows produced into
 * it): as spool_kafka_deliver's result.
 */
bool
spool_kafka_finish(int slot, OutboxRow **rows, int n, char **target_error)
{
	rd_kafka_resp_err_t transient;
	char		fatal[512];

	if (rk == NULL)
	{
		*target_error = pstrdup("the Kafka producer was dropped");
		return false;
	}
	if (rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("fatal producer error: %s", fatal);
		spool_kafka_stop();
		return false;
	}
	transient = collect_reports(slot, rows, n);
	if (transient != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*target_error = psprintf("kafka delivery to topic \"%s\" failed: %s",
								 target->topic, rd_kafka_err2str(transient));
		return false;
	}
	return true;
}

/*
 * Give up every pipeline slot (after a failure): their late reports are
 * ignored, and what librdkafka has not sent yet is purged, so that no
 * later batch reaches the broker after an earlier one failed (what is in
 * flight may still arrive: delivered again later, at least once).
 */
void
spool_kafka_abandon(void)
{
	int			s;

	for (s = 0; s < KAFKA_SLOTS; s++)
		slot_reset(s);
	if (rk == NULL)
		return;
	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE);
	rd_kafka_poll(rk, 0);
}

/*
 * Does any byte of the 8 in w need an escape in a JSON string (below 0x20,
 * '"' or '\\')?  The bit tests of "Bit Twiddling Hacks" (a byte below n,
 * a zero byte of w ^ c), each exact as a whole: a byte of 0x80 and above is
 * never taken for one below 0x20.
 */
#define BYTES(c)		((uint64) 0x0101010101010101 * (c))
#define HAS_ZERO(w)		(((w) - BYTES(0x01)) & ~(w) & BYTES(0x80))
#define HAS_BELOW(w, n)	(((w) - BYTES(n)) & ~(w) & BYTES(0x80))

static inline bool
chunk_needs_escape(uint64 w)
{
	return (HAS_BELOW(w, 0x20) | HAS_ZERO(w ^ BYTES('"')) | HAS_ZERO(w ^ BYTES('\\'))) != 0;
}

/*
 * Append str[0..len) as a JSON string, escaped as escape_json does: eight
 * bytes at a time while none needs an escape, a byte at a time in a chunk
 * where one does, written straight into out (room for the worst case, six
 * bytes for one, is made once).
 */
static void
append_json_string(StringInfo out, const char *str, int len)
{
	const char *p = str;
	const char *end = str + len;
	char	   *o;

	enlargeStringInfo(out, len * 6 + 2);
	o = out->data + out->len;
	*o++ = '"';
	while (p < end)
	{
		unsigned char c;

		if (end - p >= 8)
		{
			uint64		w;

			memcpy(&w, p, 8);
			if (!chunk_needs_escape(w))
			{
				memcpy(o, p, 8);
				o += 8;
				p += 8;
				continue;
			}
		}
		c = (unsigned char) *p++;
		if (c >= ' ' && c != '"' && c != '\\')
		{
			*o++ = (char) c;
			continue;
		}
		*o++ = '\\';
		switch (c)
		{
			case '\b':
				*o++ = 'b';
				break;
			case '\f':
				*o++ = 'f';
				break;
			case '\n':
				*o++ = 'n';
				break;
			case '\r':
				*o++ = 'r';
				break;
			case '\t':
				*o++ = 't';
				break;
			case '"':
			case '\\':
				*o++ = (char) c;
				break;
			default:
				o += sprintf(o, "u%04x", (int) c);
				break;
		}
	}
	*o++ = '"';
	*o = '\0';
	out->len = o - out->data;
}

/* A scalar, as JsonbToCString writes it. */
static void
append_json_scalar(StringInfo out, JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			appendBinaryStringInfo(out, "null", 4);
			break;
		case jbvString:
			append_json_string(out, v->val.string.val, v->val.string.len);
			break;
		case jbvNumeric:
			appendStringInfoString(out, DatumGetCString(DirectFunctionCall1(numeric_out,
																			NumericGetDatum(v->val.numeric))));
			break;
		case jbvBool:
			if (v->val.boolean)
				appendBinaryStringInfo(out, "true", 4);
			else
				appendBinaryStringInfo(out, "false", 5);
			break;
		default:
			elog(ERROR, "unknown jsonb scalar type");
	}
}

/*
 * The text of a payload, byte for byte what JsonbToCString (jsonb's output
 * function) gives, in a buffer kept across rows (valid until the next
 * call): the same walk, with strings escaped without a copy and a byte at a
 * time only where an escape is needed (the value text was the largest part
 * of producing a row).
 */
static StringInfoData value_buf;	/* value_text's, kept across rows */
#define VALUE_BUF_KEEP (1024 * 1024)	/* a larger one is not kept */

static char *
value_text(Jsonb *jb, size_t *len)
{
	StringInfo	out = &value_buf;
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbValue	v;
	JsonbIteratorToken type;
	bool		first = true;
	bool		raw_scalar = false;

	if (value_buf.data != NULL && value_buf.maxlen > VALUE_BUF_KEEP)
	{
		pfree(value_buf.data);
		value_buf.data = NULL;
	}
	if (value_buf.data == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&value_buf);
		MemoryContextSwitchTo(old);
	}
	resetStringInfo(out);
	enlargeStringInfo(out, VARSIZE(jb));
	while ((type = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (type)
		{
			case WJB_BEGIN_ARRAY:
				if (!first)
					appendBinaryStringInfo(out, ", ", 2);
				if (v.val.array.rawScalar)
					raw_scalar = true;
				else
					appendStringInfoCharMacro(out, '[');
				first = true;
				break;
			case WJB_BEGIN_OBJECT:
				if (!first)
					appendBinaryStringInfo(out, ", ", 2);
				appendStringInfoCharMacro(out, '{');
				first = true;
				break;
			case WJB_KEY:
				if (!first)
					appendBinaryStringInfo(out, ", ", 2);
				append_json_string(out, v.val.string.val, v.val.string.len);
				appendBinaryStringInfo(out, ": ", 2);
				/* A container value comes next as its BEGIN token: no comma before it. */
				first = true;
				break;
			case WJB_VALUE:
			case WJB_ELEM:
				if (!first)
					appendBinaryStringInfo(out, ", ", 2);
				append_json_scalar(out, &v);
				first = false;
				break;
			case WJB_END_ARRAY:
				if (!raw_scalar)
					appendStringInfoCharMacro(out, ']');
				first = false;
				break;
			case WJB_END_OBJECT:
				appendStringInfoCharMacro(out, '}');
				first = false;
				break;
			default:
				elog(ERROR, "unknown jsonb iterator token type");
		}
	}
	*len = out->len;
	return out->data;
}

/*
 * Produce row (number i of slot's batch), waiting while librdkafka's local
 * queue is full.  A row the broker will never take is marked failed; a
 * transient error is returned and ends the batch.  dr_expected[slot]
 * counts the messages whose delivery report is to come.
 */
static rd_kafka_resp_err_t
produce_row(int slot, OutboxRow *r, int i, TimestampTz deadline)
{
	rd_kafka_headers_t *h = rd_kafka_headers_new(r->barrier ? 2 : 1);
	char		idbuf[MAXINT8LEN + 1];
	int			idlen = pg_lltoa(r->id, idbuf);
	static const char barrier_value[] = "{\"barrier\": true}";
	size_t		len = sizeof(barrier_value) - 1;
	const char *value = r->barrier ? barrier_value : value_text(r->payload, &len);
	rd_kafka_resp_err_t err;

	dr_err[slot][i] = RD_KAFKA_RESP_ERR_NO_ERROR;
	rd_kafka_header_add(h, "spool-outbox-id", 15, idbuf, idlen);
	if (r->barrier)
		rd_kafka_header_add(h, "spool-barrier", 13, "true", 4);
	for (;;)
	{
		err = rd_kafka_producev(rk,
								RD_KAFKA_V_RKT(rkt),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_KEY(r->key, r->key ? strlen(r->key) : 0),
								RD_KAFKA_V_VALUE((void *) value, len),
								RD_KAFKA_V_HEADERS(h),
								RD_KAFKA_V_OPAQUE(TAG(slot, i)),
								RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL || !nap(deadline))
			break;
	}
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		dr_expected[slot]++;
		return err;
	}
	rd_kafka_headers_destroy(h);
	if (!permanent_error(err))
		return err;
	r->failed = true;
	r->error = pstrdup(rd_kafka_err2str(err));
	dr_err[slot][i] = err;
	return RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* Serve delivery reports until all of slot's have come; false at the deadline. */
static bool
await_reports(int slot, TimestampTz deadline)
{
	for (;;)
	{
		rd_kafka_poll(rk, 0);
		if (dr_done[slot] >= dr_expected[slot])
			return true;
		if (!nap(deadline))
			return false;
	}
}

/*
 * Up to 1 ms in librdkafka's poll, which returns as soon as a callback was
 * served (a report wakes it at once, where a 1 ms sleep on the latch would
 * not), after serving interrupts and checking that the postmaster lives;
 * false, without waiting, once deadline has passed.
 */
static bool
nap(TimestampTz deadline)
{
	if (GetCurrentTimestamp() >= deadline)
		return false;
	CHECK_FOR_INTERRUPTS();
	if (!PostmasterIsAlive())
		proc_exit(1);
	pgstat_report_wait_start(PG_WAIT_EXTENSION);
	rd_kafka_poll(rk, 1);
	pgstat_report_wait_end();
	return true;
}

/*
 * After every report came: rows refused for good are marked failed; the
 * first other error is returned (the batch is tried again).
 */
static rd_kafka_resp_err_t
collect_reports(int slot, OutboxRow **rows, int n)
{
	rd_kafka_resp_err_t transient = RD_KAFKA_RESP_ERR_NO_ERROR;
	rd_kafka_resp_err_t *errs = dr_err[slot];
	int			i;

	for (i = 0; i < n; i++)
	{
		if (errs[i] == RD_KAFKA_RESP_ERR_NO_ERROR || rows[i]->failed)
			continue;
		if (permanent_error(errs[i]))
		{
			rows[i]->failed = true;
			rows[i]->error = pstrdup(rd_kafka_err2str(errs[i]));
		}
		else if (transient == RD_KAFKA_RESP_ERR_NO_ERROR)
			transient = errs[i];
	}
	return transient;
}

/* Drop the producer (at exit, or after a fatal error): nothing is waited for. */
void
spool_kafka_stop(void)
{
	int			s;

	if (rk == NULL)
		return;
	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_poll(rk, 0);
	for (s = 0; s < KAFKA_SLOTS; s++)
		slot_reset(s);
	rd_kafka_topic_destroy(rkt);
	rkt = NULL;
	rd_kafka_destroy(rk);
	rk = NULL;
	txn_ready = false;
}

/* ---- transactional mode ---- */

/*
 * Make target t's producer transactional with id (and consumer group) id;
 * before spool_kafka_start.
 */
void
spool_kafka_transactional(const char *id)
{
	txn_id = MemoryContextStrdup(TopMemoryContext, id);
}

/* Milliseconds left until deadline, at least TXN_CALL_MIN_MS. */
static int
txn_ms(TimestampTz deadline)
{
	long		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);

	return (int) Max(Min(ms, INT_MAX), TXN_CALL_MIN_MS);
}

/*
 * Note a failed transaction call: *err says what failed.  A fatal error
 * (fenced by a newer producer of the same transactional.id, among others)
 * drops the producer; one that needs an abort is aborted, and a failed
 * abort drops the producer too.  Dropping is always safe: the next
 * producer's init_transactions finishes or aborts what this one left, and
 * the dispatcher reconciles with the committed offset.  Returns false.
 */
static bool
txn_failed(const char *what, rd_kafka_error_t *error, TimestampTz deadline, char **err)
{
	bool		fatal = rd_kafka_error_is_fatal(error);
	bool		abortable = rd_kafka_error_txn_requires_abort(error);

	*err = psprintf("kafka transaction: %s failed%s: %s", what,
					fatal ? " (fatal)" : "", rd_kafka_error_string(error));
	rd_kafka_error_destroy(error);
	if (!fatal && abortable)
	{
		rd_kafka_error_t *e2 = rd_kafka_abort_transaction(rk, txn_ms(deadline));

		if (e2 == NULL)
			return false;
		rd_kafka_error_destroy(e2);
	}
	spool_kafka_stop();
	return false;
}

/* The producer, with init_transactions done (fencing older producers of the id). */
static bool
txn_producer(TimestampTz deadline, char **err)
{
	rd_kafka_error_t *error;

	if (rk == NULL)
		spool_kafka_start(target);
	if (txn_ready)
		return true;
	error = rd_kafka_init_transactions(rk, txn_ms(deadline));
	if (error != NULL)
	{
		*err = psprintf("kafka transaction: init_transactions failed: %s",
						rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
		spool_kafka_stop();
		return false;
	}
	txn_ready = true;
	return true;
}

/*
 * The position Kafka committed for this shard (*offset, -1 if none) and
 * the metadata committed with it (*meta, palloc'd, "" if none).  Starts
 * the producer first: its init_transactions fences older producers and
 * completes or aborts a transaction they left, so the offset read is
 * settled.  The offset is read by a consumer handle of the group, with
 * isolation.level=read_committed (so a broker answers only stable
 * offsets).  Returns false, with *err, when either fails.
 */
bool
spool_kafka_txn_committed(int64 *offset, char **meta, char **err)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), TXN_READ_TIMEOUT_MS);
	rd_kafka_conf_t *conf;
	rd_kafka_t *c;
	rd_kafka_topic_partition_list_t *parts;
	rd_kafka_resp_err_t rerr;
	char		errbuf[512];

	if (!txn_producer(deadline, err))
		return false;
	conf = rd_kafka_conf_new();
	spool_outbox_kafka_props(conf, target->kafka);
	if (rd_kafka_conf_set(conf, "bootstrap.servers", target->brokers, errbuf, sizeof(errbuf)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "group.id", txn_id, errbuf, sizeof(errbuf)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "client.id", "spool_ext", errbuf, sizeof(errbuf)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "enable.auto.commit", "false", errbuf, sizeof(errbuf)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "isolation.level", "read_committed", errbuf, sizeof(errbuf)) != RD_KAFKA_CONF_OK)
	{
		rd_kafka_conf_destroy(conf);
		*err = psprintf("kafka transaction: consumer settings: %s", errbuf);
		return false;
	}
	c = spool_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf, sizeof(errbuf));
	if (c == NULL)
	{
		*err = psprintf("kafka transaction: could not create a consumer: %s", errbuf);
		return false;
	}
	parts = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(parts, target->topic, 0);
	rerr = rd_kafka_committed(c, parts, txn_ms(deadline));
	if (rerr == RD_KAFKA_RESP_ERR_NO_ERROR)
		rerr = parts->elems[0].err;
	if (rerr == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*offset = parts->elems[0].offset >= 0 ? parts->elems[0].offset : -1;
		*meta = parts->elems[0].metadata && parts->elems[0].metadata_size > 0 ?
			pnstrdup(parts->elems[0].metadata, parts->elems[0].metadata_size) : pstrdup("");
	}
	else
		*err = psprintf("kafka transaction: reading the committed offset of group \"%s\" failed: %s",
						txn_id, rd_kafka_err2str(rerr));
	rd_kafka_topic_partition_list_destroy(parts);
	rd_kafka_destroy(c);
	return rerr == RD_KAFKA_RESP_ERR_NO_ERROR;
}

/*
 * Produce rows[0..n) into the sync slot, in the transaction begun: each row
 * produced is marked sent; a row behind a refused one of its key (failed,
 * at once or before) is not produced.  Returns the first transient error.
 */
static rd_kafka_resp_err_t
txn_produce(OutboxRow **rows, int n, TimestampTz deadline)
{
	rd_kafka_resp_err_t transient = RD_KAFKA_RESP_ERR_NO_ERROR;
	OutboxRow **failed = palloc(sizeof(OutboxRow *) * Max(n, 1));	/* rows[0..i) that failed */
	int			nfailed = 0;
	int			i;
	int			j;

	slot_reset(SYNC_SLOT);
	memset(dr_err[SYNC_SLOT], 0, sizeof(rd_kafka_resp_err_t) * n);
	for (i = 0; i < n && transient == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
	{
		bool		behind = false;

		rows[i]->sent = false;
		/* Only the failed rows before it are compared (a batch has few, if any). */
		for (j = 0; j < nfailed && !behind; j++)
			behind = spool_same_key(rows[i]->key, failed[j]->key);
		if (!behind)			/* else it waits behind a refused row of its key */
		{
			transient = produce_row(SYNC_SLOT, rows[i], i, deadline);
			rows[i]->sent = !rows[i]->failed;
		}
		if (rows[i]->failed)
			failed[nfailed++] = rows[i];
	}
	return transient;
}

/*
 * Produce rows[0..n) in one Kafka transaction that also commits offset to,
 * with the metadata meta_fn returns then, for the shard's group, within
 * wait_ms.  Each row produced is marked sent.  A row librdkafka refuses at
 * once (too large) is marked failed and the later rows of its key are not
 * produced (not sent); the transaction goes on without them.
 * KTXN_COMMITTED: Kafka committed it.  KTXN_REFUSED: the broker refused a
 * row for good (marked failed) and the transaction was aborted; the caller
 * leaves that row out (and its key's later rows) and tries again.
 * KTXN_TOO_LONG: meta_fn's metadata is over TXN_META_MAX bytes; aborted.
 * KTXN_FAILED, with *err: the transaction failed or its outcome is not
 * known (a commit that timed out); the caller reconciles with
 * spool_kafka_txn_committed before it delivers again.
 */
KafkaTxnResult
spool_kafka_txn_deliver(OutboxRow **rows, int n, int64 to, char *(*meta_fn) (void),
						int64 wait_ms, char **err)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
	rd_kafka_error_t *error;
	rd_kafka_resp_err_t transient = RD_KAFKA_RESP_ERR_NO_ERROR;
	rd_kafka_topic_partition_list_t *offsets;
	rd_kafka_consumer_group_metadata_t *cgmd;
	int			i;
	bool		refused = false;
	bool		too_long = false;
	char	   *meta = NULL;
	char		fatal[512];

	Assert(n <= KAFKA_MAX_INFLIGHT);
	if (!txn_producer(deadline, err))
		return KTXN_FAILED;
	if ((error = rd_kafka_begin_transaction(rk)) != NULL)
	{
		(void) txn_failed("begin_transaction", error, deadline, err);
		return KTXN_FAILED;
	}
	transient = txn_produce(rows, n, deadline);
	if (!await_reports(SYNC_SLOT, deadline))
		transient = RD_KAFKA_RESP_ERR__TIMED_OUT;
	if (rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*err = psprintf("kafka transaction: fatal producer error: %s", fatal);
		spool_kafka_stop();
		return KTXN_FAILED;
	}
	if (transient == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		/* Refused by the broker: in the transaction already, so it is aborted. */
		for (i = 0; i < n; i++)
			refused |= rows[i]->sent && dr_err[SYNC_SLOT][i] != RD_KAFKA_RESP_ERR_NO_ERROR &&
				permanent_error(dr_err[SYNC_SLOT][i]);
		transient = collect_reports(SYNC_SLOT, rows, n);
	}
	if (transient == RD_KAFKA_RESP_ERR_NO_ERROR && !refused)
	{
		meta = meta_fn();
		too_long = strlen(meta) > TXN_META_MAX;
	}
	if (transient != RD_KAFKA_RESP_ERR_NO_ERROR || refused || too_long)
	{
		/* Nothing of it may become visible: abort, and say why. */
		error = rd_kafka_abort_transaction(rk, txn_ms(deadline));
		if (error != NULL)
		{
			(void) txn_failed("abort_transaction", error, deadline, err);
			return KTXN_FAILED;
		}
		if (transient == RD_KAFKA_RESP_ERR_NO_ERROR)
			return refused ? KTXN_REFUSED : KTXN_TOO_LONG;
		*err = psprintf("kafka delivery to topic \"%s\" failed: %s",
						target->topic, rd_kafka_err2str(transient));
		return KTXN_FAILED;
	}

	offsets = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(offsets, target->topic, 0)->offset = to;
	offsets->elems[0].metadata = strdup(meta);
	offsets->elems[0].metadata_size = strlen(meta);
	cgmd = rd_kafka_consumer_group_metadata_new(txn_id);
	error = rd_kafka_send_offsets_to_transaction(rk, offsets, cgmd, txn_ms(deadline));
	rd_kafka_consumer_group_metadata_destroy(cgmd);
	rd_kafka_topic_partition_list_destroy(offsets);
	if (error != NULL)
	{
		(void) txn_failed("send_offsets_to_transaction", error, deadline, err);
		return KTXN_FAILED;
	}

	for (;;)
	{
		error = rd_kafka_commit_transaction(rk, txn_ms(deadline));
		if (error == NULL)
			return KTXN_COMMITTED;
		/* A retriable error (a timeout): the same call may be repeated. */
		if (!rd_kafka_error_is_retriable(error) || rd_kafka_error_txn_requires_abort(error) ||
			rd_kafka_error_is_fatal(error) || GetCurrentTimestamp() >= deadline)
			break;
		rd_kafka_error_destroy(error);
		CHECK_FOR_INTERRUPTS();
	}
	if (rd_kafka_error_is_retriable(error) && !rd_kafka_error_txn_requires_abort(error))
	{
		/* The outcome is not known: a new producer settles it. */
		*err = psprintf("kafka transaction: commit_transaction did not finish: %s",
						rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
		spool_kafka_stop();
		return KTXN_FAILED;
	}
	(void) txn_failed("commit_transaction", error, deadline, err);
	return KTXN_FAILED;
}
