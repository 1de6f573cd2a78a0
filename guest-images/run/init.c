/*
 * kiln-run-init: PID 1 of run-initramfs.cpio, the guest side of `kiln run -- CMD [ARGS...]`.
 *
 * Boot: the kernel runs /init of run-initramfs.cpio (rdinit=/init). Then, with no process
 * spawned besides CMD (each one costs about a second here: guest kernel code is emulated):
 *
 * 1. Mounts devtmpfs on /dev, proc, sysfs, tmpfs on /tmp and /run; brings `lo` up.
 * 2. Connects AF_VSOCK stream CONTROL to the host (CID 2) port 10000, retrying refused or reset
 *    connections for 5 s, and reads the run spec:
 *      "KILNRUN1", u32 little-endian LEN (at most 1 MiB), LEN bytes of NUL-terminated
 *      "key=value" entries:
 *        root=disk | root=host       read-only ext4 /dev/vda | virtio-fs tag "kiln-root"
 *        share=TAG\tGUEST_DIR\tMODE  virtio-fs TAG on GUEST_DIR (absolute), MODE ro or rw
 *        cwd=PATH                    working directory of CMD (default /)
 *        env=NAME=VALUE              CMD's environment (default PATH, HOME=/root, TERM=linux),
 *                                    plus PID 1's GLIBC_TUNABLES (from the kernel command line)
 *                                    unless the spec sets it
 *        arg=ARG                     CMD's argv, in order (at least one)
 *        hostname=NAME
 *      Unknown keys are ignored; root= and arg= are required.
 * 3. Builds the root: the read-only lower on /lower, a tmpfs on /rw, an overlay (upper
 *    /rw/upper, work /rw/work) on /newroot, which becomes / (MS_MOVE + chroot, as switch_root
 *    does). In it: proc, sysfs, devtmpfs (/dev/pts with devpts if the kernel has it, /dev/fd
 *    and /dev/std{in,out,err} links), tmpfs on /tmp (1777) and /run, then the shares in spec
 *    order (after the tmpfs mounts, so a share may live under /tmp or /run); the hostname;
 *    chdir(cwd).
 * 4. Connects STDIN (port 10001, host to guest), STDOUT (10002) and STDERR (10003), in this
 *    order, and runs CMD with them as fds 0, 1, 2 in a new session (execvp with PATH from the
 *    spec's environment). If exec fails, CMD's stderr gets "kiln run: ARGV0: command not
 *    found" (exit 127) or "kiln run: ARGV0: <error>" (127 for ENOENT, else 126).
 * 5. Reaps every process until CMD exits, kills what is left (SIGKILL to all), shuts the three
 *    stdio streams down both ways, sync()s (writes to rw shares reach the host), then sends
 *    "EXIT <code>\n" or "SIGNAL <n>\n" on CONTROL and shuts down its write side.
 * 6. Waits, at most 5 min, for the host to close CONTROL (which the host does once stdout and
 *    stderr reached their end: output still queued in the guest or the VMM would be lost to a
 *    reset, and a slow reader on the host may take long), then reboot(RB_AUTOBOOT);
 *    with reboot=k the VMM sees the reset and exits.
 *
 * Any failure before CMD runs: "kiln-run-init: <message>" on the console (fds 1 and 2 of PID
 * 1) and, once CONTROL is up, "ERROR <message>\n" on it; then step 6. PID 1 never exits (that
 * would panic the kernel) unless reboot() itself fails; no wait is unbounded except for CMD.
 *
 * Built by guest-images/build.sh: gcc -Os -static -s (glibc).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* After <sys/socket.h>: it sizes struct sockaddr_vm with sa_family_t. */
#include <linux/vm_sockets.h>

#define PORT_CONTROL 10000u
#define PORT_STDIN 10001u
#define PORT_STDOUT 10002u
#define PORT_STDERR 10003u

#define SPEC_MAGIC "KILNRUN1"
#define SPEC_MAGIC_LEN 8u
#define SPEC_MAX (1u << 20)

#define CONNECT_RETRY_MS 5000   /* keep retrying refused/reset connections this long */
#define CONNECT_TIMEOUT_S 10    /* one connect attempt (AF_VSOCK's default is 2 s) */
#define IO_TIMEOUT_S 30         /* reading the spec, sending the status line */
#define CLOSE_WAIT_MS 300000    /* for the host to close CONTROL before the reset */
#define MSG_MAX 512

