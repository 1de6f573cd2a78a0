/*
 * kiln-vsock: AF_VSOCK stream tests, run inside a Kiln guest.
 *
 * Usage:
 *   kiln-vsock serve PORT
 *   kiln-vsock send CID PORT NBYTES SEED
 *   kiln-vsock fetch CID PORT NBYTES SEED
 *   kiln-vsock echo-many CID PORT CONNS NBYTES      (CONNS 1..256)
 *   kiln-vsock abort CID PORT NBYTES
 *
 * Byte pattern (the host-side tests compute the same, tests/src/vsock_proto.rs): the stream for
 * seed s is xorshift32 started at x = s ^ 0x9E3779B9 (1 if that is 0); each byte is
 * x ^= x << 13; x ^= x >> 17; x ^= x << 5; byte = x & 0xff.
 * Checksum: FNV-1a 64 over the bytes, printed as 16 lowercase hex digits.
 *
 * Protocol on every stream: the connecting side first sends one command line ending in '\n'
 * (64 bytes at most, the '\n' included), then
 *   ECHO\n                the server echoes every byte until EOF, then shuts down its write
 *                         side and closes;
 *   SINK\n                the server reads to EOF, then writes "<nbytes> <fnv64hex>\n" and closes;
 *   SOURCE <n> <seed>\n   the server writes n pattern bytes of that seed, then closes.
 *
 * serve: listens on VMADDR_CID_ANY:PORT, prints "KILN-VSOCK-LISTENING PORT" and serves every
 * connection in its own child process, forever. A child whose peer goes away or sends garbage
 * ends with at most one line on stderr.
 *
 * Clients print one line and exit 0 on success:
 *   KILN-VSOCK-SEND ok <n> <fnv>          (the server's SINK reply matched what was sent)
 *   KILN-VSOCK-FETCH ok <n> <fnv>         (n bytes of the pattern, then EOF)
 *   KILN-VSOCK-ECHO-MANY ok <conns> <total bytes>
 *   KILN-VSOCK-ABORT done
 * or, with exit status 1, one of
 *   <TAG> bad <what differed>             (wrong data, count or reply)
 *   <TAG> error <what failed>: <errno>    (a system call failed)
 *   <TAG> timeout after 120 s while <step> (<progress>)
 * Exit status 2: bad arguments.
 *
 * Built by guest-images/build.sh: gcc -Os -static -s (glibc).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
/* After <sys/socket.h>: it sizes struct sockaddr_vm with sa_family_t. */
#include <linux/vm_sockets.h>

#define BUF_SIZE (64u * 1024u)  /* one read or write per system call, at most */
#define CMD_MAX 64u             /* longest command line, '\n' included */
#define MAX_CONNS 256u
#define TIMEOUT_S 120u          /* whole-run deadline of every client command */
#define CONNECT_TIMEOUT_S 110   /* AF_VSOCK's own default is 2 s: too short for a slow guest */
#define ECHO_BURST 8            /* reads or writes per ready connection per poll round */

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

static unsigned char iobuf[BUF_SIZE];

/* ---- pattern and checksum ---------------------------------------------------------------- */

struct pattern {
	uint32_t x;
};

static void pattern_init(struct pattern *p, uint32_t seed)
{
	uint32_t x = seed ^ 0x9E3779B9u;

	p->x = x ? x : 1;
}

static inline unsigned char pattern_next(struct pattern *p)
{
	uint32_t x = p->x;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	p->x = x;
	return (unsigned char)(x & 0xffu);
}

static void pattern_fill(struct pattern *p, unsigned char *b, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		b[i] = pattern_next(p);
}

static void pattern_skip(struct pattern *p, size_t n)
{
	while (n--)
		(void)pattern_next(p);
}

/*
 * Compare b[0..n) with the next n pattern bytes. Returns n if all match, else the index of the
 * first byte that differs, with the expected byte in *want (p is then past that byte).
 */
