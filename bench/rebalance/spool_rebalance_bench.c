/*
 * spool_rebalance_bench.c -- how long a Kafka consumer group takes to hand
 * a departed member's partitions to the surviving member.
 *
 * This is the comparison baseline for replica takeover in spool_ext's
 * processors: "if we simply relied on Kafka consumer groups, how long would
 * a partition be without a consumer after one member goes away?"
 *
 * USAGE
 *   spool_rebalance_bench BOOTSTRAP TOPIC ROUNDS MODE
 *
 *   MODE leave   member B calls rd_kafka_consumer_close() (clean LeaveGroup)
 *   MODE stall   member B is SIGSTOPped: it stops heartbeating and the group
 *                coordinator has to notice by session.timeout.ms
 *
 *   Environment: SESSION_TIMEOUT_MS overrides session.timeout.ms for both
 *   members (default: librdkafka's own default, printed at start-up).
 *
 * EACH ROUND
 *   1. fork member B (a separate process, so that SIGSTOP stops only it);
 *      the parent is member A, the survivor.  Both join the fresh group
 *      "rebalance-<pid>-<round>" and subscribe to TOPIC.  B is forked
 *      before A creates its handle: no librdkafka threads exist at fork().
 *   2. wait (at most WAIT_MS) until both have a non-empty assignment.
 *   3. t0 = now; then tell B to leave (a byte on a pipe) or SIGSTOP it.
 *   4. A polls; t1 = the moment its rebalance callback leaves A with ALL
 *      partitions of TOPIC assigned (at most WAIT_MS after t0).
 *   5. B is reaped (stall: SIGCONT, then SIGKILL), A closes.
 *
 * OUTPUT (stdout)
 *   "# ..." lines: settings and per-round detail (when A first saw the
 *   rebalance start, i.e. its revoke callback ran, relative to t0)
 *   round N mode M ms X                 one per round, X = t1 - t0
 *   summary mode M rounds N min X median Y max Z
 *
 *   Exit status 0 when every round completed, 1 on a timeout or any other
 *   failure, 2 on bad usage.
 *
 * Times come from CLOCK_MONOTONIC, which is system-wide, so stamps taken in
 * different processes would be comparable; all stamps used here are taken
 * in the parent anyway.
 *
 * BUILD
 *   make        (cc -O2 -Wall -Wextra -std=gnu99 ... -lrdkafka)
 */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#define MAX_ROUNDS			1000
#define WAIT_MS				120000	/* cap of every wait for the group */
#define REAP_MS				30000	/* how long a leaving B may take to exit */
#define CHILD_LIFETIME_MS	600000	/* B gives up on its own after this */
#define ROUND_WATCHDOG_S	420		/* SIGALRM ends a wedged round */
#define POLL_MS				50		/* consumer poll tick */
#define META_TIMEOUT_MS		10000

/* What a member knows about itself; the rebalance callback's opaque. */
typedef struct Member
{
	const char *name;			/* "A" or "B", for messages */
	const char *topic;
	int			assigned;		/* partitions of topic assigned right now */
	int			changes;		/* rebalance callbacks run so far */
	double		revoke_at;		/* first revoke after mark_at, or 0 */
	double		mark_at;		/* revokes before this are not recorded */
} Member;

static pid_t watchdog_child = 0;

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