#define ROOT_TAG "kiln-root"
#define ROOT_DISK "/dev/vda"

extern char **environ;

static int ctl_fd = -1;

/* ---- reporting and the end ---------------------------------------------------------------- */

static int write_all(int fd, const char *b, size_t n)
{
	while (n > 0) {
		ssize_t w = send(fd, b, n, MSG_NOSIGNAL);

		if (w < 0 && errno == ENOTSOCK)
			w = write(fd, b, n);
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

static void __attribute__((format(printf, 1, 2))) console(const char *fmt, ...)
{
	char m[MSG_MAX + 32];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(m, sizeof(m), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(m)) {
		n = (int)sizeof(m) - 1;
		m[n - 1] = '\n';
	}
	if (write_all(STDERR_FILENO, m, (size_t)n) != 0) {
		/* nowhere else to say it */
	}
}

static long elapsed_ms(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long)(t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

static void nap_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/*
 * Shut down CONTROL's write side, then wait (bounded) until the host closes it: the host does
 * once it has the last line and EOF on STDOUT and STDERR, so nothing is lost to the reset.
 */
static void finish_control(void)
{
	struct timespec t0;
	char buf[256];

	if (ctl_fd < 0)
		return;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (shutdown(ctl_fd, SHUT_WR) != 0)
		console("kiln-run-init: shutdown(control): %s\n", strerror(errno));
	while (1) {
		struct pollfd p = { .fd = ctl_fd, .events = POLLIN, .revents = 0 };
		long left = CLOSE_WAIT_MS - elapsed_ms(&t0);
		ssize_t r;
		int n;

		if (left <= 0) {
			console("kiln-run-init: the host did not close the control connection within %d s\n",
				CLOSE_WAIT_MS / 1000);
			break;
		}
		n = poll(&p, 1, (int)left);
		if (n < 0 && errno != EINTR)
			break;
		if (n <= 0)
			continue;
		r = recv(ctl_fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (r > 0 || (r < 0 && (errno == EINTR || errno == EAGAIN)))
			continue; /* whatever the host still sends is ignored */
		break;            /* EOF, or the connection is gone */
	}
	close(ctl_fd);
	ctl_fd = -1;
}

static void __attribute__((noreturn)) power_off(void)
{
	finish_control();
	sync();
	reboot(RB_AUTOBOOT);
	console("kiln-run-init: reboot: %s\n", strerror(errno));
	/* PID 1 exiting panics the kernel; panic=1 then resets. */
	_exit(1);
}

/* Length of the valid UTF-8 sequence at s (1 to 4 bytes), or 0. Stops at a NUL. */
static size_t utf8_len(const unsigned char *s)
{
	size_t n, i;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		n = 2;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		n = 3;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		n = 4;
	else
		return 0;
	for (i = 1; i < n; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	/* overlong forms, surrogates, beyond U+10FFFF */
	if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0) ||
	    (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90))
		return 0;
	return n;
}

/* Failure before CMD ran: console, ERROR line on CONTROL if it is up, reset. */
static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
	char m[MSG_MAX], line[MSG_MAX + 8];
	va_list ap;
	size_t i;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(m, sizeof(m), fmt, ap);
	va_end(ap);
	if (n < 0)
		snprintf(m, sizeof(m), "(unprintable error)");
	for (i = 0; m[i];) { /* one line of valid UTF-8 (a %.64s may cut a character) */
		unsigned char c = (unsigned char)m[i];
		size_t k = utf8_len((const unsigned char *)m + i);

		if (k == 0 || c < 0x20 || c == 0x7f)
			m[i++] = '?';
		else
			i += k;
	}
	console("kiln-run-init: %s\n", m);
	if (ctl_fd >= 0) {
		n = snprintf(line, sizeof(line), "ERROR %s\n", m);
		if (write_all(ctl_fd, line, (size_t)n) != 0)
			console("kiln-run-init: sending the error to the host: %s\n", strerror(errno));
	}
	power_off();
}

/* ---- the run spec ------------------------------------------------------------------------- */

enum root_kind { ROOT_NONE, ROOT_IS_DISK, ROOT_IS_HOST };

struct share {
	const char *tag, *dir;
	int ro;
};

struct spec {
	enum root_kind root;
	const char *cwd, *hostname;
	char **argv, **envp; /* NULL-terminated */
	size_t argc, envc;
	struct share *shares;
	size_t nshares;
};

static char spec_err[MSG_MAX];

/*
 * Parse buf[0..len) (NUL-terminated entries; edited in place, pointed into by *s). Returns
 * NULL, or a message (in spec_err) for a malformed spec.
 */
static const char *parse_spec(char *buf, size_t len, struct spec *s)
{
	size_t n = 0, i;
	char *p, *next;

	memset(s, 0, sizeof(*s));
	if (len == 0 || buf[len - 1] != '\0')
		return "the run spec does not end with a NUL byte";
	for (i = 0; i < len; i++)
		n += buf[i] == '\0';
	s->argv = calloc(n + 1, sizeof(*s->argv));
	s->envp = calloc(n + 2, sizeof(*s->envp)); /* + GLIBC_TUNABLES, NULL */
	s->shares = calloc(n, sizeof(*s->shares));
	if (!s->argv || !s->envp || !s->shares)
		return "out of memory for the run spec";

	for (p = buf; p < buf + len; p = next) {
		char *key = p, *val = strchr(p, '=');

		next = p + strlen(p) + 1; /* before the '=' becomes a NUL */
		if (!val || val == p) {
			snprintf(spec_err, sizeof(spec_err), "run spec entry '%.64s' is not key=value",
				 p);
			return spec_err;
		}
		*val++ = '\0';
		if (strcmp(key, "root") == 0) {
			if (strcmp(val, "disk") == 0)
				s->root = ROOT_IS_DISK;
			else if (strcmp(val, "host") == 0)
				s->root = ROOT_IS_HOST;
			else {
				snprintf(spec_err, sizeof(spec_err),
					 "root=%.64s: want root=disk or root=host", val);
				return spec_err;
			}
		} else if (strcmp(key, "share") == 0) {
			struct share *sh = &s->shares[s->nshares];
			char *t1 = strchr(val, '\t'), *t2 = strrchr(val, '\t');
			const char *mode;

			if (!t1 || t1 == t2) {
				snprintf(spec_err, sizeof(spec_err),
					 "share=%.64s: want TAG<tab>GUEST_DIR<tab>ro|rw", val);
				return spec_err;
			}
			*t1 = '\0';
			*t2 = '\0';
			sh->tag = val;
			sh->dir = t1 + 1;
			mode = t2 + 1;
			if (!*sh->tag || sh->dir[0] != '/') {
				snprintf(spec_err, sizeof(spec_err),
					 "share of tag '%.64s' on '%.128s': want a tag and an absolute "
					 "guest directory", sh->tag, sh->dir);
				return spec_err;
			}
			if (strcmp(mode, "ro") == 0)
				sh->ro = 1;
			else if (strcmp(mode, "rw") != 0) {
				snprintf(spec_err, sizeof(spec_err),
					 "share of tag '%.64s': mode '%.16s', want ro or rw", sh->tag, mode);
				return spec_err;
			}
			s->nshares++;
		} else if (strcmp(key, "cwd") == 0) {
			if (!*val)
				return "cwd= is empty";
			s->cwd = val;
		} else if (strcmp(key, "env") == 0) {
			char *eq = strchr(val, '=');

			if (!eq || eq == val) {
				snprintf(spec_err, sizeof(spec_err), "env=%.64s: want env=NAME=VALUE", val);
				return spec_err;
			}
			s->envp[s->envc++] = val;
		} else if (strcmp(key, "arg") == 0) {
			s->argv[s->argc++] = val;
		} else if (strcmp(key, "hostname") == 0) {
			if (!*val || strlen(val) > HOST_NAME_MAX) {
				snprintf(spec_err, sizeof(spec_err), "hostname='%.80s': want 1 to %d bytes",
					 val, HOST_NAME_MAX);
				return spec_err;
			}
			s->hostname = val;
		}
		/* other keys: from a newer host, ignored */
	}
	if (s->root == ROOT_NONE)
		return "the run spec has no root= entry";
	if (s->argc == 0)
		return "the run spec has no arg= entry (no command)";
	if (!*s->argv[0])
		return "the command (first arg=) is empty";
	return NULL;
}

/* ---- vsock -------------------------------------------------------------------------------- */

static int connect_host(uint32_t port, const char *what)
{
	struct timeval tv = { .tv_sec = CONNECT_TIMEOUT_S, .tv_usec = 0 };
	struct sockaddr_vm a;
	struct timespec t0;

	memset(&a, 0, sizeof(a));
	a.svm_family = AF_VSOCK;
	a.svm_cid = VMADDR_CID_HOST;
	a.svm_port = port;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (1) {
		int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0), err;

		if (fd < 0)
			fail("%s connection: socket(AF_VSOCK): %s", what, strerror(errno));
		if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv)) != 0)
			fail("%s connection: setsockopt(SO_VM_SOCKETS_CONNECT_TIMEOUT): %s", what,
			     strerror(errno));
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
			return fd;
		err = errno;
		close(fd);
		/* EINTR: AF_VSOCK drops the attempt on a signal; refused/reset: nobody listens yet. */
		if ((err == ECONNREFUSED || err == ECONNRESET || err == EINTR) &&
		    elapsed_ms(&t0) < CONNECT_RETRY_MS) {
			nap_ms(100);
			continue;
		}
		fail("%s connection to the host (vsock CID 2 port %u): %s", what, (unsigned)port,
		     strerror(err));
	}
}

