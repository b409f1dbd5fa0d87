/*-------------------------------------------------------------------------
 *
 * deliver.c
 *	  Delivering outbox rows to one target, for a dispatcher shard worker:
 *	  what each kind needs at start, and the kinds delivered inside the
 *	  worker's transaction, sql and notify (the caller commits the delivery
 *	  together with the shard's position).  kafka, delivered outside it, is
 *	  deliver_kafka.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

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

static OutboxTarget *target;
static FmgrInfo fn_info;
static Oid	run_as_oid = InvalidOid;

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
			spool_kafka_start(t);
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

/* Drop what delivery holds (at exit, or after a fatal error). */
void
spool_deliver_shutdown(void)
{
	spool_kafka_stop();
}