static size_t pattern_check(struct pattern *p, const unsigned char *b, size_t n,
			    unsigned char *want)
{
	size_t i;

	for (i = 0; i < n; i++) {
		unsigned char w = pattern_next(p);

		if (b[i] != w) {
			*want = w;
			return i;
		}
	}
	return n;
}

static uint64_t fnv_update(uint64_t h, const unsigned char *b, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		h ^= b[i];
		h *= FNV_PRIME;
	}
	return h;
}

/* ---- reporting and the deadline ---------------------------------------------------------- */

static const char *volatile tag = "KILN-VSOCK";
static const char *volatile step = "starting";

/* What the timeout line reports as progress: up to two "<done> of <total> <unit>" counters. */
struct progress {
	volatile uint64_t done;
	volatile uint64_t total;
	const char *volatile unit;
};
static struct progress prog[2];

static void set_step(const char *what)
{
	step = what;
	prog[0].unit = NULL;
	prog[1].unit = NULL;
}

static void set_progress(int i, uint64_t total, const char *unit)
{
	prog[i].done = 0;
	prog[i].total = total;
	prog[i].unit = unit;
}

static void out_line(const char *word, const char *fmt, va_list ap)
{
	printf("%s %s ", tag, word);
	vprintf(fmt, ap);
	printf("\n");
	fflush(stdout);
}

/* A system call failed: "<TAG> error ...", exit 1. */
static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	out_line("error", fmt, ap);
	va_end(ap);
	exit(1);
}

/* The data was wrong: "<TAG> bad ...", exit 1. */
static void __attribute__((noreturn, format(printf, 1, 2))) bad(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	out_line("bad", fmt, ap);
	va_end(ap);
	exit(1);
}

/* Async-signal-safe string building for the SIGALRM handler. */
static size_t put_str(char *m, size_t n, size_t cap, const char *s)
{
	while (s && *s && n + 1 < cap)
		m[n++] = *s++;
	return n;
}

