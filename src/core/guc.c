/*-------------------------------------------------------------------------
 *
 * guc.c
 *	  The spool.* configuration settings (documented in docs/operations.md).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/guc.h"
#include "utils/varlena.h"

#include "core/core.h"

static bool check_allowed_brokers(char **newval, void **extra, GucSource source);

char	   *spool_database = NULL;
int			spool_nonce_workers = 2;
int			spool_nonce_queue_size = 1024;
int			spool_nonce_batch_max = 256;
int			spool_nonce_lease_ttl_ms = 10000;
int			spool_nonce_request_timeout_ms = 10000;
int			spool_nonce_stall_timeout_ms = 3000;
int			spool_lease_wait_timeout_ms = 1000;
int			spool_lease_max_ttl_s = 86400;
int			spool_test_worker_pause_ms = 0;
int			spool_test_kafka_commit_pause_ms = 0;
int			spool_segment_size = 1000000;
int			spool_outbox_segment_size = 100000;
int			spool_outbox_poll_interval_ms = 1000;
int			spool_outbox_close_timeout_ms = 10000;
int			spool_min_retention_s = 86400;
char	   *spool_kafka_allowed_brokers = NULL;
int			spool_dead_letters_retention_s = 30 * 86400;
int			spool_gaps_retention_s = 90 * 86400;
int			spool_outbox_dead_retention_s = 30 * 86400;
int			spool_nonce_history_retention_s = 7 * 86400;
int			spool_operations_retention_s = 365 * 86400;
int			spool_retention_batch_size = 1000;
int			spool_retention_interval_ms = 10000;
int			spool_max_retention_s = 7 * 86400;
int			spool_max_retention_action = SPOOL_MAX_RETENTION_WARN;
bool		spool_standby_processors = false;
bool		spool_allow_drop_with_nonces = false;

static const struct config_enum_entry max_retention_actions[] = {
	{"warn", SPOOL_MAX_RETENTION_WARN, false},
	{"drop", SPOOL_MAX_RETENTION_DROP, false},
	{NULL, 0, false}
};

void
spool_define_gucs(void)
{
	DefineCustomStringVariable("spool.database",
							   "Database in which the spool launcher runs the extension's workers.",
							   NULL,
							   &spool_database,
							   "postgres",
							   PGC_POSTMASTER, 0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_workers",
							"Number of nonce service workers for spool.nonce_request (0 disables worker-queue mode).",
							NULL,
							&spool_nonce_workers,
							2, 0, SPOOL_MAX_NONCE_WORKERS,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_queue_size",
							"Number of worker-queue nonce requests that can wait at once.",
							NULL,
							&spool_nonce_queue_size,
							1024, 16, 65536,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_batch_max",
							"Most requests a nonce worker commits in one transaction.",
							NULL,
							&spool_nonce_batch_max,
							256, 1, 65536,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_lease_ttl",
							"Lease time-to-live a nonce worker uses for the signers it serves.",
							NULL,
							&spool_nonce_lease_ttl_ms,
							10000, 100, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_request_timeout",
							"How long spool.nonce_request waits for its nonce before raising an error.",
							NULL,
							&spool_nonce_request_timeout_ms,
							10000, 10, 3600 * 1000,
							PGC_USERSET, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_stall_timeout",
							"How long a nonce worker with pending requests may make no progress before it is replaced.",
							NULL,
							&spool_nonce_stall_timeout_ms,
							3000, 100, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.lease_wait_timeout",
							"How long acquiring an expired lease waits for the old holder's fenced transactions, before and after terminating them.",
							NULL,
							&spool_lease_wait_timeout_ms,
							1000, 1, 600 * 1000,
							PGC_SUSET, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.lease_max_ttl",
							"Longest lease time-to-live accepted by the lease functions.",
							NULL,
							&spool_lease_max_ttl_s,
							86400, 1, 365 * 86400,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.test_worker_pause",
							"Testing only: nonce workers and processor replicas wait this long after fencing a batch, before committing it.",
							NULL,
							&spool_test_worker_pause_ms,
							0, 0, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_NOT_IN_SAMPLE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.test_kafka_commit_pause",
							"Testing only: transactional kafka dispatchers wait this long after Kafka committed a batch, before PostgreSQL marks it.",
							NULL,
							&spool_test_kafka_commit_pause_ms,
							0, 0, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_NOT_IN_SAMPLE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.segment_size",
							"Number of cursors in one spool segment (a partition of spool.entries).",
							NULL,
							&spool_segment_size,
							1000000, 100, INT_MAX / 2,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.min_retention",
							"A sealed segment is kept at least this long, even when every consumer has passed it.",
							NULL,
							&spool_min_retention_s,
							86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.outbox_segment_size",
							"Outbox ids per ring slot: a target's outbox is eight slots, truncated once delivered.",
							NULL,
							&spool_outbox_segment_size,
							100000, 100, INT_MAX / 16,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.outbox_poll_interval",
							"How often an idle dispatcher looks for rows without being woken.",
							NULL,
							&spool_outbox_poll_interval_ms,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.outbox_close_timeout",
							"How long a stopping dispatcher may take to deliver the batch it holds.",
							"Past it the worker exits without marking the batch, which the next worker delivers; 0 waits as long as the delivery takes.",
							&spool_outbox_close_timeout_ms,
							10000, 0, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomStringVariable("spool.kafka_allowed_brokers",
							   "Kafka brokers that roles other than superusers may name in sources and kafka targets.",
							   "A comma-separated list of host:port, host:* or *; empty: none.",
							   &spool_kafka_allowed_brokers,
							   "",
							   PGC_SIGHUP, 0,
							   check_allowed_brokers, NULL, NULL);

	/* Retention of history tables and stale consumers (src/retention). */
	DefineCustomIntVariable("spool.dead_letters_retention",
							"Rows of spool.dead_letters older than this are removed (0 keeps them forever).",
							NULL,
							&spool_dead_letters_retention_s,
							30 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.gaps_retention",
							"Rows of spool.gaps older than this are removed (0 keeps them forever).",
							NULL,
							&spool_gaps_retention_s,
							90 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.outbox_dead_retention",
							"Rows of spool.outbox_dead that failed longer ago than this are removed and can no longer be redriven (0 keeps them forever).",
							NULL,
							&spool_outbox_dead_retention_s,
							30 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.nonce_history_retention",
							"Consumed nonces (and their request ids) last changed longer ago than this are removed (0 keeps them forever).",
							"A removed nonce is never handed out again; a request id removed with it is no longer recognised.",
							&spool_nonce_history_retention_s,
							7 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.operations_retention",
							"Rows of the operations logs (spool.nonce_set_next_log, spool.source_seeks, spool.processor_rewinds) older than this are removed (0 keeps them forever).",
							"Pending seeks are kept until applied.",
							&spool_operations_retention_s,
							365 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.retention_batch_size",
							"Most history rows removed in one retention transaction.",
							NULL,
							&spool_retention_batch_size,
							1000, 1, 1000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.retention_interval",
							"How often the promoter runs a retention pass: stale consumers, old segments, old history rows.",
							NULL,
							&spool_retention_interval_ms,
							10000, 100, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("spool.max_retention",
							"A spool consumer or processor that has not moved for this long while the spool did is stale (0: never).",
							NULL,
							&spool_max_retention_s,
							7 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomEnumVariable("spool.max_retention_action",
							 "What happens to a stale spool consumer: warn, or drop it so that it no longer holds segments back.",
							 NULL,
							 &spool_max_retention_action,
							 SPOOL_MAX_RETENTION_WARN, max_retention_actions,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("spool.standby_processors",
							 "On a hot standby, run the replicas of enabled processors read-only, following the replicated committed cursor, so that they take over at once after a promotion.",
							 NULL,
							 &spool_standby_processors,
							 false,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("spool.allow_drop_with_nonces",
							 "Lets DROP EXTENSION spool_ext forget the next nonces of signers that handed nonces out.",
							 NULL,
							 &spool_allow_drop_with_nonces,
							 false,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	MarkGUCPrefixReserved("spool");
}

/* Every entry is "*", "host:port" or "host:*". */
static bool
check_allowed_brokers(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	List	   *entries;
	ListCell   *lc;

	if (!SplitIdentifierString(copy, ',', &entries))
	{
		GUC_check_errdetail("List syntax is invalid.");
		return false;
	}
	foreach(lc, entries)
	{
		const char *e = lfirst(lc);
		const char *colon = strrchr(e, ':');

		if (strcmp(e, "*") == 0)
			continue;
		if (colon == NULL || colon == e || colon[1] == '\0')
		{
			GUC_check_errdetail("Entry \"%s\" is not host:port, host:* or *.", e);
			return false;
		}
	}
	return true;
}