static void set_timeout(int fd, int opt, const char *name)
{
	struct timeval tv = { .tv_sec = IO_TIMEOUT_S, .tv_usec = 0 };

	if (setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof(tv)) != 0)
		fail("setsockopt(%s) on the control connection: %s", name, strerror(errno));
}

static void read_spec_bytes(void *buf, size_t n, const char *what)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(ctl_fd, (char *)buf + got, n - got);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			fail("no run spec from the host within %d s (%s: %zu of %zu bytes)",
			     IO_TIMEOUT_S, what, got, n);
		if (r < 0)
			fail("reading the run spec (%s): %s", what, strerror(errno));
		if (r == 0)
			fail("the host closed the control connection inside the run spec (%s: %zu of %zu bytes)",
			     what, got, n);
		got += (size_t)r;
	}
}

static void read_spec(struct spec *s)
{
	unsigned char hdr[SPEC_MAGIC_LEN + 4];
	const char *err;
	uint32_t len;
	char *buf;

	read_spec_bytes(hdr, sizeof(hdr), "header");
	if (memcmp(hdr, SPEC_MAGIC, SPEC_MAGIC_LEN) != 0)
		fail("the run spec does not start with " SPEC_MAGIC);
	len = (uint32_t)hdr[8] | (uint32_t)hdr[9] << 8 | (uint32_t)hdr[10] << 16 |
	      (uint32_t)hdr[11] << 24;
	if (len > SPEC_MAX)
		fail("run spec of %u bytes (at most %u)", (unsigned)len, SPEC_MAX);
	buf = malloc((size_t)len + 1);
	if (!buf)
		fail("out of memory for a run spec of %u bytes", (unsigned)len);
	read_spec_bytes(buf, len, "entries");
	buf[len] = '\0';
	err = parse_spec(buf, len, s);
	if (err)
		fail("%s", err);
}