static size_t put_u64(char *m, size_t n, size_t cap, uint64_t v)
{
	char d[21];
	size_t k = 0;

	do {
		d[k++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (k && n + 1 < cap)
		m[n++] = d[--k];
	return n;
}

static void on_alarm(int sig)
{
	char m[320];
	size_t n = 0, cap = sizeof(m) - 1; /* room for the '\n' */
	int i, any = 0;

	(void)sig;
	n = put_str(m, n, cap, tag);
	n = put_str(m, n, cap, " timeout after ");
	n = put_u64(m, n, cap, TIMEOUT_S);
	n = put_str(m, n, cap, " s while ");
	n = put_str(m, n, cap, step);
	for (i = 0; i < 2; i++) {
		if (!prog[i].unit)
			continue;
		n = put_str(m, n, cap, any ? ", " : " (");
		n = put_u64(m, n, cap, prog[i].done);
		n = put_str(m, n, cap, " of ");
		n = put_u64(m, n, cap, prog[i].total);
		n = put_str(m, n, cap, " ");
		n = put_str(m, n, cap, prog[i].unit);
		any = 1;
	}
	if (any)
		n = put_str(m, n, cap, ")");
	m[n++] = '\n';
	/* stdout is flushed after every line, so nothing of ours is half-written in its buffer. */
	if (write(STDOUT_FILENO, m, n) < 0) {
		/* nothing left to report it on */
	}
	_exit(1);
}

static void set_signal(int sig, void (*handler)(int))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	if (sigemptyset(&sa.sa_mask) != 0 || sigaction(sig, &sa, NULL) != 0)
		fail("sigaction(%d): %s", sig, strerror(errno));
}

static void start_deadline(void)
{
	set_signal(SIGALRM, on_alarm);
	alarm(TIMEOUT_S);
}

/* ---- parsing ----------------------------------------------------------------------------- */

/* Strict unsigned decimal, digits only, at most max. Returns 0 on success. */
static int parse_u64(const char *s, size_t len, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;
	size_t i;

	if (len == 0 || len > 20)
		return -1;
	for (i = 0; i < len; i++) {
		unsigned d;

		if (s[i] < '0' || s[i] > '9')
			return -1;
		d = (unsigned)(s[i] - '0');
		if (v > (UINT64_MAX - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	if (v > max)
		return -1;
	*out = v;
	return 0;
}

static void __attribute__((noreturn)) usage(void)
{
	fprintf(stderr,
		"usage: kiln-vsock serve PORT\n"
		"       kiln-vsock send CID PORT NBYTES SEED\n"
		"       kiln-vsock fetch CID PORT NBYTES SEED\n"
		"       kiln-vsock echo-many CID PORT CONNS NBYTES\n"
		"       kiln-vsock abort CID PORT NBYTES\n");
	exit(2);
}

static uint64_t arg_u64(const char *name, const char *s, uint64_t min, uint64_t max)
{
	uint64_t v;

	if (parse_u64(s, strlen(s), max, &v) != 0 || v < min) {
		printf("%s usage: bad %s '%.32s' (%" PRIu64 "..%" PRIu64 ")\n", tag, name, s, min,
		       max);
		fflush(stdout);
		usage();
	}
	return v;
}

/* ---- socket helpers ---------------------------------------------------------------------- */

/* Write all of b[0..n). Returns 0, or -1 with errno. */
static int write_all(int fd, const unsigned char *b, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, b, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (w == 0) {
			errno = EIO;
			return -1;
		}
		b += w;
		n -= (size_t)w;
	}
	return 0;
}

static ssize_t read_retry(int fd, unsigned char *b, size_t n)
{
	ssize_t r;

	do
		r = read(fd, b, n);
	while (r < 0 && errno == EINTR);
	return r;
}

static void vsock_addr(struct sockaddr_vm *a, uint32_t cid, uint32_t port)
{
	memset(a, 0, sizeof(*a));
	a->svm_family = AF_VSOCK;
	a->svm_cid = cid;
	a->svm_port = port;
}

static int vsock_socket(int nonblock)
{
	struct timeval tv = { .tv_sec = CONNECT_TIMEOUT_S, .tv_usec = 0 };
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);

	if (fd < 0)
		fail("socket(AF_VSOCK): %s", strerror(errno));
	if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv)) != 0)
		fail("setsockopt(SO_VM_SOCKETS_CONNECT_TIMEOUT): %s", strerror(errno));
	return fd;
}

static int connect_blocking(uint32_t cid, uint32_t port)
{
	struct sockaddr_vm a;
	int fd = vsock_socket(0);

	vsock_addr(&a, cid, port);
	set_step("connecting");
	while (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		if (errno == EINTR) /* AF_VSOCK drops the attempt on a signal: start over */
			continue;
		if (errno == EISCONN)
			break;
		fail("connect to %" PRIu32 ":%" PRIu32 ": %s", cid, port, strerror(errno));
	}
	return fd;
}

static void close_or_fail(int fd)
{
	if (close(fd) != 0)
		fail("close: %s", strerror(errno));
}

/* Printable copy of b[0..n), at most cap-1 characters, for messages. */
static void sanitize(char *dst, size_t cap, const char *b, size_t n)
{
	size_t i;

	for (i = 0; i < n && i + 1 < cap; i++)
		dst[i] = (b[i] >= 0x20 && b[i] < 0x7f) ? b[i] : '?';
	dst[i] = '\0';
}

/* ---- server ------------------------------------------------------------------------------ */

static char peer_name[48];

static void __attribute__((noreturn, format(printf, 1, 2))) child_quit(const char *fmt, ...)
{
	va_list ap;

	if (fmt) {
		fprintf(stderr, "kiln-vsock: %s: ", peer_name);
		va_start(ap, fmt);
		vfprintf(stderr, fmt, ap);
		va_end(ap);
		fputc('\n', stderr);
		fflush(stderr);
	}
	_exit(fmt ? 1 : 0);
}

