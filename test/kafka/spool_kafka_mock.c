/*
 * spool_kafka_mock.c -- a scriptable test Kafka cluster for spool_ext tests.
 *
 * There is no real Kafka broker on the test machines.  librdkafka ships a
 * mock cluster (rdkafka_mock.h) that speaks the real Kafka wire protocol on
 * TCP, so any Kafka client (librdkafka, kcat, ...) can talk to it.  This
 * program starts such a cluster, prints where it listens, and then takes
 * commands on stdin so that a test can produce data and inject failures.
 *
 * USAGE
 *   spool_kafka_mock [--brokers N] [--topic NAME:PARTITIONS]... [--quiet]
 *                    [--message-timeout MS]
 *
 *   --brokers N            brokers in the cluster, ids 1..N (default 1)
 *   --topic NAME:PARTS     create a topic before announcing (repeatable)
 *   --quiet                no librdkafka log lines on stderr
 *   --message-timeout MS   how long the internal producer keeps trying to
 *                          deliver one message (default 30000); a produce
 *                          command waits at most this long plus 10 s
 *
 * PROTOCOL (stdout carries nothing else; logs go to stderr)
 *   On start-up exactly one line:   BOOTSTRAP 127.0.0.1:p1,127.0.0.1:p2,...
 *   Then one command per stdin line, each answered by exactly one line that
 *   starts with "OK" or "ERR <reason>" (stdout is flushed after every line):
 *
 *   topic NAME PARTITIONS                    OK
 *   produce TOPIC COUNT [PARTITION] [SIZE] [START]
 *                                            OK produced COUNT
 *       COUNT messages with seq i = START .. START+COUNT-1 (START default 0),
 *       key "k<i>", value ~SIZE bytes (default 200) of JSON:
 *         {"seq":i,"key":"k<i>","amount":i%1000,"ts":<unix ms>,"pad":"xx.."}
 *       PARTITION -1 or omitted: message i goes to partition i % partitions
 *       (so the placement of a seq does not depend on how the produce
 *       commands were split).  Waits until every message is acknowledged
 *       (acks=all); otherwise "ERR delivery failed: F of COUNT ...".
 *   produce_one TOPIC PARTITION KEY VALUE    OK produced 1 PARTITION OFFSET
 *       VALUE is the rest of the line after the single space that follows
 *       KEY, sent byte for byte (invalid JSON is fine).  Special VALUEs:
 *       \null (NULL value, a tombstone), \empty (zero-length value),
 *       \big:N (N bytes of 'x').  KEY \null sends no key.  PARTITION -1
 *       lets the default (key hash) partitioner choose.
 *   produce_hdr TOPIC PARTITION KEY H=V[,H=V...] VALUE
 *                                            OK produced 1 PARTITION OFFSET
 *       As produce_one, with message headers.  A header written without
 *       '=' has a NULL value; names and values cannot hold ',' or spaces.
 *   produce_ts TOPIC PARTITION KEY TIMESTAMP_MS VALUE
 *                                            OK produced 1 PARTITION OFFSET
 *       As produce_one, with the message's CreateTime set to TIMESTAMP_MS
 *       (unix ms, any positive 64-bit value: one far beyond the range of
 *       timestamptz tests how the ingest treats it).
 *   down BROKER_ID / up BROKER_ID            OK  (-1 = all brokers)
 *       Disconnects the broker and refuses connections / accepts them
 *       again.  The mock does not move partition leadership.
 *   rtt BROKER_ID MS                         OK  (-1 = all brokers)
 *       Adds MS milliseconds of round-trip delay to every response.
 *   error APIKEY ERRCODE COUNT               OK
 *       The next COUNT requests with that Kafka ApiKey (0 Produce, 1 Fetch,
 *       2 ListOffsets, 3 Metadata, ...) fail with ERRCODE (numeric Kafka
 *       error code, e.g. 6 NOT_LEADER_OR_FOLLOWER; -195 = the broker drops
 *       the connection).
 *   clear APIKEY                             OK  (drops pending errors)
 *   wmarks TOPIC PARTITION                   OK LOW HIGH
 *       Log start and end offsets, from ListOffsets requests sent by the
 *       internal producer (5 s timeout).
 *   consume TOPIC PARTITION FROM MAX FILE [TIMEOUT_MS]
 *                                            OK consumed N NEXT
 *       Reads the partition from offset FROM (-2 = the log start) up to
 *       its end, or MAX messages, whichever comes first, and writes one
 *       line per message to FILE (created or truncated; a path without
 *       spaces).  NEXT is the offset to read next: the end offset when the
 *       end was reached, else the one after the last message read; N < MAX
 *       means the end was reached.  Each line has 8 tab-separated fields:
 *         PARTITION OFFSET KEY OUTBOX_ID BARRIER VALUE HEADERS TIMESTAMP
 *       OUTBOX_ID and BARRIER are the values of the headers spool-outbox-id
 *       and spool-barrier (\N when absent, the last one when a header
 *       repeats, empty for a NULL value); HEADERS is every header in order
 *       as NAME=VALUE joined by ',' (NAME alone for a NULL value, empty
 *       when there are none); TIMESTAMP is the message timestamp in unix
 *       ms (CreateTime, set by the producer; -1 when there is none).
 *       Fields are escaped as in COPY's text format:
 *       \N is NULL; \\, \t, \n and \r are a backslash, tab, newline and
 *       carriage return; any other byte below 0x20, 0x7f, and inside
 *       HEADERS also ',' and '=', are written \xHH.  Each command uses a
 *       fresh consumer without a group (no offsets committed,
 *       auto.offset.reset=error), so reading below the log start answers
 *       "ERR ... Offset out of range"; a partition the topic does not
 *       have answers ERR at once.  Reading is bounded by TIMEOUT_MS
 *       (default 30000; the metadata request before it by 10 s): "ERR timed
 *       out after N messages (next offset X)", FILE then holds those N.
 *       Any other consumer error also answers ERR (FILE keeps what was read
 *       before it).
 *   bootstrap                                OK 127.0.0.1:p1,...
 *   proxy                                    OK 127.0.0.1:q1,...
 *       Starts (once) a proxy in front of the brokers and answers its
 *       bootstrap list.  Clients of the proxy see every broker at a proxy
 *       address, and the topics limited with "partitions" with fewer
 *       partitions (see "Metadata proxy" below).
 *   partitions TOPIC N                       OK
 *       Clients of the proxy see partitions 0 .. N-1 of TOPIC only (any N
 *       up to what the topic has; raise it to make partitions "appear",
 *       as when partitions are added to a topic).  The commands of this
 *       program (produce, wmarks, consume) always see every partition.
 *       The proxy also answers ListOffsets by timestamp (which the mock
 *       answers with -1) for partitions produce_ts wrote to: the first
 *       offset produce_ts wrote with a timestamp at or after the one asked.
 *   txn_init TXNID                           OK
 *   txn_commit TOPIC VALUE                   OK committed | ERR [fatal: ]...
 *   txn_close                                OK
 *       A transactional producer of the test's own, through the proxy when
 *       it runs: txn_init calls init_transactions with TXNID (fencing the
 *       older producer of that id), txn_commit produces VALUE to partition 0
 *       in a transaction and commits it.  Used as the "zombie" of a
 *       dispatcher's transactional id.
 *   committed GROUP TOPIC PARTITION          OK OFFSET METADATA
 *       The offset GROUP committed for the partition (-1 when none).
 *   txnstat                                  OK FENCED COMMITS
 *       Requests the proxy fenced, and offsets it committed at EndTxn (see
 *       "Transactions through the proxy").
 *   quit  (or EOF on stdin)                  OK, then the cluster is
 *       destroyed and the program exits 0.  SIGTERM and SIGINT also make it
 *       shut down cleanly and exit 0 (no answer line).
 *   Empty lines are ignored (no answer).  ERR reasons are one line; a
 *   command interrupted by SIGTERM/SIGINT answers "ERR interrupted".
 *
 * LISTENERS
 *   librdkafka 2.0.2's mock brokers bind to INADDR_LOOPBACK with an
 *   ephemeral port (checked with `ss -ltnp`: 127.0.0.1:<port> only, one
 *   listener per broker).  The program also checks every entry of the
 *   bootstrap list and refuses to run if one is not 127.0.0.1.
 *
 * RETENTION ("holes" below the log start)
 *   The mock keeps at most 5 MiB (5242880 bytes) or 100000 message sets
 *   (batches, not messages) per partition; when an append goes over either
 *   limit, the oldest whole batches are dropped and the low watermark moves
 *   forward.  Measured with librdkafka 2.0.2 and SIZE 200 (a record then
 *   takes ~215 bytes in its batch, and the default batch.size of 1 MB holds
 *   ~4655 of them): low stays 0 up to ~24300 messages (~5.2 MB) in one
 *   partition, and the next batch moves it to 4655; "produce t 30000 0"
 *   into an empty single partition leaves "wmarks t 0" at OK 9305 30000,
 *   "produce t 20000 0" leaves OK 0 20000.  So: produce a bit more than
 *   5 MiB of record data into one partition to move low; it moves in steps
 *   of whole batches, so read the exact value with wmarks.  The 100000
 *   message-set limit only matters for ~100k separate produce_one calls.
 *   A consumer that fetches below the low watermark gets
 *   OFFSET_OUT_OF_RANGE from the mock, as from a real broker (kcat: with
 *   auto.offset.reset=error it reports "Offset out of range"; with the
 *   defaults it resets to the end, or to low with earliest).
 *
 * OTHER MOCK BEHAVIOUR WORTH KNOWING
 *   - The mock brokers leave Nagle's algorithm on; this program turns it
 *     off on their connections (TCP_NODELAY, as a real broker does), or a
 *     client waiting for several responses stalls ~40 ms per round.
 *   - Unknown topics are auto-created (4 partitions) by any metadata
 *     request, so "wmarks nosuch 0" answers OK 0 0.
 *   - "down" does not move leadership: requests for partitions led by a
 *     down broker fail or wait.  wmarks then answers "ERR Local: Timed out"
 *     after 5 s, produce fails on metadata or after --message-timeout.
 *   - Retriable injected errors (e.g. "error 0 6 2") are retried by the
 *     internal producer, so the produce command still answers OK.
 *
 * DRIVING IT FROM BASH
 *   With a coproc (bash >= 4):
 *
 *     coproc KMOCK { exec ./spool_kafka_mock --quiet --topic t1:4; }
 *     read -t 10 -r tag BOOTSTRAP <&"${KMOCK[0]}"    # tag == BOOTSTRAP
 *     kcmd() { echo "$*" >&"${KMOCK[1]}";
 *              read -t 120 -r REPLY <&"${KMOCK[0]}" && echo "$REPLY"; }
 *     kcmd produce t1 1000           # -> OK produced 1000
 *     kcmd wmarks t1 0               # -> OK 0 250
 *     kcmd quit; wait "$KMOCK_PID"
 *
 *   ("exec" makes $KMOCK_PID the program itself, so that "kill -TERM
 *   $KMOCK_PID" reaches it.  Do not pipe the driving script's output into
 *   another command without stopping the program: it keeps that pipe open.)
 *
 *   With fifos (any POSIX shell; keep both ends open with exec):
 *
 *     d=$(mktemp -d); mkfifo "$d/in" "$d/out"
 *     ./spool_kafka_mock --quiet --topic t1:4 <"$d/in" >"$d/out" & pid=$!
 *     exec 7>"$d/in" 8<"$d/out"
 *     read -r tag BOOTSTRAP <&8
 *     echo "produce t1 1000" >&7; read -r reply <&8; echo "$reply"
 *     echo quit >&7; read -r reply <&8; exec 7>&- 8<&-; wait $pid
 *
 *   selftest.sh next to this file uses the coproc recipe.
 *
 * BUILD
 *   make            (cc -O2 -Wall -Wextra -std=c99 ... -lrdkafka)
 */

#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

/* Limits that keep every loop and buffer bounded. */
#define MAX_LINE          (4 * 1024 * 1024)  /* one command line */
#define MAX_TOPICS_ARG    64                 /* --topic options */
#define MAX_PARTITIONS    10000
#define MAX_BROKERS       32
#define MAX_COUNT         100000000L         /* messages per produce */
#define MAX_VALUE_SIZE    (64 * 1024 * 1024) /* bytes per generated value */
#define MAX_ERRORS_PUSHED 100000
#define MAX_HEADERS       64
#define META_TIMEOUT_MS   10000
#define WMARK_TIMEOUT_MS  5000
#define POLL_TICK_MS      200
#define CONSUME_TIMEOUT_MS 30000
#define MAX_CONSUME_MS    3600000