/* ---- file systems ------------------------------------------------------------------------- */

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags,
		     const char *data)
{
	if (mount(src, dst, type, flags, data) != 0)
		fail("mount %s (%s%s%s) on %s: %s", src, type, data ? ", " : "", data ? data : "",
		     dst, strerror(errno));
}

/* mkdir -p; an existing directory is fine (also on a read-only file system). */
static int mkdir_p(const char *path)
{
	char b[PATH_MAX], *p;
	size_t n = strlen(path);
	struct stat st;

	if (n >= sizeof(b)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(b, path, n + 1);
	for (p = b + 1;; p++) {
		char c = *p;

		if (c != '/' && c != '\0')
			continue;
		if (p[-1] != '/') {
			*p = '\0';
			if (mkdir(b, 0755) != 0 && errno != EEXIST) {
				int e = errno;

				if (stat(b, &st) != 0 || !S_ISDIR(st.st_mode)) {
					errno = e;
					return -1;
				}
			}
			*p = c;
		}
		if (c == '\0')
			break;
	}
	if (stat(path, &st) != 0)
		return -1;
	if (!S_ISDIR(st.st_mode)) {
		errno = ENOTDIR;
		return -1;
	}
	return 0;
}

static void mount_at(const char *src, const char *dst, const char *type, unsigned long flags,
		     const char *data)
{
	if (mkdir_p(dst) != 0)
		fail("mkdir -p %s: %s", dst, strerror(errno));
	do_mount(src, dst, type, flags, data);
}

static void mount_virtiofs(const char *tag, const char *dir, int ro)
{
	if (mount(tag, dir, "virtiofs", ro ? MS_RDONLY : 0, NULL) != 0) {
		int e = errno;

		fail("mount virtio-fs tag %s on %s (%s): %s%s", tag, dir, ro ? "ro" : "rw",
		     strerror(e), e == EINVAL ? " (no virtio-fs device with that tag?)" : "");
	}
}

static void dev_link(const char *target, const char *name)
{
	if (symlink(target, name) != 0 && errno != EEXIST)
		fail("symlink %s -> %s: %s", name, target, strerror(errno));
}

static void build_root(const struct spec *s)
{
	size_t i;

	if (s->root == ROOT_IS_DISK)
		do_mount(ROOT_DISK, "/lower", "ext4", MS_RDONLY, NULL);
	else
		mount_virtiofs(ROOT_TAG, "/lower", 1);
	do_mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755");
	if (mkdir("/rw/upper", 0755) != 0 || mkdir("/rw/work", 0755) != 0)
		fail("mkdir in /rw: %s", strerror(errno));
	do_mount("overlay", "/newroot", "overlay", 0,
		 "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work");

	/* switch_root: the overlay becomes /; /lower and /rw stay mounted underneath. */
	if (chdir("/newroot") != 0)
		fail("chdir /newroot: %s", strerror(errno));
	if (mount(".", "/", NULL, MS_MOVE, NULL) != 0)
		fail("moving /newroot to /: %s", strerror(errno));
	if (chroot(".") != 0)
		fail("chroot into the new root: %s", strerror(errno));
	if (chdir("/") != 0)
		fail("chdir / in the new root: %s", strerror(errno));

	mount_at("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_at("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_at("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL); /* one instance: no options */
	if (mkdir_p("/dev/pts") != 0)
		fail("mkdir -p /dev/pts: %s", strerror(errno));
	/* ENODEV: a kernel without UNIX98_PTYS (ours) has no devpts. */
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		  "gid=5,mode=0620,ptmxmode=0666") != 0 && errno != ENODEV)
		fail("mount devpts on /dev/pts: %s", strerror(errno));
	dev_link("/proc/self/fd", "/dev/fd");
	dev_link("/proc/self/fd/0", "/dev/stdin");
	dev_link("/proc/self/fd/1", "/dev/stdout");
	dev_link("/proc/self/fd/2", "/dev/stderr");
	mount_at("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_at("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");

	for (i = 0; i < s->nshares; i++) {
		const struct share *sh = &s->shares[i];

		if (mkdir_p(sh->dir) != 0)
			fail("mkdir -p %s (for share %s): %s", sh->dir, sh->tag, strerror(errno));
		mount_virtiofs(sh->tag, sh->dir, sh->ro);
	}
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fail("socket(AF_INET): %s", strerror(errno));
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) != 0)
		fail("SIOCGIFFLAGS lo: %s", strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0)
		fail("SIOCSIFFLAGS lo up: %s", strerror(errno));
	close(fd);
}