/* Serve one connection (in its own process); never returns. */
static void __attribute__((noreturn)) serve_conn(int fd)
{
	size_t got = 0, line_len, extra;
	char *nl = NULL, line[CMD_MAX];
	uint64_t total = 0, h = FNV_OFFSET;
	ssize_t r;

	/* The command line; whatever follows it in the same reads is already stream data. */
	while (!(nl = memchr(iobuf, '\n', got < CMD_MAX ? got : CMD_MAX))) {
		if (got >= CMD_MAX)
			child_quit("no command line in the first %u bytes", CMD_MAX);
		r = read_retry(fd, iobuf + got, BUF_SIZE - got);
		if (r < 0)
			child_quit("read command: %s", strerror(errno));
		if (r == 0)
			child_quit(got ? "EOF inside the command line" : NULL);
		got += (size_t)r;
	}
	line_len = (size_t)(nl - (char *)iobuf);
	memcpy(line, iobuf, line_len);
	line[line_len] = '\0';
	extra = got - line_len - 1;
	memmove(iobuf, nl + 1, extra);

	if (strcmp(line, "ECHO") == 0) {
		while (1) {
			if (extra && write_all(fd, iobuf, extra) != 0)
				child_quit("ECHO write after %" PRIu64 " bytes: %s", total,
					   strerror(errno));
			total += extra;
			r = read_retry(fd, iobuf, BUF_SIZE);
			if (r < 0)
				child_quit("ECHO read after %" PRIu64 " bytes: %s", total,
					   strerror(errno));
			if (r == 0)
				break;
			extra = (size_t)r;
		}
		if (shutdown(fd, SHUT_WR) != 0)
			child_quit("ECHO shutdown after %" PRIu64 " bytes: %s", total,
				   strerror(errno));
	} else if (strcmp(line, "SINK") == 0) {
		char reply[64];
		int len;

		while (1) {
			h = fnv_update(h, iobuf, extra);
			total += extra;
			r = read_retry(fd, iobuf, BUF_SIZE);
			if (r < 0)
				child_quit("SINK read after %" PRIu64 " bytes: %s", total,
					   strerror(errno));
			if (r == 0)
				break;
			extra = (size_t)r;
		}
		len = snprintf(reply, sizeof(reply), "%" PRIu64 " %016" PRIx64 "\n", total, h);
		if (write_all(fd, (const unsigned char *)reply, (size_t)len) != 0)
			child_quit("SINK reply after %" PRIu64 " bytes: %s", total, strerror(errno));
	} else if (strncmp(line, "SOURCE ", 7) == 0) {
		char *a = line + 7, *sp = strchr(a, ' ');
		uint64_t n, seed;
		struct pattern p;

		if (!sp || parse_u64(a, (size_t)(sp - a), UINT64_MAX, &n) != 0 ||
		    parse_u64(sp + 1, strlen(sp + 1), UINT32_MAX, &seed) != 0) {
			char shown[CMD_MAX];

			sanitize(shown, sizeof(shown), line, line_len);
			child_quit("bad command line '%s'", shown);
		}
		pattern_init(&p, (uint32_t)seed);
		while (total < n) {
			size_t chunk = n - total < BUF_SIZE ? (size_t)(n - total) : BUF_SIZE;

			pattern_fill(&p, iobuf, chunk);
			if (write_all(fd, iobuf, chunk) != 0)
				child_quit("SOURCE write after %" PRIu64 " of %" PRIu64 " bytes: %s",
					   total, n, strerror(errno));
			total += chunk;
		}
	} else {
		char shown[CMD_MAX];

		sanitize(shown, sizeof(shown), line, line_len);
		child_quit("bad command line '%s'", shown);
	}
	if (close(fd) != 0)
		child_quit("close: %s", strerror(errno));
	_exit(0);
}

