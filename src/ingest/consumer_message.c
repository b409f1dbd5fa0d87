/*-------------------------------------------------------------------------
 *
 * consumer_message.c
 *	  One consumed Kafka message (or consumer error) to a row of the batch,
 *	  by the source's checks: key, headers, timestamp and value; a message
 *	  that fails becomes a dead-letter row, a retention hole a gap row.  Also
 *	  the conversion of a json source's values to jsonb before staging.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest/consumer.h"
#include "ingest/json_check.h"

static Jsonb *headers_jsonb(rd_kafka_message_t *rkm);
static bytea *make_bytea(const void *data, size_t len);
static bool set_timestamp(Staged *s, rd_kafka_message_t *rkm);
static void set_value(Staged *s, rd_kafka_message_t *rkm);
static void handle_consumer_error(rd_kafka_message_t *rkm);
static void handle_gap(const char *topic, int32 partition);
static Datum json_to_jsonb(const char *json);
static bool convert_batch_json(void);
static void convert_one_json(Staged *s, const char *why);

Staged *
new_staged(int part, int64 offset, char kind)
{
	Staged	   *s;

	/* Grown on demand: a batch_size of a million is not 100 MB up front. */
	if (nbatch == batch_cap)
	{
		batch_cap *= 2;
		batch = repalloc(batch, sizeof(Staged) * batch_cap);
	}
	s = &batch[nbatch++];

	memset(s, 0, sizeof(Staged));
	s->part = part;
	s->offset = offset;
	s->kind = kind;
	return s;
}

/* Kafka headers as a JSON object; values that are not UTF-8 become "\x<hex>". */
static Jsonb *
headers_jsonb(rd_kafka_message_t *rkm)
{
	rd_kafka_headers_t *hdrs;
	StringInfoData buf;
	const char *name;
	const void *val;
	size_t		size;
	size_t		i;

	if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return NULL;
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
	{
		char	   *text;

		if (i > 0)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, pg_verify_mbstr(PG_UTF8, name, strlen(name), true) ? name : "\\x?");
		appendStringInfoString(&buf, ": ");
		if (val == NULL)
		{
			appendStringInfoString(&buf, "null");
			continue;
		}
		if (pg_verify_mbstr(PG_UTF8, val, size, true) && memchr(val, '\0', size) == NULL)
			text = pnstrdup(val, size);
		else
		{
			text = palloc(size * 2 + 3);
			strcpy(text, "\\x");
			hex_encode(val, size, text + 2);
			text[size * 2 + 2] = '\0';
		}
		escape_json(&buf, text);
	}
	appendStringInfoChar(&buf, '}');
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

static bytea *
make_bytea(const void *data, size_t len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), data, len);
	return b;
}

/*
 * The message's Kafka timestamp, if it has one.  False when it is outside
 * the range of timestamptz: s is then a dead letter.
 */