/* ---- CMD ---------------------------------------------------------------------------------- */

static char *default_env[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"TERM=linux",
	NULL, /* GLIBC_TUNABLES */
	NULL,
};

#define TUNABLES "GLIBC_TUNABLES="

/*
 * CMD's environment: the spec's (or the default), plus GLIBC_TUNABLES from PID 1's own (from the
 * kernel command line: Kiln's nested-PVM hosts need it for any glibc program) unless the spec
 * sets it. env has room for one more entry.
 */
static char **cmd_env(char **env, size_t n)
{
	const char *t = getenv("GLIBC_TUNABLES");
	size_t i;

	if (!t)
		return env;
	for (i = 0; i < n; i++)
		if (strncmp(env[i], TUNABLES, sizeof(TUNABLES) - 1) == 0)
			return env;
	env[n] = (char *)t - (sizeof(TUNABLES) - 1);
	env[n + 1] = NULL;
	return env;
}

static void __attribute__((noreturn)) run_cmd(const struct spec *s, const int fds[3])
{
	struct sigaction sa;
	sigset_t none;
	char m[MSG_MAX];
	int sig, e, n;

	/* Dispositions and mask as a fresh process has them (exec keeps SIG_IGN). */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_DFL;
	sigemptyset(&sa.sa_mask);
	for (sig = 1; sig < NSIG; sig++)
		sigaction(sig, &sa, NULL); /* EINVAL for SIGKILL, SIGSTOP, glibc's own: fine */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setsid();
	/* The sockets are close-on-exec; their copies on 0, 1, 2 are not. */
	if (dup2(fds[0], 0) < 0 || dup2(fds[1], 1) < 0 || dup2(fds[2], 2) < 0)
		_exit(126);
	environ = s->envc ? cmd_env(s->envp, s->envc) : cmd_env(default_env, 3);
	execvp(s->argv[0], s->argv);
	e = errno;
	if (e == ENOENT && !strchr(s->argv[0], '/'))
		n = snprintf(m, sizeof(m), "kiln run: %.256s: command not found\n", s->argv[0]);
	else
		n = snprintf(m, sizeof(m), "kiln run: %.256s: %s\n", s->argv[0], strerror(e));
	if (n > 0 && write_all(2, m, (size_t)n) != 0) {
		/* the host went away */
	}
	_exit(e == ENOENT ? 127 : 126);
}