static int cmd_serve(uint32_t port)
{
	struct sockaddr_vm a;
	int lfd;

	set_signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	lfd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		fail("socket(AF_VSOCK): %s", strerror(errno));
	vsock_addr(&a, VMADDR_CID_ANY, port);
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) != 0)
		fail("bind to port %" PRIu32 ": %s", port, strerror(errno));
	if (listen(lfd, 128) != 0)
		fail("listen: %s", strerror(errno));
	printf("KILN-VSOCK-LISTENING %" PRIu32 "\n", port);
	if (fflush(stdout) != 0)
		exit(1);

	while (1) {
		socklen_t alen = sizeof(a);
		int fd = accept4(lfd, (struct sockaddr *)&a, &alen, SOCK_CLOEXEC);
		pid_t pid;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOMEM ||
			    errno == ENOBUFS) {
				struct timespec ts = { 0, 100 * 1000 * 1000 };

				fprintf(stderr, "kiln-vsock: accept: %s\n", strerror(errno));
				nanosleep(&ts, NULL); /* wait for children to finish */
				continue;
			}
			fail("accept: %s", strerror(errno));
		}
		pid = fork();
		if (pid == 0) {
			snprintf(peer_name, sizeof(peer_name), "connection from %" PRIu32 ":%" PRIu32,
				 (uint32_t)a.svm_cid, (uint32_t)a.svm_port);
			close(lfd);
			serve_conn(fd);
		}
		if (pid < 0)
			fprintf(stderr, "kiln-vsock: fork: %s (connection dropped)\n",
				strerror(errno));
		close(fd);
	}
}

/* ---- send: SINK ------------------------------------------------------------------------- */

static int cmd_send(uint32_t cid, uint32_t port, uint64_t n, uint32_t seed)
{
	static const char cmd[] = "SINK\n";
	size_t len = sizeof(cmd) - 1, got = 0;
	uint64_t h = FNV_OFFSET, left = n;
	char reply[96], want[64], shown[96], *nl;
	struct pattern p;
	int fd = connect_blocking(cid, port);

	set_step("sending");
	set_progress(0, n, "bytes sent");
	pattern_init(&p, seed);
	memcpy(iobuf, cmd, len);
	do {
		size_t chunk = left < BUF_SIZE - len ? (size_t)left : BUF_SIZE - len;

		pattern_fill(&p, iobuf + len, chunk);
		h = fnv_update(h, iobuf + len, chunk);
		if (write_all(fd, iobuf, len + chunk) != 0)
			fail("write after %" PRIu64 " of %" PRIu64 " bytes: %s", n - left, n,
			     strerror(errno));
		left -= chunk;
		prog[0].done = n - left;
		len = 0;
	} while (left > 0);
	set_step("shutting down the write side");
	if (shutdown(fd, SHUT_WR) != 0)
		fail("shutdown(SHUT_WR): %s", strerror(errno));

	set_step("reading the SINK reply");
	while (!(nl = memchr(reply, '\n', got)) && got < sizeof(reply)) {
		ssize_t r = read_retry(fd, (unsigned char *)reply + got, sizeof(reply) - got);

		if (r < 0)
			fail("read reply: %s", strerror(errno));
		if (r == 0)
			break;
		got += (size_t)r;
	}
	close_or_fail(fd);
	snprintf(want, sizeof(want), "%" PRIu64 " %016" PRIx64, n, h);
	if (!nl || (size_t)(nl - reply) != strlen(want) || memcmp(reply, want, strlen(want)) != 0) {
		sanitize(shown, sizeof(shown), reply, nl ? (size_t)(nl - reply) : got);
		bad("sent %s, reply '%s'%s", want, shown, nl ? "" : " (no newline)");
	}
	printf("KILN-VSOCK-SEND ok %s\n", want);
	fflush(stdout);
	return 0;
}

/* ---- fetch: SOURCE ----------------------------------------------------------------------- */