static bool
set_timestamp(Staged *s, rd_kafka_message_t *rkm)
{
	rd_kafka_timestamp_type_t tstype;
	int64		ts = rd_kafka_message_timestamp(rkm, &tstype);
	int64		pg_ms;

	if (tstype == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE || ts < 0)
		return true;
	/* Milliseconds since 1970 to microseconds since 2000, if in range. */
	pg_ms = ts - ((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000);
	if (pg_ms >= END_TIMESTAMP / 1000)
	{
		s->kind = 'd';
		if (rkm->payload && rkm->len <= (size_t) opts->max_message_bytes)
			s->payload = make_bytea(rkm->payload, rkm->len);
		s->error = psprintf("Kafka timestamp " INT64_FORMAT " ms is outside the range of timestamptz", ts);
		return false;
	}
	s->ts = (TimestampTz) pg_ms * 1000;
	s->has_ts = true;
	return true;
}

/*
 * The message's value, as the source's format says; a value that cannot
 * be stored makes s a dead letter.  json text is converted to jsonb when
 * the batch is staged (convert_json_values).
 */
static void
set_value(Staged *s, rd_kafka_message_t *rkm)
{
	bool		utf8;

	if (rkm->payload == NULL)
	{
		s->kind = 'd';
		s->error = "null value (tombstone)";
		return;
	}
	if (rkm->len > (size_t) opts->max_message_bytes)
	{
		s->kind = 'd';
		s->error = psprintf("value of %zu bytes exceeds max_message_bytes (%d); payload not kept",
							rkm->len, opts->max_message_bytes);
		return;
	}
	if (opts->format == SPOOL_FORMAT_BYTES)
	{
		s->payload = make_bytea(rkm->payload, rkm->len);
		return;
	}
	/* jsonb_in and text trust their input to be server-encoded and stop at a NUL. */
	utf8 = pg_verify_mbstr(PG_UTF8, rkm->payload, rkm->len, true) &&
		memchr(rkm->payload, '\0', rkm->len) == NULL;
	if (opts->format == SPOOL_FORMAT_JSON && utf8)
		s->json = pnstrdup(rkm->payload, rkm->len);
	else
		s->payload = make_bytea(rkm->payload, rkm->len);
	if (!utf8)
	{
		s->kind = 'd';
		s->error = opts->format == SPOOL_FORMAT_JSON ? "invalid JSON: not valid UTF-8"
			: "invalid UTF-8 text";
	}
}

/* A consumer error: a hole (offset out of range) becomes a gap row. */
static void
handle_consumer_error(rd_kafka_message_t *rkm)
{
	if (rkm->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
		return;
	if (rkm->rkt &&
		(rkm->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
		 rkm->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE))
	{
		handle_gap(rd_kafka_topic_name(rkm->rkt), rkm->partition);
		return;
	}
	set_part_error(rkm->rkt ? find_part(rd_kafka_topic_name(rkm->rkt), rkm->partition) : -1,
				   "%s%s%s", rkm->rkt ? rd_kafka_topic_name(rkm->rkt) : "",
				   rkm->rkt ? ": " : "", rd_kafka_message_errstr(rkm));
}

/* Turn one consumed message (or consumer error) into a staged row. */
void
handle_message(rd_kafka_message_t *rkm)
{
	int			pi;
	Staged	   *s;

	if (rkm->err)
	{
		handle_consumer_error(rkm);
		return;
	}
	pi = find_part(rd_kafka_topic_name(rkm->rkt), rkm->partition);
	if (pi < 0)
		return;					/* not ours (cannot happen with assign) */
	if (parts[pi].position >= 0 && rkm->offset < parts[pi].position)
		return;					/* already staged (a re-fetch after seek) */
	parts[pi].position = rkm->offset + 1;
	parts[pi].count++;
	/* Data ends the partition's error state once a refresh has shown it. */
	if (parts[pi].error_at != 0 && parts[pi].error_shown)
		parts[pi].error_at = 0;

	s = new_staged(pi, rkm->offset, 'm');
	fill_staged(s, rkm);
}

/* A message's key, headers, timestamp and value, by the source's checks. */
void
fill_staged(Staged *s, rd_kafka_message_t *rkm)
{
	if (rkm->key)
		s->key = make_bytea(rkm->key, rkm->key_len);
	s->headers = headers_jsonb(rkm);
	batch_bytes += rkm->len + rkm->key_len;
	if (set_timestamp(s, rkm))
		set_value(s, rkm);
}

/*
 * A replayed dead letter whose message Kafka no longer has: its stored key
 * and payload, through the same value checks (format, max_message_bytes)
 * as a message read from Kafka.  No headers and no Kafka timestamp are
 * stored with a dead letter: the entry gets NULL for both.  A dead letter
 * without a payload (a tombstone, or one too large to keep) cannot be
 * rebuilt: s stays a dead letter.
 */
void
fill_stored(Staged *s, bytea *key, bytea *payload)
{
	rd_kafka_message_t m;

	s->from_stored = true;
	if (payload == NULL)
	{
		s->kind = 'd';
		s->error = "message no longer in Kafka, and the dead letter holds no payload";
		return;
	}
	s->key = key;
	memset(&m, 0, sizeof(m));
	m.payload = VARDATA_ANY(payload);
	m.len = VARSIZE_ANY_EXHDR(payload);
	batch_bytes += m.len + (key ? VARSIZE_ANY_EXHDR(key) : 0);
	set_value(s, &m);
}

/*
 * The broker no longer has the offset we need: record the hole [position,
 * log start - 1] as a gap row and, unless on_gap is 'stop', continue from
 * the log start.
 */
static void
handle_gap(const char *topic, int32 partition)
{
	int			pi = find_part(topic, partition);
	int64		low;
	Staged	   *s;
	bool		stop;

	if (pi < 0 || (low = log_start(topic, partition)) < 0)
		return;
	if (parts[pi].position < 0 || parts[pi].position >= low)
	{
		/* Not a hole behind us (e.g. we asked beyond the end): resume at the end. */
		set_error("%s [%d]: offset " INT64_FORMAT " out of range (log start " INT64_FORMAT ")",
				  topic, partition, parts[pi].position, low);
		return;
	}

	stop = opts->on_gap_stop && !skip_gap;
	s = new_staged(pi, parts[pi].position, 'g');
	s->gap_to = low - 1;
	s->gap_stop = stop;
	ereport(WARNING,
			(errcode(ERRCODE_WARNING),
			 errmsg("source \"%s\": retention gap in %s [%d], offsets " INT64_FORMAT " to " INT64_FORMAT " are gone",
					source_name, topic, partition, parts[pi].position, low - 1),
			 errdetail(stop ? "on_gap is 'stop': the source stops; spool.start_source continues past the gap."
					   : "The source continues from the log start.")));
	if (stop)
	{
		stop_after_batch = true;
		return;
	}
	/*
	 * Continue from the log start.  After an offset-out-of-range error with
	 * auto.offset.reset=error a seek does not restart fetching; assigning
	 * every partition again at its position does.
	 */
	parts[pi].position = low;
	reassign_all();
}

/*
 * The jsonb of one document (jsonb_in), copied into the current context.
 * The parser's own allocations (tokens, the tree of values, the sort of
 * keys: several times the document) go into a context that is reset after
 * each document and keeps its first megabyte: left in the staging
 * transaction's context they came to about 100 MB per batch of 20,000,
 * fresh pages from the kernel every batch.
 */
static Datum
json_to_jsonb(const char *json)
{
	static MemoryContext parse_cxt = NULL;
	MemoryContext cxt = CurrentMemoryContext;
	Jsonb	   *parsed;
	Jsonb	   *copy;

	if (parse_cxt == NULL)
		parse_cxt = AllocSetContextCreate(TopMemoryContext, "spool ingest json",
										  1024 * 1024, 1024 * 1024, ALLOCSET_DEFAULT_MAXSIZE);
	MemoryContextSwitchTo(parse_cxt);
	parsed = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(json)));
	MemoryContextSwitchTo(cxt);
	copy = palloc(VARSIZE(parsed));
	memcpy(copy, parsed, VARSIZE(parsed));
	MemoryContextReset(parse_cxt);
	return JsonbPGetDatum(copy);
}