/* Set by the SIGTERM/SIGINT handler; checked by every waiting loop. */
static volatile sig_atomic_t stop_requested = 0;

static int quiet = 0;

static void proxy_note_time(const char *topic, int32_t partition, int64_t offset,
							int64_t ts);

/* Global state: the mock cluster, its owner handle and our producer. */
static struct {
	rd_kafka_t *owner;             /* handle the mock cluster hangs off */
	rd_kafka_mock_cluster_t *mc;
	rd_kafka_t *producer;          /* internal producer for produce/wmarks */
	char bootstrap[4096];
	int brokers;
	int message_timeout_ms;
} g;

/* Delivery report bookkeeping for the command in progress. */
static struct {
	long delivered;
	long failed;
	rd_kafka_resp_err_t first_err;
	int32_t last_partition;
	int64_t last_offset;
} dr;

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */
/* ------------------------------------------------------------------ */

static void
on_signal(int sig)
{
	(void) sig;
	stop_requested = 1;
}

static int64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t
wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Print one protocol line on stdout and flush it. */
static void
reply(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static void
note(const char *fmt, ...)
{
	va_list ap;

	if (quiet)
		return;
	va_start(ap, fmt);
	fputs("spool_kafka_mock: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* Parse a whole string as a long within [lo, hi]; 0 on success. */
static int
parse_long(const char *s, long lo, long hi, long *out)
{
	char *end;
	long v;

	if (s == NULL || *s == '\0')
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

/*
 * Split off the next space-separated token of *p.  Leading spaces are
 * skipped; the token is NUL-terminated in place and *p is left just after
 * the single space that ended it (so the remainder can be taken verbatim).
 * Returns NULL when there is no token left.
 */
static char *
next_token(char **p)
{
	char *s = *p;
	char *tok;

	while (*s == ' ' || *s == '\t')
		s++;
	if (*s == '\0')
	{
		*p = s;
		return NULL;
	}
	tok = s;
	while (*s != '\0' && *s != ' ' && *s != '\t')
		s++;
	if (*s != '\0')
		*s++ = '\0';
	*p = s;
	return tok;
}

/* librdkafka log callback: stderr unless --quiet. */
static void
log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	if (quiet)
		return;
	fprintf(stderr, "spool_kafka_mock: rdkafka %d %s %s: %s\n",
			level, rd_kafka_name(rk), fac, buf);
}

/* Delivery report callback: called from rd_kafka_poll()/flush(). */
static void
dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void) rk;
	(void) opaque;
	if (m->err)
	{
		if (dr.failed == 0)
			dr.first_err = m->err;
		dr.failed++;
	}
	else
	{
		dr.delivered++;
		dr.last_partition = m->partition;
		dr.last_offset = m->offset;
	}
}

static void
dr_reset(void)
{
	memset(&dr, 0, sizeof(dr));
	dr.last_partition = -1;
	dr.last_offset = -1;
}

static int
conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) !=
		RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "spool_kafka_mock: config %s=%s: %s\n",
				name, value, errstr);
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------ */
/* Cluster and producer set-up                                          */
/* ------------------------------------------------------------------ */

/*
 * Check that every "host:port" of the bootstrap list is on 127.0.0.1.
 */
static int
bootstrap_is_loopback(const char *list)
{
	const char *p = list;
	int n = 0;

	while (*p != '\0' && n < 1000)
	{
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t) (comma - p) : strlen(p);

		if (len < 11 || strncmp(p, "127.0.0.1:", 10) != 0)
			return 0;
		n++;
		if (comma == NULL)
			break;
		p = comma + 1;
	}
	return n > 0;
}

static rd_kafka_t *
new_handle_type(rd_kafka_type_t type, rd_kafka_conf_t *conf, const char *what)
{
	char errstr[512];
	rd_kafka_t *rk;

	rk = rd_kafka_new(type, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "spool_kafka_mock: creating %s: %s\n", what, errstr);
		rd_kafka_conf_destroy(conf);
	}
	return rk;
}

static rd_kafka_t *
new_handle(rd_kafka_conf_t *conf, const char *what)
{
	return new_handle_type(RD_KAFKA_PRODUCER, conf, what);
}

/*
 * librdkafka 2.0.2's mock leaves Nagle's algorithm on for the connections
 * its brokers accept (a real broker turns it off).  A client that sends a
 * request and waits for several responses (a batch to many partitions)
 * then waits ~40 ms per round for its own delayed ACK.  This thread sets
 * TCP_NODELAY on every TCP socket of this process whose local port is a
 * broker's, every 20 ms, as a broker does on accept.
 */
static int nodelay_ports[MAX_BROKERS];
static int nodelay_nports;

static void *
nodelay_main(void *arg)
{
	(void) arg;
	while (!stop_requested)
	{
		DIR *d = opendir("/proc/self/fd");
		struct dirent *e;

		while (d != NULL && (e = readdir(d)) != NULL)
		{
			int fd = atoi(e->d_name), i, on = 1, cur = 0;
			struct stat st;
			struct sockaddr_in a;
			socklen_t alen = sizeof(a), olen = sizeof(cur);

			if (e->d_name[0] < '0' || e->d_name[0] > '9' || fstat(fd, &st) != 0 ||
				!S_ISSOCK(st.st_mode) || getsockname(fd, (struct sockaddr *) &a, &alen) != 0 ||
				a.sin_family != AF_INET)
				continue;
			for (i = 0; i < nodelay_nports; i++)
				if (ntohs(a.sin_port) == nodelay_ports[i] &&
					getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &cur, &olen) == 0 && !cur)
					(void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
		}
		struct timespec tick = {0, 20 * 1000 * 1000};

		if (d != NULL)
			closedir(d);
		nanosleep(&tick, NULL);
	}
	return NULL;
}

static void
start_nodelay(void)
{
	char *list = strdup(g.bootstrap), *save = NULL, *item;
	pthread_t t;

	for (item = strtok_r(list, ",", &save); item && nodelay_nports < MAX_BROKERS;
		 item = strtok_r(NULL, ",", &save))
	{
		char *colon = strrchr(item, ':');

		if (colon)
			nodelay_ports[nodelay_nports++] = atoi(colon + 1);
	}
	free(list);
	if (pthread_create(&t, NULL, nodelay_main, NULL) == 0)
		pthread_detach(t);
}

static int
setup_cluster(int brokers)
{
	rd_kafka_conf_t *conf;
	char num[32];

	/*
	 * The owner handle only anchors the mock cluster; it never connects
	 * anywhere.  It must stay alive until the cluster is destroyed.
	 */
	conf = rd_kafka_conf_new();
	rd_kafka_conf_set_log_cb(conf, log_cb);
	if (conf_set(conf, "client.id", "spool_kafka_mock_owner") != 0 ||
		/* silence its "no bootstrap.servers" notice */
		conf_set(conf, "log_level", "4") != 0)
	{
		rd_kafka_conf_destroy(conf);
		return -1;
	}
	g.owner = new_handle(conf, "mock owner handle");
	if (g.owner == NULL)
		return -1;

	g.mc = rd_kafka_mock_cluster_new(g.owner, brokers);
	if (g.mc == NULL)
	{
		fprintf(stderr, "spool_kafka_mock: rd_kafka_mock_cluster_new failed\n");
		return -1;
	}
	g.brokers = brokers;
	snprintf(g.bootstrap, sizeof(g.bootstrap), "%s",
			 rd_kafka_mock_cluster_bootstraps(g.mc));
	if (!bootstrap_is_loopback(g.bootstrap))
	{
		fprintf(stderr, "spool_kafka_mock: mock listeners are not all on "
				"127.0.0.1: %s\n", g.bootstrap);
		return -1;
	}

	/*
	 * The internal producer: acks=all, a short linger for batching, and
	 * queues large enough that 200k-message bursts rarely hit QUEUE_FULL.
	 */
	conf = rd_kafka_conf_new();
	rd_kafka_conf_set_log_cb(conf, log_cb);
	rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
	snprintf(num, sizeof(num), "%d", g.message_timeout_ms);
	if (conf_set(conf, "bootstrap.servers", g.bootstrap) != 0 ||
		conf_set(conf, "client.id", "spool_kafka_mock_producer") != 0 ||
		conf_set(conf, "acks", "all") != 0 ||
		conf_set(conf, "linger.ms", "5") != 0 ||
		conf_set(conf, "batch.num.messages", "10000") != 0 ||
		conf_set(conf, "queue.buffering.max.messages", "1000000") != 0 ||
		conf_set(conf, "queue.buffering.max.kbytes", "1048576") != 0 ||
		conf_set(conf, "message.max.bytes", "100000000") != 0 ||
		conf_set(conf, "message.timeout.ms", num) != 0 ||
		conf_set(conf, "topic.metadata.refresh.interval.ms", "10000") != 0)
	{
		rd_kafka_conf_destroy(conf);
		return -1;
	}
	g.producer = new_handle(conf, "internal producer");
	if (g.producer == NULL)
		return -1;
	return 0;
}