/* ---- main --------------------------------------------------------------------------------- */

int main(void)
{
	static const uint32_t ports[3] = { PORT_STDIN, PORT_STDOUT, PORT_STDERR };
	static const char *const names[3] = { "stdin", "stdout", "stderr" };
	struct sigaction sa;
	struct spec s;
	int fds[3], status = 0, i, n;
	char line[64];
	pid_t pid, w;

	/*
	 * The kernel opened the initramfs's /dev/console as 0, 1, 2. Should it have failed, fill
	 * them anyway (a directory, if need be): the sockets must not land there.
	 */
	for (i = 0; i < 3; i++)
		if (fcntl(i, F_GETFD) < 0 && open("/dev/console", O_RDWR | O_NOCTTY) < 0)
			open("/", O_RDONLY | O_DIRECTORY);
	/* A host that goes away turns writes into EPIPE. (Other signals with the default action
	 * never reach PID 1: the kernel drops them.) */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGPIPE, &sa, NULL);

	do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL);
	do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	do_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	loopback_up();

	ctl_fd = connect_host(PORT_CONTROL, "control");
	set_timeout(ctl_fd, SO_RCVTIMEO, "SO_RCVTIMEO");
	set_timeout(ctl_fd, SO_SNDTIMEO, "SO_SNDTIMEO");
	read_spec(&s);
	if (s.hostname && sethostname(s.hostname, strlen(s.hostname)) != 0)
		fail("sethostname %s: %s", s.hostname, strerror(errno));
	build_root(&s);
	if (s.cwd && chdir(s.cwd) != 0)
		fail("cwd %s: %s", s.cwd, strerror(errno));
	for (i = 0; i < 3; i++)
		fds[i] = connect_host(ports[i], names[i]);

	pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0)
		run_cmd(&s, fds);

	/* Orphans are ours to reap too; CMD's own status is the one that counts. */
	do {
		w = waitpid(-1, &status, 0);
		if (w < 0 && errno != EINTR)
			fail("waitpid: %s", strerror(errno));
	} while (w != pid);

	/* Whatever CMD left running goes now: it would only write after the status line. */
	kill(-1, SIGKILL);
	for (i = 0; i < 3; i++) {
		/* Queued after the data already written; ENOTCONN if the host closed first. */
		if (shutdown(fds[i], SHUT_RDWR) != 0 && errno != ENOTCONN)
			console("kiln-run-init: shutdown(%s): %s\n", names[i], strerror(errno));
		close(fds[i]);
	}
	sync();
	if (WIFSIGNALED(status))
		n = snprintf(line, sizeof(line), "SIGNAL %d\n", WTERMSIG(status));
	else
		n = snprintf(line, sizeof(line), "EXIT %d\n", WEXITSTATUS(status));
	if (write_all(ctl_fd, line, (size_t)n) != 0)
		console("kiln-run-init: sending '%.*s' to the host: %s\n", n - 1, line, strerror(errno));
	power_off();
}