/* Convert every pending json text of the batch in one subtransaction. */
static bool
convert_batch_json(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = false;
	int			i;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		for (i = 0; i < nbatch; i++)
			if (batch[i].kind == 'm' && batch[i].json && !batch[i].has_value)
			{
				batch[i].value = json_to_jsonb(batch[i].json);
				batch[i].has_value = true;
			}
		ReleaseCurrentSubTransaction();
		ok = true;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return ok;
}

/*
 * Convert one message's json text in its own subtransaction; a failure makes
 * it a dead letter, with jansson's wording when it has one.
 */
static void
convert_one_json(Staged *s, const char *why)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	s->has_value = false;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		s->value = json_to_jsonb(s->json);
		s->has_value = true;
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		s->kind = 'd';
		s->payload = make_bytea(s->json, strlen(s->json));
		s->error = psprintf("invalid JSON: %s", why ? why : edata->message);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
}

/*
 * Convert the json texts of the batch to jsonb.  The common case is one
 * subtransaction for the whole batch.  When it fails, jansson (which reports
 * errors as values, no subtransaction needed) points at the suspects; jsonb
 * has the last word on each of them (jansson refuses some documents jsonb
 * takes, such as 1e400), and the rest is converted as a batch again.  Should
 * that still fail, every message gets a subtransaction of its own.
 */
void
convert_json_values(void)
{
	int			i;

	if (convert_batch_json())
		return;

	for (i = 0; i < nbatch; i++)
	{
		Staged	   *s = &batch[i];
		char		why[256];

		s->has_value = false;
		if (s->kind == 'm' && s->json &&
			!spool_json_valid(s->json, strlen(s->json), why, sizeof(why)))
			convert_one_json(s, why);
	}
	if (convert_batch_json())
		return;
	for (i = 0; i < nbatch; i++)
		if (batch[i].kind == 'm' && batch[i].json && !batch[i].has_value)
			convert_one_json(&batch[i], NULL);
}