static int cmd_fetch(uint32_t cid, uint32_t port, uint64_t n, uint32_t seed)
{
	char cmd[CMD_MAX];
	uint64_t got = 0, h = FNV_OFFSET;
	struct pattern p;
	int len, fd = connect_blocking(cid, port);

	len = snprintf(cmd, sizeof(cmd), "SOURCE %" PRIu64 " %" PRIu32 "\n", n, seed);
	set_step("sending the command");
	if (write_all(fd, (const unsigned char *)cmd, (size_t)len) != 0)
		fail("write command: %s", strerror(errno));

	set_step("receiving");
	set_progress(0, n, "bytes received");
	pattern_init(&p, seed);
	while (1) {
		ssize_t r = read_retry(fd, iobuf, BUF_SIZE);
		unsigned char w = 0;
		size_t at;

		if (r < 0)
			fail("read after %" PRIu64 " of %" PRIu64 " bytes: %s", got, n,
			     strerror(errno));
		if (r == 0)
			break;
		if ((uint64_t)r > n - got)
			bad("more than %" PRIu64 " bytes (at least %" PRIu64 ")", n, got + (uint64_t)r);
		at = pattern_check(&p, iobuf, (size_t)r, &w);
		if (at != (size_t)r)
			bad("byte at offset %" PRIu64 " is 0x%02x, want 0x%02x", got + at, iobuf[at],
			    w);
		h = fnv_update(h, iobuf, (size_t)r);
		got += (uint64_t)r;
		prog[0].done = got;
	}
	close_or_fail(fd);
	if (got != n)
		bad("EOF after %" PRIu64 " of %" PRIu64 " bytes", got, n);
	printf("KILN-VSOCK-FETCH ok %" PRIu64 " %016" PRIx64 "\n", n, h);
	fflush(stdout);
	return 0;
}

/* ---- echo-many: ECHO on many connections at once ------------------------------------------ */

enum conn_state { C_CONNECTING, C_OPEN, C_DONE };

struct conn {
	int fd;
	enum conn_state state;
	int tx_done;        /* SHUT_WR sent */
	size_t cmd_off;     /* bytes of "ECHO\n" written */
	uint64_t tx_off;    /* pattern bytes written */
	uint64_t rx_off;    /* pattern bytes read back and checked */
	struct pattern tx, rx;
};

static struct conn conns[MAX_CONNS];
static struct pollfd pfds[MAX_CONNS];

static const char echo_cmd[] = "ECHO\n";
#define ECHO_CMD_LEN (sizeof(echo_cmd) - 1)

/* Writes until the socket is full, or for ECHO_BURST rounds; shuts down the write side at the end. */
static void echo_write(unsigned i, struct conn *c, uint64_t n)
{
	int k;

	for (k = 0; k < ECHO_BURST && !c->tx_done; k++) {
		size_t cmd_left = ECHO_CMD_LEN - c->cmd_off, chunk, len;
		struct pattern next = c->tx;
		ssize_t w;

		if (cmd_left == 0 && c->tx_off == n) {
			if (shutdown(c->fd, SHUT_WR) != 0)
				fail("connection %u: shutdown(SHUT_WR): %s", i, strerror(errno));
			c->tx_done = 1;
			break;
		}
		memcpy(iobuf, echo_cmd + c->cmd_off, cmd_left);
		chunk = n - c->tx_off < BUF_SIZE - cmd_left ? (size_t)(n - c->tx_off)
							   : BUF_SIZE - cmd_left;
		pattern_fill(&next, iobuf + cmd_left, chunk);
		len = cmd_left + chunk;
		w = write(c->fd, iobuf, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			fail("connection %u: write at offset %" PRIu64 ": %s", i, c->tx_off,
			     strerror(errno));
		}
		if ((size_t)w <= cmd_left) {
			c->cmd_off += (size_t)w;
		} else {
			size_t pat = (size_t)w - cmd_left;

			c->cmd_off = ECHO_CMD_LEN;
			if (pat == chunk)
				c->tx = next;
			else
				pattern_skip(&c->tx, pat); /* the rest is generated again next time */
			c->tx_off += pat;
		}
		if ((size_t)w < len)
			break; /* full for now */
	}
}