static double
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static void
fail(const char *fmt, ...)
{
	va_list		ap;

	fprintf(stderr, "spool_rebalance_bench: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* SIGALRM: a round took far longer than any of its bounded waits allow. */
static void
on_watchdog(int sig)
{
	static const char msg[] = "spool_rebalance_bench: round watchdog expired\n";

	(void) sig;
	if (write(STDERR_FILENO, msg, sizeof(msg) - 1) < 0)
	{
		/* nothing more we can do */
	}
	if (watchdog_child > 0)
	{
		kill(watchdog_child, SIGCONT);
		kill(watchdog_child, SIGKILL);
	}
	_exit(1);
}

/* Partitions of topic in rk's current assignment. */
static int
count_assigned(rd_kafka_t *rk, const char *topic)
{
	rd_kafka_topic_partition_list_t *list = NULL;
	int			n = 0;

	if (rd_kafka_assignment(rk, &list) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return -1;
	for (int i = 0; i < list->cnt; i++)
		if (strcmp(list->elems[i].topic, topic) == 0)
			n++;
	rd_kafka_topic_partition_list_destroy(list);
	return n;
}

/*
 * Rebalance callback for both members: eager protocols (the default
 * "range,roundrobin") replace the whole assignment, the cooperative one
 * adds and removes partitions incrementally.
 */
static void
rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			 rd_kafka_topic_partition_list_t *parts, void *opaque)
{
	Member	   *m = opaque;
	bool		coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
	rd_kafka_error_t *error = NULL;
	rd_kafka_resp_err_t aerr = RD_KAFKA_RESP_ERR_NO_ERROR;

	switch (err)
	{
		case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
			if (coop)
				error = rd_kafka_incremental_assign(rk, parts);
			else
				aerr = rd_kafka_assign(rk, parts);
			break;

		case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
			if (m->mark_at > 0 && m->revoke_at == 0)
				m->revoke_at = now_ms();
			if (coop)
				error = rd_kafka_incremental_unassign(rk, parts);
			else
				aerr = rd_kafka_assign(rk, NULL);
			break;

		default:
			fail("member %s: rebalance error: %s", m->name, rd_kafka_err2str(err));
			aerr = rd_kafka_assign(rk, NULL);
			break;
	}

	if (error)
	{
		fail("member %s: incremental (un)assign: %s", m->name,
			 rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
	}
	if (aerr)
		fail("member %s: assign: %s", m->name, rd_kafka_err2str(aerr));

	m->assigned = count_assigned(rk, m->topic);
	m->changes++;
}

/* A subscribed consumer in group, or NULL (after printing why). */
static rd_kafka_t *
make_consumer(Member *m, const char *bootstrap, const char *group,
			  const char *session_timeout)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_topic_partition_list_t *sub;
	rd_kafka_resp_err_t err;
	rd_kafka_t *rk;
	char		errstr[512];
	char		client_id[64];
	const char *settings[][2] = {
		{"bootstrap.servers", bootstrap},
		{"group.id", group},
		{"client.id", client_id},
		{"enable.auto.commit", "false"},
		{"auto.offset.reset", "earliest"},
		{"session.timeout.ms", session_timeout},	/* NULL: keep default */
	};

	snprintf(client_id, sizeof(client_id), "rebalance-bench-%s", m->name);
	for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++)
	{
		if (settings[i][1] == NULL)
			continue;
		if (rd_kafka_conf_set(conf, settings[i][0], settings[i][1],
							  errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
		{
			fail("member %s: %s=%s: %s", m->name, settings[i][0],
				 settings[i][1], errstr);
			rd_kafka_conf_destroy(conf);
			return NULL;
		}
	}
	rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
	rd_kafka_conf_set_opaque(conf, m);

	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fail("member %s: rd_kafka_new: %s", m->name, errstr);
		rd_kafka_conf_destroy(conf);
		return NULL;
	}
	rd_kafka_poll_set_consumer(rk);

	sub = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(sub, m->topic, RD_KAFKA_PARTITION_UA);
	err = rd_kafka_subscribe(rk, sub);
	rd_kafka_topic_partition_list_destroy(sub);
	if (err)
	{
		fail("member %s: subscribe: %s", m->name, rd_kafka_err2str(err));
		rd_kafka_destroy(rk);
		return NULL;
	}
	return rk;
}

/* One consumer poll; messages (the topic is normally empty) are dropped. */
static void
poll_once(rd_kafka_t *rk, const Member *m)
{
	rd_kafka_message_t *msg = rd_kafka_consumer_poll(rk, POLL_MS);

	if (msg == NULL)
		return;
	if (msg->err && msg->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
		fail("member %s: consumer error: %s", m->name, rd_kafka_message_errstr(msg));
	rd_kafka_message_destroy(msg);
}

/* Partition count of topic, or -1. */
static int
topic_partitions(rd_kafka_t *rk, const char *topic)
{
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;
	int			n = -1;

	if (rkt == NULL)
		return -1;
	err = rd_kafka_metadata(rk, 0, rkt, &md, META_TIMEOUT_MS);
	if (err)
		fail("metadata for %s: %s", topic, rd_kafka_err2str(err));
	else if (md->topic_cnt != 1 || md->topics[0].err)
		fail("metadata for %s: %s", topic,
			 md->topic_cnt ? rd_kafka_err2str(md->topics[0].err) : "no topic");
	else
		n = md->topics[0].partition_cnt;
	if (md)
		rd_kafka_metadata_destroy(md);
	rd_kafka_topic_destroy(rkt);
	return n;
}

/* ------------------------------------------------------------------ */
/* Member B (child process)                                             */
/* ------------------------------------------------------------------ */

/*
 * Reports every change of "has partitions" to the parent on tofd ('A'
 * non-empty, 'E' empty) and leaves the group when the parent writes 'L' on
 * fromfd or goes away.  Never returns.
 */
static void
run_member_b(const char *bootstrap, const char *topic, const char *group,
			 const char *session_timeout, int fromfd, int tofd)
{
	Member		b = {.name = "B", .topic = topic};
	rd_kafka_t *rk;
	int			reported = -1;
	double		give_up = now_ms() + CHILD_LIFETIME_MS;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	rk = make_consumer(&b, bootstrap, group, session_timeout);
	if (rk == NULL)
		_exit(1);

	while (now_ms() < give_up)
	{
		struct pollfd pfd = {.fd = fromfd, .events = POLLIN};
		int			has = 0;

		poll_once(rk, &b);
		has = b.assigned > 0;
		if (has != reported)
		{
			char		c = has ? 'A' : 'E';

			if (write(tofd, &c, 1) != 1)
				break;
			reported = has;
		}
		if (poll(&pfd, 1, 0) > 0)
			break;				/* 'L', or EOF: the parent is gone */
	}

	rd_kafka_consumer_close(rk);
	rd_kafka_destroy(rk);
	_exit(0);
}

/* ------------------------------------------------------------------ */
/* One round, in the parent (member A, the survivor)                    */
/* ------------------------------------------------------------------ */

/*
 * Wait at most ms for child to exit; then SIGCONT + SIGKILL it.  Reaps.
 * (A stopped B may run for a moment between the two signals and log that
 * its group session timed out; that is expected and harmless.)
 */
static void
reap_child(pid_t child, int ms, bool force)
{
	double		until = now_ms() + ms;
	int			status;

	while (!force && now_ms() < until)
	{
		pid_t		r = waitpid(child, &status, WNOHANG);

		if (r == child || (r < 0 && errno != EINTR))
			return;
		usleep(20000);
	}
	kill(child, SIGCONT);
	kill(child, SIGKILL);
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
}

/*
 * Runs one round; returns the takeover time in ms (t1 - t0), or -1 on a
 * failure (already reported).  *revoke_ms gets when A first saw the
 * rebalance start (-1 if it never did).
 */
static double
run_round(const char *bootstrap, const char *topic, int round, bool stall,
		  const char *session_timeout, double *revoke_ms)
{
	char		group[128];
	int			down[2],
				up[2];
	pid_t		child;
	Member		a = {.name = "A", .topic = topic};
	rd_kafka_t *rk = NULL;
	int			nparts;
	char		b_state = 'E';
	double		t0 = 0,
				t1 = 0,
				deadline;
	double		result = -1;

	*revoke_ms = -1;
	snprintf(group, sizeof(group), "rebalance-%d-%d", (int) getpid(), round);

	if (pipe(down) < 0 || pipe(up) < 0)
	{
		fail("pipe: %s", strerror(errno));
		return -1;
	}
	fflush(stdout);
	fflush(stderr);
	child = fork();
	if (child < 0)
	{
		fail("fork: %s", strerror(errno));
		return -1;
	}
	if (child == 0)
	{
		close(down[1]);
		close(up[0]);
		run_member_b(bootstrap, topic, group, session_timeout, down[0], up[1]);
	}
	close(down[0]);
	close(up[1]);
	fcntl(up[0], F_SETFL, fcntl(up[0], F_GETFL) | O_NONBLOCK);
	watchdog_child = child;
	alarm(ROUND_WATCHDOG_S);

	rk = make_consumer(&a, bootstrap, group, session_timeout);
	if (rk == NULL)
		goto done;
	nparts = topic_partitions(rk, topic);
	if (nparts < 2)
	{
		fail("topic %s: %d partition(s); need at least 2 so both members get some",
			 topic, nparts);
		goto done;
	}

	/* Both members must hold partitions before B goes away. */
	deadline = now_ms() + WAIT_MS;
	for (;;)
	{
		char		c;

		poll_once(rk, &a);
		while (read(up[0], &c, 1) == 1)
			b_state = c;
		if (a.assigned > 0 && b_state == 'A')
			break;
		if (now_ms() > deadline)
		{
			fail("round %d: timeout after %d ms waiting for both members to "
				 "have partitions (A has %d, B %s)", round, WAIT_MS,
				 a.assigned, b_state == 'A' ? "some" : "none");
			goto done;
		}
	}

	/* B goes away; A must end up with every partition. */
	a.mark_at = t0 = now_ms();
	if (stall)
	{
		if (kill(child, SIGSTOP) < 0)
		{
			fail("SIGSTOP: %s", strerror(errno));
			goto done;
		}
	}
	else if (write(down[1], "L", 1) != 1)
	{
		fail("telling member B to leave: %s", strerror(errno));
		goto done;
	}

	deadline = t0 + WAIT_MS;
	while (a.assigned != nparts)
	{
		poll_once(rk, &a);
		if (now_ms() > deadline)
		{
			fail("round %d: timeout after %d ms waiting for the survivor to "
				 "get all %d partitions (has %d)", round, WAIT_MS, nparts,
				 a.assigned);
			goto done;
		}
	}
	t1 = now_ms();
	result = t1 - t0;
	if (a.revoke_at > 0)
		*revoke_ms = a.revoke_at - t0;

done:
	close(down[1]);				/* a B still running leaves on EOF */
	reap_child(child, stall ? 0 : REAP_MS, stall);
	close(up[0]);
	if (rk)
	{
		rd_kafka_consumer_close(rk);
		rd_kafka_destroy(rk);
	}
	alarm(0);
	watchdog_child = 0;
	return result;
}

/* ------------------------------------------------------------------ */
/* main                                                                 */
/* ------------------------------------------------------------------ */

static int
cmp_double(const void *x, const void *y)
{
	double		a = *(const double *) x,
				b = *(const double *) y;

	return (a > b) - (a < b);
}

/* Prints librdkafka's default for name; copies it to out (size outsz). */
static void
print_default(rd_kafka_conf_t *conf, const char *name, char *out, size_t outsz)
{
	char		buf[256];
	size_t		sz = sizeof(buf);

	if (rd_kafka_conf_get(conf, name, buf, &sz) != RD_KAFKA_CONF_OK)
		snprintf(buf, sizeof(buf), "?");
	printf("# librdkafka default %s = %s\n", name, buf);
	if (out)
		snprintf(out, outsz, "%s", buf);
}

int
main(int argc, char **argv)
{
	const char *bootstrap,
			   *topic,
			   *mode,
			   *session_timeout;
	int			rounds;
	bool		stall;
	double	   *ms;
	rd_kafka_conf_t *conf;
	char		default_timeout[256];

	if (argc != 5)
	{
		fprintf(stderr, "usage: %s BOOTSTRAP TOPIC ROUNDS leave|stall\n", argv[0]);
		return 2;
	}
	bootstrap = argv[1];
	topic = argv[2];
	rounds = atoi(argv[3]);
	mode = argv[4];
	if (rounds < 1 || rounds > MAX_ROUNDS)
	{
		fprintf(stderr, "ROUNDS must be 1..%d\n", MAX_ROUNDS);
		return 2;
	}
	if (strcmp(mode, "leave") != 0 && strcmp(mode, "stall") != 0)
	{
		fprintf(stderr, "MODE must be leave or stall\n");
		return 2;
	}
	stall = strcmp(mode, "stall") == 0;
	session_timeout = getenv("SESSION_TIMEOUT_MS");
	if (session_timeout != NULL && *session_timeout == '\0')
		session_timeout = NULL;

	signal(SIGALRM, on_watchdog);
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);

	conf = rd_kafka_conf_new();
	printf("# librdkafka %s\n", rd_kafka_version_str());
	print_default(conf, "session.timeout.ms", default_timeout, sizeof(default_timeout));
	print_default(conf, "heartbeat.interval.ms", NULL, 0);
	print_default(conf, "partition.assignment.strategy", NULL, 0);
	rd_kafka_conf_destroy(conf);
	if (session_timeout)
		printf("# session.timeout.ms used = %s (SESSION_TIMEOUT_MS)\n", session_timeout);
	else
		printf("# session.timeout.ms used = %s (librdkafka default)\n", default_timeout);

	ms = calloc(rounds, sizeof(double));
	if (ms == NULL)
		return 1;

	for (int r = 1; r <= rounds; r++)
	{
		double		revoke_ms;

		ms[r - 1] = run_round(bootstrap, topic, r, stall, session_timeout, &revoke_ms);
		if (ms[r - 1] < 0)
		{
			fail("round %d (%s) failed", r, mode);
			free(ms);
			return 1;
		}
		printf("# round %d: survivor saw the rebalance start (revoke) after %.0f ms\n",
			   r, revoke_ms);
		printf("round %d mode %s ms %.0f\n", r, mode, ms[r - 1]);
	}

	qsort(ms, rounds, sizeof(double), cmp_double);
	printf("summary mode %s rounds %d min %.0f median %.0f max %.0f\n",
		   mode, rounds, ms[0],
		   rounds % 2 ? ms[rounds / 2] : (ms[rounds / 2 - 1] + ms[rounds / 2]) / 2,
		   ms[rounds - 1]);
	free(ms);
	return 0;
}