static void
teardown(void)
{
	if (g.producer != NULL)
	{
		/* Bounded: anything still queued is purged, not waited for. */
		rd_kafka_purge(g.producer,
					   RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
		rd_kafka_flush(g.producer, 1000);
		rd_kafka_destroy(g.producer);
		g.producer = NULL;
	}
	if (g.mc != NULL)
	{
		rd_kafka_mock_cluster_destroy(g.mc);
		g.mc = NULL;
	}
	if (g.owner != NULL)
	{
		rd_kafka_destroy(g.owner);
		g.owner = NULL;
	}
}

static rd_kafka_resp_err_t
create_topic(const char *name, int partitions)
{
	int rf = g.brokers < 3 ? g.brokers : 3;

	return rd_kafka_mock_topic_create(g.mc, name, partitions, rf);
}

/* ------------------------------------------------------------------ */
/* Producing                                                            */
/* ------------------------------------------------------------------ */

/*
 * Wait until every queued message got its delivery report, at most until
 * deadline (monotonic ms) or a stop request.  Whatever is left then is
 * purged so that it cannot leak into the next command's counters.
 * Returns 0 when everything was reported, -1 otherwise.
 */
static int
wait_delivered(int64_t deadline)
{
	int i;

	while (rd_kafka_outq_len(g.producer) > 0 && !stop_requested &&
		   mono_ms() < deadline)
		rd_kafka_flush(g.producer, POLL_TICK_MS);
	if (rd_kafka_outq_len(g.producer) == 0)
		return 0;

	rd_kafka_purge(g.producer,
				   RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	/* Serve the purge delivery reports, bounded. */
	for (i = 0; i < 50 && rd_kafka_outq_len(g.producer) > 0; i++)
		rd_kafka_flush(g.producer, 100);
	return -1;
}

/* Number of partitions of topic from broker metadata asked by rk, or -1. */
static int
topic_partitions(rd_kafka_t *rk, const char *topic, char *why, size_t whylen)
{
	rd_kafka_topic_t *rkt;
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR__TIMED_OUT;
	int n = -1;
	int i;

	rkt = rd_kafka_topic_new(rk, topic, NULL);
	if (rkt == NULL)
	{
		snprintf(why, whylen, "bad topic: %s",
				 rd_kafka_err2str(rd_kafka_last_error()));
		return -1;
	}
	/* In one-second slices, so that a stop request is noticed. */
	for (i = 0; i < META_TIMEOUT_MS / 1000; i++)
	{
		err = rd_kafka_metadata(rk, 0, rkt, &md, 1000);
		if (err != RD_KAFKA_RESP_ERR__TIMED_OUT &&
			err != RD_KAFKA_RESP_ERR__TRANSPORT)
			break;
		if (stop_requested)
			break;
	}
	if (err)
		snprintf(why, whylen, "metadata: %s", rd_kafka_err2str(err));
	else if (md->topic_cnt != 1)
		snprintf(why, whylen, "metadata: %d topics returned", md->topic_cnt);
	else if (md->topics[0].err)
		snprintf(why, whylen, "metadata: %s",
				 rd_kafka_err2str(md->topics[0].err));
	else
		n = md->topics[0].partition_cnt;
	if (md != NULL)
		rd_kafka_metadata_destroy(md);
	rd_kafka_topic_destroy(rkt);
	if (n == 0)
	{
		snprintf(why, whylen, "topic has no partitions");
		n = -1;
	}
	return n;
}

/*
 * Enqueue one message, retrying while the local queue is full (serving
 * delivery reports meanwhile).  Returns 0 or the error.
 */
static rd_kafka_resp_err_t
enqueue(const char *topic, int32_t partition,
		const void *key, size_t keylen, const void *val, size_t vallen,
		rd_kafka_headers_t *hdrs, int64_t timestamp, int64_t deadline)
{
	rd_kafka_resp_err_t err;

	for (;;)
	{
		if (hdrs != NULL)
			err = rd_kafka_producev(g.producer,
									RD_KAFKA_V_TOPIC(topic),
									RD_KAFKA_V_PARTITION(partition),
									RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
									RD_KAFKA_V_KEY(key, keylen),
									RD_KAFKA_V_VALUE((void *) val, vallen),
									RD_KAFKA_V_HEADERS(hdrs),
									RD_KAFKA_V_TIMESTAMP(timestamp),
									RD_KAFKA_V_END);
		else
			err = rd_kafka_producev(g.producer,
									RD_KAFKA_V_TOPIC(topic),
									RD_KAFKA_V_PARTITION(partition),
									RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
									RD_KAFKA_V_KEY(key, keylen),
									RD_KAFKA_V_VALUE((void *) val, vallen),
									RD_KAFKA_V_TIMESTAMP(timestamp),
									RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			return err;
		if (stop_requested || mono_ms() >= deadline)
			return err;
		rd_kafka_poll(g.producer, 10);
	}
}

/* produce TOPIC COUNT [PARTITION] [SIZE] [START] */
static void
cmd_produce(char *args)
{
	char *topic = next_token(&args);
	char *s_count = next_token(&args);
	char *s_part = next_token(&args);
	char *s_size = next_token(&args);
	char *s_start = next_token(&args);
	long count, part = -1, size = 200, start = 0;
	int nparts;
	char why[512];
	char *buf = NULL;
	long i, enq = 0;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	int64_t deadline;

	if (topic == NULL || parse_long(s_count, 0, MAX_COUNT, &count) != 0 ||
		(s_part && parse_long(s_part, -1, MAX_PARTITIONS - 1, &part) != 0) ||
		(s_size && parse_long(s_size, 0, MAX_VALUE_SIZE, &size) != 0) ||
		(s_start && parse_long(s_start, 0, LONG_MAX - MAX_COUNT, &start) != 0) ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: produce TOPIC COUNT [PARTITION] [SIZE] [START]");
		return;
	}
	nparts = topic_partitions(g.producer, topic, why, sizeof(why));
	if (nparts < 0)
	{
		reply("ERR %s", why);
		return;
	}
	if (part >= nparts)
	{
		reply("ERR partition %ld out of range (topic has %d)", part, nparts);
		return;
	}
	buf = malloc((size_t) size + 256);
	if (buf == NULL)
	{
		reply("ERR out of memory");
		return;
	}

	dr_reset();
	deadline = mono_ms() + g.message_timeout_ms + 10000;
	for (i = 0; i < count && !stop_requested; i++)
	{
		long seq = start + i;
		char key[32];
		int keylen, len;
		long pad;

		keylen = snprintf(key, sizeof(key), "k%ld", seq);
		len = snprintf(buf, 256,
					   "{\"seq\":%ld,\"key\":\"k%ld\",\"amount\":%ld,"
					   "\"ts\":%lld,\"pad\":\"",
					   seq, seq, seq % 1000, (long long) wall_ms());
		/* Pad so that the whole value is about size bytes. */
		pad = size - len - 2;
		if (pad > 0)
		{
			memset(buf + len, 'x', (size_t) pad);
			len += (int) pad;
		}
		buf[len++] = '"';
		buf[len++] = '}';

		err = enqueue(topic, (int32_t) (part >= 0 ? part : seq % nparts),
					  key, (size_t) keylen, buf, (size_t) len, NULL, 0, deadline);
		if (err)
			break;
		enq++;
		/* Serve delivery reports now and then to keep memory flat. */
		if ((i & 1023) == 1023)
			rd_kafka_poll(g.producer, 0);
	}
	free(buf);

	if (wait_delivered(deadline) != 0 && !stop_requested)
		note("produce: purged undelivered messages after timeout");
	if (stop_requested)
		reply("ERR interrupted");
	else if (err)
		reply("ERR enqueue failed after %ld of %ld messages: %s",
			  enq, count, rd_kafka_err2str(err));
	else if (dr.delivered != count)
		reply("ERR delivery failed: %ld of %ld messages not delivered "
			  "(first error: %s)", count - dr.delivered, count,
			  dr.failed ? rd_kafka_err2str(dr.first_err) : "timed out");
	else
		reply("OK produced %ld", count);
}

/*
 * Interpret a KEY or VALUE argument with its escapes.  On success sets
 * *out and *outlen (*out is NULL for \null) and returns 0; *to_free is set to
 * memory the caller must free.
 */
static int
special_bytes(const char *arg, int allow_big, const char **out,
			  size_t *outlen, char **to_free, char *why, size_t whylen)
{
	long n;

	*to_free = NULL;
	if (strcmp(arg, "\\null") == 0)
	{
		*out = NULL;
		*outlen = 0;
		return 0;
	}
	if (strcmp(arg, "\\empty") == 0)
	{
		*out = "";
		*outlen = 0;
		return 0;
	}
	if (allow_big && strncmp(arg, "\\big:", 5) == 0)
	{
		if (parse_long(arg + 5, 0, 1000000000L - 1, &n) != 0)
		{
			snprintf(why, whylen, "bad \\big:N size");
			return -1;
		}
		*to_free = malloc((size_t) n + 1);
		if (*to_free == NULL)
		{
			snprintf(why, whylen, "out of memory");
			return -1;
		}
		memset(*to_free, 'x', (size_t) n);
		*out = *to_free;
		*outlen = (size_t) n;
		return 0;
	}
	*out = arg;
	*outlen = strlen(arg);
	return 0;
}

/* Parse "H=V,H2=V2" (NAME without '=' = NULL value) into headers. */
static rd_kafka_headers_t *
parse_headers(char *spec, char *why, size_t whylen)
{
	rd_kafka_headers_t *hdrs = rd_kafka_headers_new(8);
	char *item = spec;
	int n = 0;

	while (item != NULL && *item != '\0')
	{
		char *comma = strchr(item, ',');
		char *eq;
		rd_kafka_resp_err_t err;

		if (++n > MAX_HEADERS)
		{
			snprintf(why, whylen, "too many headers (max %d)", MAX_HEADERS);
			rd_kafka_headers_destroy(hdrs);
			return NULL;
		}
		if (comma != NULL)
			*comma = '\0';
		eq = strchr(item, '=');
		if (eq != NULL)
		{
			*eq = '\0';
			err = rd_kafka_header_add(hdrs, item, -1, eq + 1, -1);
		}
		else
			err = rd_kafka_header_add(hdrs, item, -1, NULL, 0);
		if (err || *item == '\0')
		{
			snprintf(why, whylen, "bad header '%s'", item);
			rd_kafka_headers_destroy(hdrs);
			return NULL;
		}
		item = comma ? comma + 1 : NULL;
	}
	return hdrs;
}

/*
 * produce_one TOPIC PARTITION KEY VALUE
 * produce_hdr TOPIC PARTITION KEY HEADERS VALUE
 * produce_ts TOPIC PARTITION KEY TIMESTAMP_MS VALUE
 */
static void
cmd_produce_single(char *args, int with_headers, int with_timestamp)
{
	const char *usage = with_headers
		? "ERR usage: produce_hdr TOPIC PARTITION KEY H=V[,H=V...] VALUE"
		: with_timestamp ? "ERR usage: produce_ts TOPIC PARTITION KEY TIMESTAMP_MS VALUE"
		: "ERR usage: produce_one TOPIC PARTITION KEY VALUE";
	char *topic = next_token(&args);
	char *s_part = next_token(&args);
	char *s_key = next_token(&args);
	char *s_hdrs = with_headers ? next_token(&args) : NULL;
	char *s_ts = with_timestamp ? next_token(&args) : NULL;
	char *s_val = args;          /* the rest of the line, verbatim */
	long long timestamp = 0;
	char *end = NULL;
	long part;
	const char *key, *val;
	size_t keylen, vallen;
	char *key_free = NULL, *val_free = NULL;
	rd_kafka_headers_t *hdrs = NULL;
	rd_kafka_resp_err_t err;
	char why[512];
	int64_t deadline;

	if (topic == NULL || s_key == NULL ||
		parse_long(s_part, -1, MAX_PARTITIONS - 1, &part) != 0 ||
		(with_headers && s_hdrs == NULL) ||
		(with_timestamp && (s_ts == NULL ||
							(timestamp = strtoll(s_ts, &end, 10)) <= 0 || *end != '\0')))
	{
		reply("%s", usage);
		return;
	}
	if (special_bytes(s_key, 0, &key, &keylen, &key_free, why,
					  sizeof(why)) != 0 ||
		special_bytes(s_val, 1, &val, &vallen, &val_free, why,
					  sizeof(why)) != 0)
	{
		reply("ERR %s", why);
		goto done;
	}
	if (with_headers)
	{
		hdrs = parse_headers(s_hdrs, why, sizeof(why));
		if (hdrs == NULL)
		{
			reply("ERR %s", why);
			goto done;
		}
	}

	dr_reset();
	deadline = mono_ms() + g.message_timeout_ms + 10000;
	err = enqueue(topic, part < 0 ? RD_KAFKA_PARTITION_UA : (int32_t) part,
				  key, keylen, val, vallen, hdrs, timestamp, deadline);
	if (err)
	{
		/* On failure the headers are still ours to free. */
		reply("ERR enqueue failed: %s", rd_kafka_err2str(err));
		goto done;
	}
	hdrs = NULL;                 /* owned by librdkafka now */
	wait_delivered(deadline);
	if (stop_requested)
		reply("ERR interrupted");
	else if (dr.delivered != 1)
		reply("ERR delivery failed: %s",
			  dr.failed ? rd_kafka_err2str(dr.first_err) : "timed out");
	else
	{
		if (with_timestamp)
			proxy_note_time(topic, dr.last_partition, dr.last_offset, timestamp);
		reply("OK produced 1 %d %lld", (int) dr.last_partition,
			  (long long) dr.last_offset);
	}
done:
	if (hdrs != NULL)
		rd_kafka_headers_destroy(hdrs);
	free(key_free);
	free(val_free);
}

/* ------------------------------------------------------------------ */
/* Other commands                                                       */
/* ------------------------------------------------------------------ */

static void
cmd_topic(char *args)
{
	char *name = next_token(&args);
	long n;
	rd_kafka_resp_err_t err;

	if (name == NULL ||
		parse_long(next_token(&args), 1, MAX_PARTITIONS, &n) != 0 ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: topic NAME PARTITIONS");
		return;
	}
	err = create_topic(name, (int) n);
	if (err)
		reply("ERR %s", rd_kafka_err2str(err));
	else
		reply("OK");
}

/* down / up / rtt: per-broker switches.  which: 'd', 'u' or 'r'. */
static void
cmd_broker(char *args, char which)
{
	long id, ms = 0;
	rd_kafka_resp_err_t err;

	if (parse_long(next_token(&args), -1, MAX_BROKERS, &id) != 0 ||
		(which == 'r' &&
		 parse_long(next_token(&args), 0, 3600000, &ms) != 0) ||
		next_token(&args) != NULL)
	{
		reply(which == 'r' ? "ERR usage: rtt BROKER_ID MS"
			  : which == 'd' ? "ERR usage: down BROKER_ID"
			  : "ERR usage: up BROKER_ID");
		return;
	}
	if (id == 0 || id > g.brokers)
	{
		reply("ERR no broker %ld (ids are 1..%d, -1 = all)", id, g.brokers);
		return;
	}
	if (which == 'd')
		err = rd_kafka_mock_broker_set_down(g.mc, (int32_t) id);
	else if (which == 'u')
		err = rd_kafka_mock_broker_set_up(g.mc, (int32_t) id);
	else
		err = rd_kafka_mock_broker_set_rtt(g.mc, (int32_t) id, (int) ms);
	if (err)
		reply("ERR %s", rd_kafka_err2str(err));
	else
		reply("OK");
}

/* error APIKEY ERRCODE COUNT */
static void
cmd_error(char *args)
{
	long apikey, code, count, i;
	rd_kafka_resp_err_t *errs;

	if (parse_long(next_token(&args), 0, 32767, &apikey) != 0 ||
		parse_long(next_token(&args), -200, 32767, &code) != 0 ||
		parse_long(next_token(&args), 1, MAX_ERRORS_PUSHED, &count) != 0 ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: error APIKEY ERRCODE COUNT");
		return;
	}
	errs = malloc(sizeof(*errs) * (size_t) count);
	if (errs == NULL)
	{
		reply("ERR out of memory");
		return;
	}
	for (i = 0; i < count; i++)
		errs[i] = (rd_kafka_resp_err_t) code;
	rd_kafka_mock_push_request_errors_array(g.mc, (int16_t) apikey,
											(size_t) count, errs);
	free(errs);
	reply("OK");
}

/* clear APIKEY */
static void
cmd_clear(char *args)
{
	long apikey;

	if (parse_long(next_token(&args), 0, 32767, &apikey) != 0 ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: clear APIKEY");
		return;
	}
	rd_kafka_mock_clear_request_errors(g.mc, (int16_t) apikey);
	reply("OK");
}

/*
 * One ListOffsets query: the offset at "timestamp" -2 (earliest = low
 * watermark) or -1 (latest = high watermark) of topic/partition.
 *
 * rd_kafka_query_watermark_offsets() is not used: in librdkafka 2.0.2 it
 * does not honour its timeout when the partition leader is down (it waits
 * for the ListOffsets replies, which never come while the broker refuses
 * connections), and since the main thread would be stuck there, the "up"
 * command that could end the wait would never be read.
 * rd_kafka_offsets_for_times() with the special timestamps sends the same
 * request but gives up after timeout_ms.
 */
static rd_kafka_resp_err_t
list_offset(const char *topic, int32_t partition, int64_t which,
			int64_t *out)
{
	rd_kafka_topic_partition_list_t *parts;
	rd_kafka_resp_err_t err;

	parts = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(parts, topic, partition)->offset = which;
	err = rd_kafka_offsets_for_times(g.producer, parts, WMARK_TIMEOUT_MS);
	if (!err)
		err = parts->elems[0].err;
	if (!err)
		*out = parts->elems[0].offset;
	rd_kafka_topic_partition_list_destroy(parts);
	return err;
}

/* wmarks TOPIC PARTITION */
static void
cmd_wmarks(char *args)
{
	char *topic = next_token(&args);
	long part;
	int64_t lo = -1, hi = -1;
	rd_kafka_resp_err_t err;

	if (topic == NULL ||
		parse_long(next_token(&args), 0, MAX_PARTITIONS - 1, &part) != 0 ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: wmarks TOPIC PARTITION");
		return;
	}
	err = list_offset(topic, (int32_t) part, RD_KAFKA_OFFSET_BEGINNING, &lo);
	if (!err)
		err = list_offset(topic, (int32_t) part, RD_KAFKA_OFFSET_END, &hi);
	if (err)
		reply("ERR %s", rd_kafka_err2str(err));
	else
		reply("OK %lld %lld", (long long) lo, (long long) hi);
}

/* ------------------------------------------------------------------ */
/* Consuming                                                            */
/* ------------------------------------------------------------------ */

/*
 * Write len bytes escaped for one field of a consume line (see the
 * protocol comment); in_headers also escapes ',' and '='.  NULL is \N.
 */
static void
put_field(FILE *f, const void *data, size_t len, int in_headers)
{
	const unsigned char *p = data;
	size_t i;

	if (data == NULL)
	{
		fputs("\\N", f);
		return;
	}
	for (i = 0; i < len; i++)
	{
		unsigned char c = p[i];

		if (c == '\\')
			fputs("\\\\", f);
		else if (c == '\t')
			fputs("\\t", f);
		else if (c == '\n')
			fputs("\\n", f);
		else if (c == '\r')
			fputs("\\r", f);
		else if (c < 0x20 || c == 0x7f ||
				 (in_headers && (c == ',' || c == '=')))
			fprintf(f, "\\x%02x", c);
		else
			fputc(c, f);
	}
}

/* One consume line for message m. */
static void
put_message(FILE *f, rd_kafka_message_t *m)
{
	rd_kafka_headers_t *hdrs = NULL;
	const char *names[2] = {"spool-outbox-id", "spool-barrier"};
	int i;

	fprintf(f, "%d\t%lld\t", (int) m->partition, (long long) m->offset);
	put_field(f, m->key, m->key_len, 0);
	if (rd_kafka_message_headers(m, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
		hdrs = NULL;
	for (i = 0; i < 2; i++)
	{
		const void *v = NULL;
		size_t vlen = 0;

		fputc('\t', f);
		if (hdrs == NULL ||
			rd_kafka_header_get_last(hdrs, names[i], &v, &vlen) !=
			RD_KAFKA_RESP_ERR_NO_ERROR)
			v = NULL;
		/* A header that is present with a NULL value reads as empty. */
		else if (v == NULL)
			v = "";
		put_field(f, v, vlen, 0);
	}
	fputc('\t', f);
	put_field(f, m->payload, m->len, 0);
	fputc('\t', f);
	if (hdrs != NULL)
	{
		const char *name;
		const void *v;
		size_t vlen;
		size_t idx;

		for (idx = 0; rd_kafka_header_get_all(hdrs, idx, &name, &v, &vlen) ==
			 RD_KAFKA_RESP_ERR_NO_ERROR; idx++)
		{
			if (idx > 0)
				fputc(',', f);
			put_field(f, name, strlen(name), 1);
			if (v != NULL)
			{
				fputc('=', f);
				put_field(f, v, vlen, 1);
			}
		}
	}
	fprintf(f, "\t%lld\n", (long long) rd_kafka_message_timestamp(m, NULL));
}

/*
 * A consumer for one consume command.  It uses the simple (legacy)
 * consumer API: rd_kafka_assign() needs a group.id in librdkafka 2.0.2
 * ("Local: Unknown group"), and a group would need a coordinator and
 * commit offsets.  This one reads a partition from an explicit offset and
 * nothing else.  It is created per command so that no idle client keeps
 * sending Metadata/Fetch requests that could take errors injected with
 * the error command.
 */
static rd_kafka_t *
new_consumer(char *why, size_t whylen)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;

	rd_kafka_conf_set_log_cb(conf, log_cb);
	if (conf_set(conf, "bootstrap.servers", g.bootstrap) != 0 ||
		conf_set(conf, "client.id", "spool_kafka_mock_consumer") != 0 ||
		conf_set(conf, "enable.partition.eof", "true") != 0 ||
		conf_set(conf, "enable.auto.commit", "false") != 0 ||
		conf_set(conf, "enable.auto.offset.store", "false") != 0 ||
		conf_set(conf, "auto.offset.reset", "error") != 0 ||
		conf_set(conf, "fetch.wait.max.ms", "100") != 0 ||
		conf_set(conf, "receive.message.max.bytes", "200000000") != 0)
	{
		rd_kafka_conf_destroy(conf);
		snprintf(why, whylen, "consumer configuration");
		return NULL;
	}
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, why, whylen);
	if (rk == NULL)
		rd_kafka_conf_destroy(conf);
	return rk;
}

/* consume TOPIC PARTITION FROM MAX FILE [TIMEOUT_MS] */
static void
cmd_consume(char *args)
{
	char *topic = next_token(&args);
	char *s_part = next_token(&args);
	char *s_from = next_token(&args);
	char *s_max = next_token(&args);
	char *path = next_token(&args);
	char *s_timeout = next_token(&args);
	long part, from, max, timeout = CONSUME_TIMEOUT_MS;
	long n = 0;
	int64_t next, deadline;
	rd_kafka_t *rk = NULL;
	rd_kafka_topic_t *rkt = NULL;
	FILE *f = NULL;
	char why[512];
	int nparts;
	int started = 0;

	if (topic == NULL ||
		parse_long(s_part, 0, MAX_PARTITIONS - 1, &part) != 0 ||
		parse_long(s_from, -2, LONG_MAX, &from) != 0 || from == -1 ||
		parse_long(s_max, 0, MAX_COUNT, &max) != 0 || path == NULL ||
		(s_timeout && parse_long(s_timeout, 1, MAX_CONSUME_MS, &timeout) != 0) ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: consume TOPIC PARTITION FROM MAX FILE [TIMEOUT_MS]"
			  " (FROM >= 0 or -2)");
		return;
	}
	f = fopen(path, "w");
	if (f == NULL)
	{
		reply("ERR cannot write %s: %s", path, strerror(errno));
		return;
	}
	next = from;
	if (max == 0)
		goto finish;

	rk = new_consumer(why, sizeof(why));
	if (rk == NULL)
	{
		reply("ERR creating consumer: %s", why);
		goto done;
	}
	nparts = topic_partitions(rk, topic, why, sizeof(why));
	if (nparts < 0)
	{
		reply("ERR %s", why);
		goto done;
	}
	if (part >= nparts)
	{
		reply("ERR partition %ld out of range (topic has %d)", part, nparts);
		goto done;
	}
	rkt = rd_kafka_topic_new(rk, topic, NULL);
	if (rkt == NULL)
	{
		reply("ERR bad topic: %s", rd_kafka_err2str(rd_kafka_last_error()));
		goto done;
	}
	if (rd_kafka_consume_start(rkt, (int32_t) part,
							   from == -2 ? RD_KAFKA_OFFSET_BEGINNING
							   : (int64_t) from) != 0)
	{
		reply("ERR consume_start: %s", rd_kafka_err2str(rd_kafka_last_error()));
		goto done;
	}
	started = 1;

	deadline = mono_ms() + timeout;
	while (n < max)
	{
		rd_kafka_message_t *m;
		int64_t left = deadline - mono_ms();

		if (stop_requested)
		{
			reply("ERR interrupted");
			goto done;
		}
		if (left <= 0)
		{
			reply("ERR timed out after %ld messages (next offset %lld)",
				  n, (long long) next);
			goto done;
		}
		m = rd_kafka_consume(rkt, (int32_t) part,
							 (int) (left < POLL_TICK_MS ? left : POLL_TICK_MS));
		if (m == NULL)
			continue;            /* tick: check the deadline and signals */
		if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
		{
			/*
			 * The EOF carries the end offset.  One for an offset before
			 * ours would be stale: then wait for more.
			 */
			int at_end = m->offset >= next;

			if (at_end)
				next = m->offset;
			rd_kafka_message_destroy(m);
			if (at_end)
				break;
			continue;
		}
		if (m->err)
		{
			reply("ERR after %ld messages (next offset %lld): %s",
				  n, (long long) next, rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
			goto done;
		}
		put_message(f, m);
		next = m->offset + 1;
		n++;
		rd_kafka_message_destroy(m);
	}

finish:
	if (fclose(f) != 0)
	{
		f = NULL;
		reply("ERR writing %s: %s", path, strerror(errno));
		goto done;
	}
	f = NULL;
	reply("OK consumed %ld %lld", n, (long long) next);

done:
	if (f != NULL)
		fclose(f);
	if (started)
		rd_kafka_consume_stop(rkt, (int32_t) part);
	if (rkt != NULL)
		rd_kafka_topic_destroy(rkt);
	if (rk != NULL)
		rd_kafka_destroy(rk);
}

/* ------------------------------------------------------------------ */
/* Metadata proxy: partitions that appear while clients run            */
/* ------------------------------------------------------------------ */

/*
 * librdkafka 2.0.2's mock cannot add partitions to a topic.  To let tests
 * watch a topic grow, "proxy" starts one TCP listener per broker in front
 * of the mock brokers (a thread of its own).  Bytes pass through unchanged
 * except the Metadata and FindCoordinator responses (ApiKeys 3 and 10,
 * v0-v2: the versions the mock answers), in which broker addresses are
 * replaced by the proxy's (so clients never learn the brokers' own) and, for
 * a topic limited with "partitions TOPIC N", partitions N and up are left
 * out.  A topic is created with its final partition count and announced
 * with fewer; raising N makes the rest appear, as CreatePartitions does on
 * a real cluster.  The internal producer talks to the brokers directly, so
 * it can write into partitions clients cannot see yet.
 */
#define PROXY_MAX_CONNS   256
#define PROXY_MAX_LIMITS  64
#define PROXY_MAX_FRAME   (64 * 1024 * 1024)
#define PROXY_PENDING     1024

typedef struct ProxyBuf
{
	unsigned char *data;
	size_t len;
	size_t cap;
} ProxyBuf;

typedef struct ProxyConn
{
	int client;
	int upstream;
	ProxyBuf from_client;          /* bytes not yet sent upstream */
	size_t noted;                  /* of which whole, noted requests */
	ProxyBuf from_upstream;        /* bytes not yet parsed */
	ProxyBuf to_client;            /* bytes not yet sent to the client */
	int32_t corr[PROXY_PENDING];   /* requests in flight: correlation id, */
	int64_t asked_ts[PROXY_PENDING];   /* ListOffsets: the (first) timestamp asked */
	int16_t key[PROXY_PENDING];    /* ApiKey and version */
	int16_t ver[PROXY_PENDING];
	int16_t txn[PROXY_PENDING];    /* transactions: index in px_txns, -1: none */
	int8_t commit[PROXY_PENDING];  /* EndTxn: commit (1) or abort (0) */
	int npending;
} ProxyConn;

static pthread_mutex_t px_lock = PTHREAD_MUTEX_INITIALIZER;	/* guards limits and times */

/*
 * The mock answers ListOffsets by timestamp with -1 (not implemented in
 * librdkafka 2.0.2).  The messages produce_ts wrote are remembered here,
 * and the proxy answers such a request from them as a broker does: the
 * first offset whose timestamp is at or after the one asked for.
 */
#define PROXY_MAX_TIMES 100000

typedef struct ProducedTime
{
	char topic[128];
	int32_t partition;
	int64_t offset;
	int64_t ts;
} ProducedTime;

static ProducedTime *px_times;
static int px_ntimes;

static void
proxy_note_time(const char *topic, int32_t partition, int64_t offset, int64_t ts)
{
	pthread_mutex_lock(&px_lock);
	if (px_times == NULL)
		px_times = calloc(PROXY_MAX_TIMES, sizeof(ProducedTime));
	if (px_times != NULL && px_ntimes < PROXY_MAX_TIMES && strlen(topic) < 128)
	{
		ProducedTime *t = &px_times[px_ntimes++];

		strcpy(t->topic, topic);
		t->partition = partition;
		t->offset = offset;
		t->ts = ts;
	}
	pthread_mutex_unlock(&px_lock);
}

/*
 * The first offset of topic/partition produced with a timestamp at or after
 * ts, and its timestamp; 0 when produce_ts wrote nothing there (then the
 * mock's answer stands), 1 when found, -1 when none is that late.
 */
static int
proxy_offset_for_time(const unsigned char *topic, int len, int32_t partition, int64_t ts,
					  int64_t *offset, int64_t *found_ts)
{
	int i, known = 0;

	*offset = -1;
	pthread_mutex_lock(&px_lock);
	for (i = 0; i < px_ntimes; i++)
	{
		ProducedTime *t = &px_times[i];

		if ((int) strlen(t->topic) != len || memcmp(t->topic, topic, (size_t) len) != 0 ||
			t->partition != partition)
			continue;
		known = 1;
		if (t->ts >= ts && (*offset < 0 || t->offset < *offset))
		{
			*offset = t->offset;
			*found_ts = t->ts;
		}
	}
	pthread_mutex_unlock(&px_lock);
	return known ? (*offset >= 0 ? 1 : -1) : 0;
}

static struct {
	pthread_t thread;
	int running;
	
	int nbrokers;
	int listen_fd[MAX_BROKERS];
	int listen_port[MAX_BROKERS];
	int upstream_port[MAX_BROKERS];
	char bootstrap[4096];
	char limit_topic[PROXY_MAX_LIMITS][256];
	int limit_count[PROXY_MAX_LIMITS];
	int nlimits;
	ProxyConn conns[PROXY_MAX_CONNS];
} px;

static int
buf_put(ProxyBuf *b, const void *data, size_t len)
{
	if (b->len + len > b->cap)
	{
		size_t cap = b->cap ? b->cap : 65536;
		unsigned char *d;

		while (cap < b->len + len)
			cap *= 2;
		d = realloc(b->data, cap);
		if (d == NULL)
			return -1;
		b->data = d;
		b->cap = cap;
	}
	memcpy(b->data + b->len, data, len);
	b->len += len;
	return 0;
}

static void
buf_drop(ProxyBuf *b, size_t n)
{
	memmove(b->data, b->data + n, b->len - n);
	b->len -= n;
}

static int32_t
rd32(const unsigned char *p)
{
	return (int32_t) (((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) |
					  ((uint32_t) p[2] << 8) | p[3]);
}

static int16_t
rd16(const unsigned char *p)
{
	return (int16_t) (((uint16_t) p[0] << 8) | p[1]);
}

static void
wr32(unsigned char *p, int32_t v)
{
	p[0] = (unsigned char) ((uint32_t) v >> 24);
	p[1] = (unsigned char) ((uint32_t) v >> 16);
	p[2] = (unsigned char) ((uint32_t) v >> 8);
	p[3] = (unsigned char) v;
}

/* Visible partitions of a topic; -1: all. */
static int
proxy_limit(const unsigned char *name, int len)
{
	int i, n = -1;

	pthread_mutex_lock(&px_lock);
	for (i = 0; i < px.nlimits; i++)
		if ((int) strlen(px.limit_topic[i]) == len &&
			memcmp(px.limit_topic[i], name, (size_t) len) == 0)
			n = px.limit_count[i];
	pthread_mutex_unlock(&px_lock);
	return n;
}

/* Reader over a response body; any overrun sets bad. */
typedef struct Rd
{
	const unsigned char *p;
	const unsigned char *end;
	int bad;
} Rd;

static const unsigned char *
rd_take(Rd *r, size_t n)
{
	const unsigned char *at = r->p;

	if (r->bad || (size_t) (r->end - r->p) < n)
	{
		r->bad = 1;
		return NULL;
	}
	r->p += n;
	return at;
}

/* Copy n bytes from r to out. */
static void
rd_copy(Rd *r, ProxyBuf *out, size_t n)
{
	const unsigned char *at = rd_take(r, n);

	if (at)
		buf_put(out, at, n);
}

/* A Kafka string (int16 length, -1 null): copied, its bytes returned. */
static const unsigned char *
rd_string(Rd *r, ProxyBuf *out, int *len)
{
	const unsigned char *l = rd_take(r, 2);
	int n;

	*len = -1;
	if (l == NULL)
		return NULL;
	n = rd16(l);
	buf_put(out, l, 2);
	if (n <= 0)
		return NULL;
	*len = n;
	l = rd_take(r, (size_t) n);
	if (l)
		buf_put(out, l, (size_t) n);
	return l;
}

/*
 * Rewrite a Metadata response body (after the correlation id) of version
 * ver into out.  Returns 0, or -1 when it cannot be parsed (then the
 * original is passed on).
 */
static int
rewrite_metadata(const unsigned char *body, size_t len, int ver, ProxyBuf *out)
{
	Rd r = {body, body + len, 0};
	const unsigned char *c;
	int32_t nb, nt, i, t;
	int slen;

	c = rd_take(&r, 4);
	if (c == NULL)
		return -1;
	nb = rd32(c);
	buf_put(out, c, 4);
	for (i = 0; i < nb && !r.bad; i++)
	{
		unsigned char port[4];
		const unsigned char *pp;
		int b, upstream;
		static const char host[] = "127.0.0.1";
		unsigned char hl[2] = {0, (unsigned char) (sizeof(host) - 1)};

		rd_copy(&r, out, 4);           /* node id */
		c = rd_take(&r, 2);            /* host: replaced */
		if (c == NULL || rd16(c) < 0 || rd_take(&r, (size_t) rd16(c)) == NULL)
			return -1;
		buf_put(out, hl, 2);
		buf_put(out, host, sizeof(host) - 1);
		pp = rd_take(&r, 4);
		if (pp == NULL)
			return -1;
		upstream = rd32(pp);
		wr32(port, upstream);
		for (b = 0; b < px.nbrokers; b++)
			if (px.upstream_port[b] == upstream)
				wr32(port, px.listen_port[b]);
		buf_put(out, port, 4);
		if (ver >= 1)
			(void) rd_string(&r, out, &slen);  /* rack */
	}
	if (ver >= 2)
		(void) rd_string(&r, out, &slen);      /* cluster id */
	if (ver >= 1)
		rd_copy(&r, out, 4);                   /* controller id */
	c = rd_take(&r, 4);
	if (c == NULL)
		return -1;
	nt = rd32(c);
	buf_put(out, c, 4);
	for (t = 0; t < nt && !r.bad; t++)
	{
		const unsigned char *name;
		int32_t np, p, kept = 0;
		int limit;
		size_t count_at;
		unsigned char cnt[4];

		rd_copy(&r, out, 2);                   /* error */
		name = rd_string(&r, out, &slen);
		limit = name ? proxy_limit(name, slen) : -1;
		if (ver >= 1)
			rd_copy(&r, out, 1);               /* is_internal */
		c = rd_take(&r, 4);
		if (c == NULL)
			return -1;
		np = rd32(c);
		count_at = out->len;
		buf_put(out, c, 4);
		for (p = 0; p < np && !r.bad; p++)
		{
			const unsigned char *start = r.p;
			const unsigned char *h = rd_take(&r, 10);  /* error, index, leader */
			int32_t nrep, nisr;

			if (h == NULL)
				return -1;
			c = rd_take(&r, 4);
			if (c == NULL || (nrep = rd32(c)) < 0 || rd_take(&r, (size_t) nrep * 4) == NULL)
				return -1;
			c = rd_take(&r, 4);
			if (c == NULL || (nisr = rd32(c)) < 0 || rd_take(&r, (size_t) nisr * 4) == NULL)
				return -1;
			if (limit >= 0 && rd32(h + 2) >= limit)
				continue;
			buf_put(out, start, (size_t) (r.p - start));
			kept++;
		}
		wr32(cnt, kept);
		memcpy(out->data + count_at, cnt, 4);
	}
	if (r.bad)
		return -1;
	buf_put(out, r.p, (size_t) (r.end - r.p));
	return 0;
}

/* Copy a broker's host and port, the address replaced by the proxy's. */
static int
rewrite_address(Rd *r, ProxyBuf *out)
{
	static const char host[] = "127.0.0.1";
	unsigned char hl[2] = {0, (unsigned char) (sizeof(host) - 1)};
	unsigned char port[4];
	const unsigned char *c = rd_take(r, 2);
	int32_t upstream;
	int b;

	if (c == NULL || rd16(c) < 0 || rd_take(r, (size_t) rd16(c)) == NULL)
		return -1;
	buf_put(out, hl, 2);
	buf_put(out, host, sizeof(host) - 1);
	c = rd_take(r, 4);
	if (c == NULL)
		return -1;
	upstream = rd32(c);
	wr32(port, upstream);
	for (b = 0; b < px.nbrokers; b++)
		if (px.upstream_port[b] == upstream)
			wr32(port, px.listen_port[b]);
	buf_put(out, port, 4);
	return 0;
}

/*
 * A FindCoordinator response (v0-v2, the versions the mock answers): the
 * coordinator's address becomes the proxy's, or the client would go to
 * the broker directly from then on.
 */
static int
rewrite_coordinator(const unsigned char *body, size_t len, int ver, ProxyBuf *out)
{
	Rd r = {body, body + len, 0};
	int slen;

	if (ver >= 1)
		rd_copy(&r, out, 4);                   /* throttle time */
	rd_copy(&r, out, 2);                       /* error */
	if (ver >= 1)
		(void) rd_string(&r, out, &slen);      /* error message */
	rd_copy(&r, out, 4);                       /* node id */
	if (r.bad || rewrite_address(&r, out) != 0)
		return -1;
	buf_put(out, r.p, (size_t) (r.end - r.p));
	return 0;
}

static void
proxy_close(ProxyConn *c)
{
	if (c->client >= 0)
		close(c->client);
	if (c->upstream >= 0)
		close(c->upstream);
	free(c->from_client.data);
	free(c->from_upstream.data);
	free(c->to_client.data);
	memset(c, 0, sizeof(*c));
	c->client = c->upstream = -1;
}

/*
 * The timestamp of the first partition of a ListOffsets request (header
 * v1, then v1-v5 body), or -1.  (librdkafka asks one timestamp per call of
 * offsets_for_times; the answer patch applies it to every partition.)
 */
static int64_t
listoffsets_asked(const unsigned char *req, size_t len, int ver)
{
	Rd r = {req, req + len, 0};
	const unsigned char *c;
	ProxyBuf sink = {NULL, 0, 0};
	int slen;
	int64_t ts = -1;

	(void) rd_take(&r, 8);                 /* key, version, correlation id */
	(void) rd_string(&r, &sink, &slen);    /* client id */
	(void) rd_take(&r, 4);                 /* replica id */
	if (ver >= 2)
		(void) rd_take(&r, 1);             /* isolation level */
	c = rd_take(&r, 4);                    /* topics */
	if (c && rd32(c) >= 1)
	{
		(void) rd_string(&r, &sink, &slen);
		c = rd_take(&r, 4);                /* partitions */
		if (c && rd32(c) >= 1)
		{
			(void) rd_take(&r, 4);         /* partition */
			if (ver >= 4)
				(void) rd_take(&r, 4);     /* current leader epoch */
			c = rd_take(&r, 8);
			if (c)
				ts = ((int64_t) rd32(c) << 32) | (uint32_t) rd32(c + 4);
		}
	}
	free(sink.data);
	return r.bad ? -1 : ts;
}

static void
wr64(unsigned char *p, int64_t v)
{
	wr32(p, (int32_t) (v >> 32));
	wr32(p + 4, (int32_t) v);
}

/*
 * Answer a ListOffsets by timestamp (response v1-v5, patched in place) from
 * what produce_ts wrote, where it wrote something.
 */
static void
patch_listoffsets(unsigned char *body, size_t len, int ver, int64_t ts)
{
	Rd r = {body, body + len, 0};
	const unsigned char *c;
	ProxyBuf sink = {NULL, 0, 0};
	int32_t nt, t;

	if (ver >= 2)
		(void) rd_take(&r, 4);             /* throttle time */
	c = rd_take(&r, 4);
	nt = c ? rd32(c) : 0;
	for (t = 0; t < nt && !r.bad; t++)
	{
		int slen;
		const unsigned char *name = rd_string(&r, &sink, &slen);
		int32_t np, p;

		c = rd_take(&r, 4);
		np = c ? rd32(c) : 0;
		for (p = 0; p < np && !r.bad; p++)
		{
			const unsigned char *part = rd_take(&r, 4);
			const unsigned char *err = rd_take(&r, 2);
			unsigned char *at_ts = (unsigned char *) rd_take(&r, 8);
			unsigned char *at_off = (unsigned char *) rd_take(&r, 8);
			int64_t off, found_ts = -1;

			if (ver >= 4)
				(void) rd_take(&r, 4);     /* leader epoch */
			if (r.bad || name == NULL || rd16(err) != 0)
				continue;
			if (proxy_offset_for_time(name, slen, rd32(part), ts, &off, &found_ts) != 0)
			{
				wr64(at_off, off);
				wr64(at_ts, found_ts);
			}
		}
	}
	free(sink.data);
}

/* ------------------------------------------------------------------ */
/* Transactions through the proxy, as a broker keeps them              */
/* ------------------------------------------------------------------ */

/*
 * librdkafka 2.0.2's mock accepts TxnOffsetCommit and drops the offsets,
 * writes no commit or abort markers, and hands a producer that calls
 * InitProducerId a new producer id without fencing the older producer of
 * the same transactional.id.  For clients of the proxy, two of those are
 * done here as a broker does them:
 *   - offsets: a TxnOffsetCommit's offsets (and metadata) are held per
 *     transactional.id, and when an EndTxn that commits succeeds they are
 *     committed to the mock's group store with an OffsetCommit (so
 *     OffsetFetch, rd_kafka_committed, reads them); an abort, or a new
 *     InitProducerId of the id, drops them.  The EndTxn answer reaches the
 *     client only after that commit.
 *   - fencing: the producer id of the latest InitProducerId answer of a
 *     transactional.id is its current one; AddPartitionsToTxn,
 *     AddOffsetsToTxn, TxnOffsetCommit and EndTxn requests of an older
 *     producer id get their epoch changed on the way, so the mock answers
 *     INVALID_PRODUCER_EPOCH, as a broker answers a fenced producer.
 * Produce requests pass unchanged, and messages of aborted transactions
 * stay readable (no read_committed filtering): that the mock cannot show.
 */
#define PROXY_MAX_TXNS 64
#define PROXY_MAX_TXN_OFFSETS 16
#define PROXY_MAX_META 8192

typedef struct TxnOffset
{
	char group[256];
	char topic[256];
	int32_t partition;
	int64_t offset;
	char meta[PROXY_MAX_META];
	int meta_null;
} TxnOffset;

typedef struct TxnState
{
	char id[256];
	int64_t pid;                   /* current producer id; 0: none yet */
	int noffsets;
	TxnOffset offsets[PROXY_MAX_TXN_OFFSETS];
} TxnState;

static TxnState *px_txns;          /* [PROXY_MAX_TXNS], proxy thread only */
static int px_ntxns;
static long px_fenced;             /* requests of older producers (px_lock) */
static long px_txn_commits;        /* offsets committed at EndTxn (px_lock) */

/* Reader over a request, which may be changed in place. */
typedef struct Rq
{
	unsigned char *p;
	unsigned char *end;
	int bad;
} Rq;

static unsigned char *
rq_take(Rq *r, size_t n)
{
	unsigned char *at = r->p;

	if (r->bad || (size_t) (r->end - r->p) < n)
	{
		r->bad = 1;
		return NULL;
	}
	r->p += n;
	return at;
}

static uint64_t
rq_uvarint(Rq *r)
{
	uint64_t v = 0;
	int shift = 0;
	unsigned char *b;

	while ((b = rq_take(r, 1)) != NULL && shift < 64)
	{
		v |= (uint64_t) (*b & 0x7f) << shift;
		if (!(*b & 0x80))
			return v;
		shift += 7;
	}
	r->bad = 1;
	return 0;
}

static int64_t
rq_int(Rq *r, int bytes)
{
	unsigned char *b = rq_take(r, (size_t) bytes);
	int64_t v = 0;
	int i;

	if (b == NULL)
		return 0;
	for (i = 0; i < bytes; i++)
		v = (v << 8) | b[i];
	if (bytes == 2)
		return (int16_t) v;
	if (bytes == 4)
		return (int32_t) v;
	return v;
}

/* A string (compact when flex) into out (cut to outlen - 1); -1 for null. */
static int
rq_str(Rq *r, int flex, char *out, size_t outlen)
{
	int64_t n = flex ? (int64_t) rq_uvarint(r) - 1 : rq_int(r, 2);
	unsigned char *b;

	if (out && outlen)
		out[0] = '\0';
	if (r->bad || n < 0)
		return -1;
	b = rq_take(r, (size_t) n);
	if (b && out && outlen)
	{
		size_t k = (size_t) n < outlen - 1 ? (size_t) n : outlen - 1;

		memcpy(out, b, k);
		out[k] = '\0';
	}
	return (int) n;
}

static int64_t
rq_count(Rq *r, int flex)
{
	return flex ? (int64_t) rq_uvarint(r) - 1 : rq_int(r, 4);
}

static void
rq_tags(Rq *r)
{
	uint64_t n = rq_uvarint(r);

	while (!r->bad && n-- > 0)
	{
		(void) rq_uvarint(r);
		(void) rq_take(r, (size_t) rq_uvarint(r));
	}
}

static int
txn_find(const char *id)
{
	int i;

	if (px_txns == NULL && (px_txns = calloc(PROXY_MAX_TXNS, sizeof(TxnState))) == NULL)
		return -1;
	for (i = 0; i < px_ntxns; i++)
		if (strcmp(px_txns[i].id, id) == 0)
			return i;
	if (px_ntxns == PROXY_MAX_TXNS || strlen(id) >= sizeof(px_txns[0].id))
		return -1;
	strcpy(px_txns[px_ntxns].id, id);
	return px_ntxns++;
}

/* A request of producer pid of transaction t: fence it if pid is not current. */
static int
txn_fence(int t, int64_t pid, unsigned char *epoch)
{
	if (t < 0 || epoch == NULL || px_txns[t].pid == 0 || px_txns[t].pid == pid)
		return 0;
	epoch[1] ^= 0x55;              /* not the epoch the mock knows */
	pthread_mutex_lock(&px_lock);
	px_fenced++;
	pthread_mutex_unlock(&px_lock);
	return 1;
}

/*
 * Note a transactional request (req: from the ApiKey on, len bytes) in
 * pending slot i of c; fence it if it comes from an older producer.
 */
static void
note_txn_request(ProxyConn *c, int i, unsigned char *req, size_t len)
{
	Rq r = {req, req + len, 0};
	int key = (int) rq_int(&r, 2);
	int ver = (int) rq_int(&r, 2);
	int flex = (key == 22 && ver >= 2) || (key >= 24 && key <= 26 && ver >= 3) ||
		(key == 28 && ver >= 3);
	char id[256];
	int t;
	int64_t pid;
	unsigned char *epoch;

	c->txn[i] = -1;
	if (key != 22 && (key < 24 || key > 26) && key != 28)
		return;
	(void) rq_int(&r, 4);                      /* correlation id */
	(void) rq_str(&r, 0, NULL, 0);             /* client id */
	if (flex)
		rq_tags(&r);
	if (rq_str(&r, flex, id, sizeof(id)) < 0 || r.bad || (t = txn_find(id)) < 0)
		return;
	c->txn[i] = (int16_t) t;
	if (key == 22)
		return;                                /* the answer names the producer */
	if (key == 28)
	{
		char group[256];
		int64_t nt, np;
		int fenced;

		(void) rq_str(&r, flex, group, sizeof(group));
		pid = rq_int(&r, 8);
		epoch = rq_take(&r, 2);
		fenced = txn_fence(t, pid, epoch);
		if (ver >= 3)
		{
			(void) rq_int(&r, 4);
			(void) rq_str(&r, flex, NULL, 0);
			(void) rq_str(&r, flex, NULL, 0);
		}
		for (nt = rq_count(&r, flex); !r.bad && nt > 0; nt--)
		{
			char topic[256];

			(void) rq_str(&r, flex, topic, sizeof(topic));
			for (np = rq_count(&r, flex); !r.bad && np > 0; np--)
			{
				TxnState *s = &px_txns[t];
				TxnOffset o;
				int k;

				memset(&o, 0, sizeof(o));
				strcpy(o.group, group);
				strcpy(o.topic, topic);
				o.partition = (int32_t) rq_int(&r, 4);
				o.offset = rq_int(&r, 8);
				if (ver >= 2)
					(void) rq_int(&r, 4);
				o.meta_null = rq_str(&r, flex, o.meta, sizeof(o.meta)) < 0;
				if (flex)
					rq_tags(&r);
				if (r.bad || fenced)
					continue;
				for (k = 0; k < s->noffsets; k++)
					if (strcmp(s->offsets[k].group, o.group) == 0 &&
						strcmp(s->offsets[k].topic, o.topic) == 0 &&
						s->offsets[k].partition == o.partition)
						break;
				if (k < PROXY_MAX_TXN_OFFSETS)
				{
					s->offsets[k] = o;
					if (k == s->noffsets)
						s->noffsets++;
				}
			}
			if (flex)
				rq_tags(&r);
		}
		return;
	}
	pid = rq_int(&r, 8);
	epoch = rq_take(&r, 2);
	(void) txn_fence(t, pid, epoch);
	if (key == 26)
	{
		unsigned char *b = rq_take(&r, 1);

		c->commit[i] = (int8_t) (b && *b);
	}
}

/* Commit transaction t's held offsets to the mock's group store. */
static void
txn_apply(TxnState *s)
{
	int k;

	for (k = 0; k < s->noffsets; k++)
	{
		TxnOffset *o = &s->offsets[k];
		rd_kafka_conf_t *conf = rd_kafka_conf_new();
		rd_kafka_topic_partition_list_t *l;
		rd_kafka_t *rk;
		rd_kafka_resp_err_t err;

		rd_kafka_conf_set_log_cb(conf, log_cb);
		if (conf_set(conf, "bootstrap.servers", g.bootstrap) != 0 ||
			conf_set(conf, "group.id", o->group) != 0 ||
			conf_set(conf, "enable.auto.commit", "false") != 0 ||
			(rk = new_handle_type(RD_KAFKA_CONSUMER, conf, "txn offset committer")) == NULL)
		{
			note("transaction %s: could not create the offset committer", s->id);
			continue;
		}
		l = rd_kafka_topic_partition_list_new(1);
		rd_kafka_topic_partition_list_add(l, o->topic, o->partition)->offset = o->offset;
		if (!o->meta_null)
		{
			l->elems[0].metadata = strdup(o->meta);
			l->elems[0].metadata_size = strlen(o->meta);
		}
		err = rd_kafka_commit(rk, l, 0);
		if (err)
			note("transaction %s: committing offset %lld of %s [%d] for group %s failed: %s",
				 s->id, (long long) o->offset, o->topic, (int) o->partition, o->group,
				 rd_kafka_err2str(err));
		else
		{
			pthread_mutex_lock(&px_lock);
			px_txn_commits++;
			pthread_mutex_unlock(&px_lock);
		}
		rd_kafka_topic_partition_list_destroy(l);
		rd_kafka_destroy(rk);
	}
	s->noffsets = 0;
}

/* The answer to a transactional request of pending slot i (body: after the correlation id). */
static void
note_txn_response(ProxyConn *c, int key, int ver, int t, int commit,
				  const unsigned char *body, size_t len)
{
	Rq r = {(unsigned char *) body, (unsigned char *) body + len, 0};
	int err;

	(void) c;
	if (t < 0 || px_txns == NULL)
		return;
	if (key == 22)
	{
		if (ver >= 2)
			rq_tags(&r);                       /* response header v1 */
		(void) rq_int(&r, 4);
		err = (int) rq_int(&r, 2);
		if (!r.bad && err == 0)
		{
			px_txns[t].pid = rq_int(&r, 8);
			px_txns[t].noffsets = 0;           /* a new producer aborts the open transaction */
		}
	}
	else if (key == 26)
	{
		(void) rq_int(&r, 4);
		err = (int) rq_int(&r, 2);
		if (!r.bad && err == 0 && commit)
			txn_apply(&px_txns[t]);
		else if (!r.bad && err == 0)
			px_txns[t].noffsets = 0;
	}
}

/* Note the requests that became whole in from_client; they may go upstream. */
static void
note_requests(ProxyConn *c)
{
	size_t off = c->noted;

	while (c->from_client.len - off >= 12)
	{
		int32_t size = rd32(c->from_client.data + off);

		if (size < 8 || size > PROXY_MAX_FRAME || c->from_client.len - off < (size_t) size + 4)
			break;
		if (c->npending < PROXY_PENDING)
		{
			c->key[c->npending] = rd16(c->from_client.data + off + 4);
			c->ver[c->npending] = rd16(c->from_client.data + off + 6);
			c->corr[c->npending] = rd32(c->from_client.data + off + 8);
			c->asked_ts[c->npending] = -1;
			note_txn_request(c, c->npending, c->from_client.data + off + 4, (size_t) size);
			if (c->key[c->npending] == 2 && c->ver[c->npending] >= 1 && c->ver[c->npending] <= 5)
				c->asked_ts[c->npending] =
					listoffsets_asked(c->from_client.data + off + 4, (size_t) size,
									  c->ver[c->npending]);
			c->npending++;
		}
		off += (size_t) size + 4;
	}
	c->noted = off;
}

/* Send the noted requests upstream, as far as the socket takes them. */
static void
send_upstream(ProxyConn *c)
{
	ssize_t got;

	if (c->noted == 0)
		return;
	got = write(c->upstream, c->from_client.data, c->noted);
	if (got > 0)
	{
		buf_drop(&c->from_client, (size_t) got);
		c->noted -= (size_t) got;
	}
}

/* Move whole response frames from from_upstream to to_client, rewriting Metadata. */
static void
pass_responses(ProxyConn *c)
{
	while (c->from_upstream.len >= 8)
	{
		int32_t size = rd32(c->from_upstream.data);
		int32_t corr = rd32(c->from_upstream.data + 4);
		int i, key = -1, ver = 0, txn = -1, commit = 0;
		int64_t asked = -1;
		ProxyBuf body = {NULL, 0, 0};
		unsigned char hdr[4];

		if (size < 4 || c->from_upstream.len < (size_t) size + 4)
			break;
		for (i = 0; i < c->npending; i++)
			if (c->corr[i] == corr)
			{
				key = c->key[i];
				ver = c->ver[i];
				asked = c->asked_ts[i];
				txn = c->txn[i];
				commit = c->commit[i];
				c->npending--;
				c->txn[i] = c->txn[c->npending];
				c->commit[i] = c->commit[c->npending];
				c->asked_ts[i] = c->asked_ts[c->npending];
				c->corr[i] = c->corr[c->npending];
				c->key[i] = c->key[c->npending];
				c->ver[i] = c->ver[c->npending];
				break;
			}
		if (txn >= 0)
			note_txn_response(c, key, ver, txn, commit, c->from_upstream.data + 8,
							  (size_t) size - 4);
		if (key == 2 && asked >= 0)
			patch_listoffsets(c->from_upstream.data + 8, (size_t) size - 4, ver, asked);
		if ((key == 3 && ver <= 2 &&
			 rewrite_metadata(c->from_upstream.data + 8, (size_t) size - 4, ver, &body) == 0) ||
			(key == 10 && ver <= 2 &&
			 rewrite_coordinator(c->from_upstream.data + 8, (size_t) size - 4, ver, &body) == 0))
		{
			wr32(hdr, (int32_t) body.len + 4);
			buf_put(&c->to_client, hdr, 4);
			buf_put(&c->to_client, c->from_upstream.data + 4, 4);
			buf_put(&c->to_client, body.data, body.len);
		}
		else
			buf_put(&c->to_client, c->from_upstream.data, (size_t) size + 4);
		free(body.data);
		buf_drop(&c->from_upstream, (size_t) size + 4);
	}
}

static int
listen_loopback(int *port)
{
	struct sockaddr_in a;
	socklen_t alen = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || bind(fd, (struct sockaddr *) &a, sizeof(a)) != 0 ||
		listen(fd, 64) != 0 || getsockname(fd, (struct sockaddr *) &a, &alen) != 0)
	{
		if (fd >= 0)
			close(fd);
		return -1;
	}
	*port = ntohs(a.sin_port);
	return fd;
}

static int
connect_loopback(int port)
{
	struct sockaddr_in a;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t) port);
	if (fd < 0 || connect(fd, (struct sockaddr *) &a, sizeof(a)) != 0)
	{
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static void *
proxy_main(void *arg)
{
	struct pollfd fds[MAX_BROKERS + 2 * PROXY_MAX_CONNS];
	int owner[MAX_BROKERS + 2 * PROXY_MAX_CONNS];
	unsigned char chunk[65536];

	(void) arg;
	while (!stop_requested)
	{
		int n = 0, i, k;

		for (i = 0; i < px.nbrokers; i++)
		{
			fds[n].fd = px.listen_fd[i];
			fds[n].events = POLLIN;
			owner[n++] = -1 - i;
		}
		for (i = 0; i < PROXY_MAX_CONNS; i++)
		{
			ProxyConn *c = &px.conns[i];

			if (c->client < 0)
				continue;
			fds[n].fd = c->client;
			fds[n].events = POLLIN | (c->to_client.len ? POLLOUT : 0);
			owner[n++] = 2 * i;
			fds[n].fd = c->upstream;
			fds[n].events = POLLIN | (c->noted ? POLLOUT : 0);
			owner[n++] = 2 * i + 1;
		}
		if (poll(fds, (nfds_t) n, POLL_TICK_MS) <= 0)
			continue;
		for (k = 0; k < n; k++)
		{
			ProxyConn *c;
			ssize_t got;

			if (fds[k].revents == 0)
				continue;
			if (owner[k] < 0)
			{
				int b = -1 - owner[k];
				int cl = accept(px.listen_fd[b], NULL, NULL);
				int up;

				if (cl < 0)
					continue;
				up = connect_loopback(px.upstream_port[b]);
				for (i = 0; i < PROXY_MAX_CONNS && px.conns[i].client >= 0; i++)
					;
				if (up < 0 || i == PROXY_MAX_CONNS)
				{
					close(cl);
					if (up >= 0)
						close(up);
					continue;
				}
				fcntl(cl, F_SETFL, O_NONBLOCK);
				fcntl(up, F_SETFL, O_NONBLOCK);
				px.conns[i].client = cl;
				px.conns[i].upstream = up;
				continue;
			}
			c = &px.conns[owner[k] / 2];
			if (c->client < 0)
				continue;
			if (owner[k] % 2 == 0)
			{
				if ((fds[k].revents & POLLOUT) && c->to_client.len > 0)
				{
					got = write(c->client, c->to_client.data, c->to_client.len);
					if (got > 0)
						buf_drop(&c->to_client, (size_t) got);
				}
				if (fds[k].revents & (POLLIN | POLLHUP | POLLERR))
				{
					got = read(c->client, chunk, sizeof(chunk));
					if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
					{
						proxy_close(c);
						continue;
					}
					if (got > 0)
					{
						buf_put(&c->from_client, chunk, (size_t) got);
						note_requests(c);
						send_upstream(c);
					}
				}
			}
			else
			{
				if (fds[k].revents & POLLOUT)
					send_upstream(c);
				if (fds[k].revents & (POLLIN | POLLHUP | POLLERR))
				{
					got = read(c->upstream, chunk, sizeof(chunk));
					if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
					{
						proxy_close(c);
						continue;
					}
					if (got > 0)
					{
						buf_put(&c->from_upstream, chunk, (size_t) got);
						pass_responses(c);
					}
				}
			}
		}
	}
	return NULL;
}

/* proxy: start the proxy (once); answers its bootstrap list. */
static void
cmd_proxy(char *args)
{
	char *list, *save = NULL, *item;
	int i;

	if (next_token(&args) != NULL)
	{
		reply("ERR usage: proxy");
		return;
	}
	if (!px.running)
	{
		list = strdup(g.bootstrap);
		px.nbrokers = 0;
		px.bootstrap[0] = '\0';
		for (i = 0; i < PROXY_MAX_CONNS; i++)
			px.conns[i].client = px.conns[i].upstream = -1;
		for (item = strtok_r(list, ",", &save); item && px.nbrokers < MAX_BROKERS;
			 item = strtok_r(NULL, ",", &save))
		{
			char *colon = strrchr(item, ':');
			int b = px.nbrokers;

			px.upstream_port[b] = colon ? atoi(colon + 1) : 0;
			px.listen_fd[b] = listen_loopback(&px.listen_port[b]);
			if (px.listen_fd[b] < 0)
			{
				free(list);
				reply("ERR proxy: could not listen: %s", strerror(errno));
				return;
			}
			snprintf(px.bootstrap + strlen(px.bootstrap),
					 sizeof(px.bootstrap) - strlen(px.bootstrap), "%s127.0.0.1:%d",
					 b ? "," : "", px.listen_port[b]);
			px.nbrokers++;
		}
		free(list);

		if (pthread_create(&px.thread, NULL, proxy_main, NULL) != 0)
		{
			reply("ERR proxy: could not start its thread");
			return;
		}
		px.running = 1;
	}
	reply("OK %s", px.bootstrap);
}

/* partitions TOPIC N: clients of the proxy see partitions 0 .. N-1 of TOPIC. */
static void
cmd_partitions(char *args)
{
	char *topic = next_token(&args);
	long n;
	int i;

	if (topic == NULL || strlen(topic) >= sizeof(px.limit_topic[0]) ||
		parse_long(next_token(&args), 1, MAX_PARTITIONS, &n) != 0 ||
		next_token(&args) != NULL)
	{
		reply("ERR usage: partitions TOPIC N");
		return;
	}
	pthread_mutex_lock(&px_lock);
	for (i = 0; i < px.nlimits && strcmp(px.limit_topic[i], topic) != 0; i++)
		;
	if (i == px.nlimits && px.nlimits < PROXY_MAX_LIMITS)
		strcpy(px.limit_topic[px.nlimits++], topic);
	if (i < px.nlimits)
		px.limit_count[i] = (int) n;
	pthread_mutex_unlock(&px_lock);
	if (i == PROXY_MAX_LIMITS)
		reply("ERR too many limited topics");
	else
		reply("OK");
}

/*
 * A transactional producer of the tests' own (a "zombie" of a transactional
 * id that a client of the proxy uses): txn_init TXNID starts it through the
 * proxy (or directly without one) and calls init_transactions, which fences
 * the older producer of that id; txn_commit TOPIC VALUE produces VALUE to
 * partition 0 in a transaction and commits it; txn_close drops it.
 */
static rd_kafka_t *txn_producer;

static void
cmd_txn_init(char *args)
{
	char *id = next_token(&args);
	rd_kafka_conf_t *conf;
	rd_kafka_error_t *error;

	if (id == NULL || next_token(&args) != NULL)
	{
		reply("ERR usage: txn_init TXNID");
		return;
	}
	if (txn_producer != NULL)
		rd_kafka_destroy(txn_producer);
	conf = rd_kafka_conf_new();
	rd_kafka_conf_set_log_cb(conf, log_cb);
	if (conf_set(conf, "bootstrap.servers", px.running ? px.bootstrap : g.bootstrap) != 0 ||
		conf_set(conf, "client.id", "spool_kafka_mock_txn") != 0 ||
		conf_set(conf, "transactional.id", id) != 0 ||
		(txn_producer = new_handle(conf, "transactional producer")) == NULL)
	{
		txn_producer = NULL;
		reply("ERR could not create the transactional producer");
		return;
	}
	error = rd_kafka_init_transactions(txn_producer, 10000);
	if (error != NULL)
	{
		reply("ERR init_transactions: %s", rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
		return;
	}
	reply("OK");
}

static void
cmd_txn_commit(char *args)
{
	char *topic = next_token(&args);
	char *value = next_token(&args);
	rd_kafka_error_t *error;
	rd_kafka_resp_err_t err;

	if (topic == NULL || value == NULL || txn_producer == NULL)
	{
		reply("ERR usage: txn_commit TOPIC VALUE (after txn_init)");
		return;
	}
	if ((error = rd_kafka_begin_transaction(txn_producer)) != NULL)
		goto failed;
	err = rd_kafka_producev(txn_producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(0),
							RD_KAFKA_V_VALUE(value, strlen(value)),
							RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
	if (err)
	{
		reply("ERR produce: %s", rd_kafka_err2str(err));
		return;
	}
	if ((error = rd_kafka_commit_transaction(txn_producer, 10000)) != NULL)
		goto failed;
	reply("OK committed");
	return;
failed:
	reply("ERR %s%s", rd_kafka_error_is_fatal(error) ? "fatal: " : "",
		  rd_kafka_error_string(error));
	rd_kafka_error_destroy(error);
}

/* committed GROUP TOPIC PARTITION: OK OFFSET METADATA (-1 and "" when none) */
static void
cmd_committed(char *args)
{
	char *group = next_token(&args);
	char *topic = next_token(&args);
	long part;
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_topic_partition_list_t *l;
	rd_kafka_resp_err_t err;

	if (group == NULL || topic == NULL ||
		parse_long(next_token(&args), 0, MAX_PARTITIONS, &part) != 0)
	{
		reply("ERR usage: committed GROUP TOPIC PARTITION");
		return;
	}
	conf = rd_kafka_conf_new();
	rd_kafka_conf_set_log_cb(conf, log_cb);
	if (conf_set(conf, "bootstrap.servers", g.bootstrap) != 0 ||
		conf_set(conf, "group.id", group) != 0 ||
		(rk = new_handle_type(RD_KAFKA_CONSUMER, conf, "offset reader")) == NULL)
	{
		reply("ERR could not create a consumer");
		return;
	}
	l = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(l, topic, (int32_t) part);
	err = rd_kafka_committed(rk, l, 10000);
	if (!err)
		err = l->elems[0].err;
	if (err)
		reply("ERR %s", rd_kafka_err2str(err));
	else
		reply("OK %lld %.*s", (long long) l->elems[0].offset,
			  (int) l->elems[0].metadata_size,
			  l->elems[0].metadata ? (const char *) l->elems[0].metadata : "");
	rd_kafka_topic_partition_list_destroy(l);
	rd_kafka_destroy(rk);
}

/* txnstat: OK FENCED COMMITS (see "Transactions through the proxy") */
static void
cmd_txnstat(void)
{
	long f, n;

	pthread_mutex_lock(&px_lock);
	f = px_fenced;
	n = px_txn_commits;
	pthread_mutex_unlock(&px_lock);
	reply("OK %ld %ld", f, n);
}

/*
 * Execute one command line.  Returns 1 when the program should exit.
 */
static int
dispatch(char *line)
{
	char *p = line;
	char *cmd = next_token(&p);

	if (cmd == NULL)
		return 0;                /* empty line: no answer */
	if (strcmp(cmd, "quit") == 0)
	{
		reply("OK");
		return 1;
	}
	if (strcmp(cmd, "produce") == 0)
		cmd_produce(p);
	else if (strcmp(cmd, "produce_one") == 0)
		cmd_produce_single(p, 0, 0);
	else if (strcmp(cmd, "produce_hdr") == 0)
		cmd_produce_single(p, 1, 0);
	else if (strcmp(cmd, "produce_ts") == 0)
		cmd_produce_single(p, 0, 1);
	else if (strcmp(cmd, "topic") == 0)
		cmd_topic(p);
	else if (strcmp(cmd, "down") == 0)
		cmd_broker(p, 'd');
	else if (strcmp(cmd, "up") == 0)
		cmd_broker(p, 'u');
	else if (strcmp(cmd, "rtt") == 0)
		cmd_broker(p, 'r');
	else if (strcmp(cmd, "error") == 0)
		cmd_error(p);
	else if (strcmp(cmd, "clear") == 0)
		cmd_clear(p);
	else if (strcmp(cmd, "wmarks") == 0)
		cmd_wmarks(p);
	else if (strcmp(cmd, "consume") == 0)
		cmd_consume(p);
	else if (strcmp(cmd, "bootstrap") == 0)
		reply("OK %s", g.bootstrap);
	else if (strcmp(cmd, "proxy") == 0)
		cmd_proxy(p);
	else if (strcmp(cmd, "partitions") == 0)
		cmd_partitions(p);
	else if (strcmp(cmd, "txn_init") == 0)
		cmd_txn_init(p);
	else if (strcmp(cmd, "txn_commit") == 0)
		cmd_txn_commit(p);
	else if (strcmp(cmd, "txn_close") == 0)
	{
		if (txn_producer != NULL)
			rd_kafka_destroy(txn_producer);
		txn_producer = NULL;
		reply("OK");
	}
	else if (strcmp(cmd, "txnstat") == 0)
		cmd_txnstat();
	else if (strcmp(cmd, "committed") == 0)
		cmd_committed(p);
	else
		reply("ERR unknown command '%s'", cmd);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Input loop                                                           */
/* ------------------------------------------------------------------ */

/*
 * Read stdin line by line without blocking signals out: poll() with a
 * short tick so that SIGTERM/SIGINT are noticed within POLL_TICK_MS, and
 * the producer's callbacks are served while idle.  A line longer than
 * MAX_LINE is answered with ERR and skipped.
 */
static void
command_loop(void)
{
	static char buf[MAX_LINE + 1];
	size_t used = 0;
	int overlong = 0;
	int eof = 0;

	while (!stop_requested)
	{
		char *nl;

		/* Handle every complete line already buffered. */
		while ((nl = memchr(buf, '\n', used)) != NULL)
		{
			size_t len = (size_t) (nl - buf);
			int done = 0;

			*nl = '\0';
			if (len > 0 && buf[len - 1] == '\r')
				buf[len - 1] = '\0';
			if (overlong)
			{
				reply("ERR line too long (max %d bytes)", MAX_LINE);
				overlong = 0;
			}
			else
				done = dispatch(buf);
			used -= len + 1;
			memmove(buf, nl + 1, used);
			if (done || stop_requested)
				return;
		}
		if (eof)
		{
			/* A last line without newline still counts as a command. */
			if (used > 0 && !overlong)
			{
				buf[used] = '\0';
				dispatch(buf);
			}
			return;
		}
		if (used == MAX_LINE)
		{
			overlong = 1;        /* drop what we have, keep reading */
			used = 0;
		}

		{
			struct pollfd pfd = {STDIN_FILENO, POLLIN, 0};
			int rc = poll(&pfd, 1, POLL_TICK_MS);
			ssize_t n;

			rd_kafka_poll(g.producer, 0);
			if (rc < 0)
			{
				if (errno == EINTR)
					continue;
				perror("spool_kafka_mock: poll");
				return;
			}
			if (rc == 0)
				continue;
			n = read(STDIN_FILENO, buf + used, MAX_LINE - used);
			if (n < 0)
			{
				if (errno == EINTR || errno == EAGAIN)
					continue;
				perror("spool_kafka_mock: read");
				return;
			}
			if (n == 0)
				eof = 1;
			used += (size_t) n;
		}
	}
}

/* ------------------------------------------------------------------ */
/* main                                                                 */
/* ------------------------------------------------------------------ */

static void
usage(void)
{
	fprintf(stderr,
			"usage: spool_kafka_mock [--brokers N] [--topic NAME:PARTITIONS]..."
			" [--quiet] [--message-timeout MS]\n");
}

int
main(int argc, char **argv)
{
	const char *topics[MAX_TOPICS_ARG];
	int ntopics = 0;
	long brokers = 1, mto = 30000;
	struct sigaction sa;
	int i;

	for (i = 1; i < argc; i++)
	{
		const char *a = argv[i];
		const char *v = (i + 1 < argc) ? argv[i + 1] : NULL;

		if (strcmp(a, "--quiet") == 0)
			quiet = 1;
		else if (strcmp(a, "--brokers") == 0 &&
				 parse_long(v, 1, MAX_BROKERS, &brokers) == 0)
			i++;
		else if (strcmp(a, "--message-timeout") == 0 &&
				 parse_long(v, 100, 3600000, &mto) == 0)
			i++;
		else if (strcmp(a, "--topic") == 0 && v != NULL &&
				 ntopics < MAX_TOPICS_ARG)
		{
			topics[ntopics++] = v;
			i++;
		}
		else
		{
			usage();
			return 2;
		}
	}
	g.message_timeout_ms = (int) mto;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;             /* no SA_RESTART: interrupt poll() */
	if (sigaction(SIGTERM, &sa, NULL) != 0 ||
		sigaction(SIGINT, &sa, NULL) != 0)
	{
		perror("spool_kafka_mock: sigaction");
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);    /* a closed stdout shows as write errors */

	if (setup_cluster((int) brokers) != 0)
	{
		teardown();
		return 1;
	}
	start_nodelay();

	for (i = 0; i < ntopics; i++)
	{
		char name[256];
		const char *colon = strrchr(topics[i], ':');
		long parts;
		rd_kafka_resp_err_t err;

		if (colon == NULL || colon == topics[i] ||
			(size_t) (colon - topics[i]) >= sizeof(name) ||
			parse_long(colon + 1, 1, MAX_PARTITIONS, &parts) != 0)
		{
			fprintf(stderr, "spool_kafka_mock: bad --topic '%s' "
					"(want NAME:PARTITIONS)\n", topics[i]);
			teardown();
			return 2;
		}
		memcpy(name, topics[i], (size_t) (colon - topics[i]));
		name[colon - topics[i]] = '\0';
		err = create_topic(name, (int) parts);
		if (err)
		{
			fprintf(stderr, "spool_kafka_mock: creating topic %s: %s\n",
					name, rd_kafka_err2str(err));
			teardown();
			return 1;
		}
	}

	printf("BOOTSTRAP %s\n", g.bootstrap);
	fflush(stdout);
	note("mock cluster with %ld broker(s) at %s", brokers, g.bootstrap);

	command_loop();

	note("shutting down%s", stop_requested ? " (signal)" : "");
	teardown();
	return 0;
}