/* Reads what has arrived, checking it; returns 1 at EOF (the connection is then finished). */
static int echo_read(unsigned i, struct conn *c, uint64_t n)
{
	int k;

	for (k = 0; k < ECHO_BURST; k++) {
		ssize_t r = read(c->fd, iobuf, BUF_SIZE);
		unsigned char w = 0;
		size_t at;

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			fail("connection %u: read at offset %" PRIu64 ": %s", i, c->rx_off,
			     strerror(errno));
		}
		if (r == 0) {
			if (c->rx_off != n)
				bad("connection %u: EOF at offset %" PRIu64 " of %" PRIu64, i,
				    c->rx_off, n);
			if (!c->tx_done) /* cannot happen: n bytes came back, so all were sent */
				bad("connection %u: EOF before the write side was done", i);
			return 1;
		}
		if ((uint64_t)r > n - c->rx_off)
			bad("connection %u: more than %" PRIu64 " bytes echoed (at least %" PRIu64 ")",
			    i, n, c->rx_off + (uint64_t)r);
		at = pattern_check(&c->rx, iobuf, (size_t)r, &w);
		if (at != (size_t)r)
			bad("connection %u: byte at offset %" PRIu64 " is 0x%02x, want 0x%02x", i,
			    c->rx_off + at, iobuf[at], w);
		c->rx_off += (uint64_t)r;
		if ((size_t)r < BUF_SIZE)
			return 0; /* most likely drained: let poll say when there is more */
	}
	return 0;
}

static int cmd_echo_many(uint32_t cid, uint32_t port, unsigned nconns, uint64_t n)
{
	struct sockaddr_vm a;
	unsigned i, left = nconns;

	vsock_addr(&a, cid, port);
	set_step("starting the connections");
	for (i = 0; i < nconns; i++) {
		struct conn *c = &conns[i];

		c->fd = vsock_socket(1);
		c->state = C_CONNECTING;
		pattern_init(&c->tx, i);
		pattern_init(&c->rx, i);
		if (connect(c->fd, (struct sockaddr *)&a, sizeof(a)) == 0)
			c->state = C_OPEN;
		else if (errno != EINPROGRESS)
			fail("connection %u: connect to %" PRIu32 ":%" PRIu32 ": %s", i, cid, port,
			     strerror(errno));
	}

	set_step("echoing");
	set_progress(0, nconns, "connected");
	set_progress(1, nconns, "finished");
	for (i = 0; i < nconns; i++)
		prog[0].done += conns[i].state == C_OPEN;
	while (left > 0) {
		unsigned np = 0;

		for (i = 0; i < nconns; i++) {
			struct conn *c = &conns[i];

			if (c->state == C_DONE)
				continue;
			pfds[np].fd = c->fd;
			pfds[np].events = c->state == C_CONNECTING ? POLLOUT
				: (short)(POLLIN | (c->tx_done ? 0 : POLLOUT));
			pfds[np].revents = 0;
			np++;
		}
		if (poll(pfds, np, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail("poll: %s", strerror(errno));
		}
		np = 0;
		for (i = 0; i < nconns; i++) {
			struct conn *c = &conns[i];
			short ev;

			if (c->state == C_DONE)
				continue;
			ev = pfds[np++].revents;
			if (!ev)
				continue;
			if (c->state == C_CONNECTING) {
				int err = 0;
				socklen_t elen = sizeof(err);

				if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0)
					fail("connection %u: getsockopt(SO_ERROR): %s", i,
					     strerror(errno));
				if (err != 0)
					fail("connection %u: connect to %" PRIu32 ":%" PRIu32 ": %s", i,
					     cid, port, strerror(err));
				if (ev & POLLNVAL)
					fail("connection %u: poll: POLLNVAL", i);
				c->state = C_OPEN;
				prog[0].done++;
				/* No read yet: poll again with POLLIN included. */
				echo_write(i, c, n);
				continue;
			}
			if (ev & POLLNVAL)
				fail("connection %u: poll: POLLNVAL", i);
			if (ev & POLLERR) { /* report it rather than spin on it */
				int err = 0;
				socklen_t elen = sizeof(err);

				if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0)
					fail("connection %u: getsockopt(SO_ERROR): %s", i,
					     strerror(errno));
				if (err != 0)
					fail("connection %u: at offset %" PRIu64 ": %s", i,
					     c->rx_off, strerror(err));
			}
			if (ev & (POLLIN | POLLHUP | POLLERR)) {
				if (echo_read(i, c, n)) {
					close_or_fail(c->fd);
					c->state = C_DONE;
					left--;
					prog[1].done++;
					continue;
				}
			}
			if (!c->tx_done && (ev & (POLLOUT | POLLERR)))
				echo_write(i, c, n);
		}
	}
	printf("KILN-VSOCK-ECHO-MANY ok %u %" PRIu64 "\n", nconns, (uint64_t)nconns * n);
	fflush(stdout);
	return 0;
}

/* ---- abort: a peer that dies mid-stream -------------------------------------------------- */

static int cmd_abort(uint32_t cid, uint32_t port, uint64_t n)
{
	static const char cmd[] = "SINK\n";
	size_t len = sizeof(cmd) - 1;
	uint64_t left = n;
	struct pattern p;
	int fd = connect_blocking(cid, port);

	set_step("sending");
	set_progress(0, n, "bytes sent");
	pattern_init(&p, 0);
	memcpy(iobuf, cmd, len);
	do {
		size_t chunk = left < BUF_SIZE - len ? (size_t)left : BUF_SIZE - len;

		pattern_fill(&p, iobuf + len, chunk);
		if (write_all(fd, iobuf, len + chunk) != 0)
			fail("write after %" PRIu64 " of %" PRIu64 " bytes: %s", n - left, n,
			     strerror(errno));
		left -= chunk;
		prog[0].done = n - left;
		len = 0;
	} while (left > 0);
	/* No shutdown, no reading the reply: just drop the connection. */
	close_or_fail(fd);
	printf("KILN-VSOCK-ABORT done\n");
	fflush(stdout);
	return 0;
}

/* ---- main -------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
	const char *cmd;
	uint32_t cid, port;

	if (argc < 3)
		usage();
	cmd = argv[1];
	/* A peer that goes away turns writes into EPIPE instead of killing us. */
	set_signal(SIGPIPE, SIG_IGN);

	if (strcmp(cmd, "serve") == 0) {
		tag = "KILN-VSOCK-SERVE";
		if (argc != 3)
			usage();
		return cmd_serve((uint32_t)arg_u64("PORT", argv[2], 0, UINT32_MAX));
	}
	if (strcmp(cmd, "send") == 0)
		tag = "KILN-VSOCK-SEND";
	else if (strcmp(cmd, "fetch") == 0)
		tag = "KILN-VSOCK-FETCH";
	else if (strcmp(cmd, "echo-many") == 0)
		tag = "KILN-VSOCK-ECHO-MANY";
	else if (strcmp(cmd, "abort") == 0)
		tag = "KILN-VSOCK-ABORT";
	else
		usage();
	if (argc != (strcmp(cmd, "abort") == 0 ? 5 : 6))
		usage();
	cid = (uint32_t)arg_u64("CID", argv[2], 0, UINT32_MAX);
	port = (uint32_t)arg_u64("PORT", argv[3], 0, UINT32_MAX);
	start_deadline();

	if (strcmp(cmd, "send") == 0)
		return cmd_send(cid, port, arg_u64("NBYTES", argv[4], 0, UINT64_MAX),
				(uint32_t)arg_u64("SEED", argv[5], 0, UINT32_MAX));
	if (strcmp(cmd, "fetch") == 0)
		return cmd_fetch(cid, port, arg_u64("NBYTES", argv[4], 0, UINT64_MAX),
				 (uint32_t)arg_u64("SEED", argv[5], 0, UINT32_MAX));
	if (strcmp(cmd, "echo-many") == 0)
		return cmd_echo_many(cid, port,
				     (unsigned)arg_u64("CONNS", argv[4], 1, MAX_CONNS),
				     arg_u64("NBYTES", argv[5], 0, UINT64_MAX));
	return cmd_abort(cid, port, arg_u64("NBYTES", argv[4], 0, UINT64_MAX));
}
