/*
 * kiln-blkbench: 4 KiB block I/O throughput, measured inside a Kiln guest.
 *
 * Usage: kiln-blkbench DEVICE MODE TOTAL_MIB
 *   MODE: seq-read | seq-write | rand-read | rand-write
 *
 * One 4 KiB pread/pwrite per system call, through O_DIRECT with a 4096-aligned
 * buffer (no guest page cache). Sequential modes walk the device from offset 0
 * (wrapping at its end); random modes pick 4 KiB-aligned offsets within the
 * device with a fixed-seed xorshift64, so every run issues the same offsets.
 * Writes end with fdatasync, inside the measured time.
 *
 * stdout (each line flushed at once, so a host watching the console can sample
 * the VMM's CPU time between the markers):
 *   KILN-BENCH-START <mode>
 *   KILN-BENCH-END <mode>
 *   KILN-BENCH <mode> bytes=<n> usec=<n> MiBps=<x.y> iops=<n>[ direct=0]
 * ` direct=0` means the file refused O_DIRECT and was read/written through the
 * page cache instead (e.g. tmpfs on older kernels; never a block device).
 * On any error: `KILN-BENCH-ERROR <mode> <reason>` and exit status 1.
 *
 * Built by guest-images/build.sh: gcc -Os -static -s (glibc).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u

static const char *mode_name = "unknown";

static void fail(const char *fmt, ...)
{
	va_list ap;

	printf("KILN-BENCH-ERROR %s ", mode_name);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	exit(1);
}

static void marker(const char *what)
{
	printf("KILN-BENCH-%s %s\n", what, mode_name);
	if (fflush(stdout) != 0)
		exit(1);
}

static uint64_t now_usec(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		fail("clock_gettime: %s", strerror(errno));
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* xorshift64 (Marsaglia), fixed seed: the same offsets on every run. */
static uint64_t rng_state = 0x6b696c6e626c6b31ull; /* "kilnblk1" */

static uint64_t xorshift64(void)
{
	uint64_t x = rng_state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	rng_state = x;
	return x;
}

static uint64_t device_size(int fd)
{
	uint64_t size = 0;
	off_t end;

	if (ioctl(fd, BLKGETSIZE64, &size) == 0)
		return size;
	end = lseek(fd, 0, SEEK_END);
	if (end < 0)
		fail("size: BLKGETSIZE64 and lseek(SEEK_END) failed: %s", strerror(errno));
	return (uint64_t)end;
}

static uint64_t parse_mib(const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v == 0 || v > (UINT64_MAX >> 20) || s[0] == '-')
		fail("bad TOTAL_MIB '%s' (a positive number of MiB)", s);
	return (uint64_t)v;
}

int main(int argc, char **argv)
{
	int is_write, is_rand, fd, flags, direct = 1;
	uint64_t total, size, nblocks, ops, i, t0, usec;
	unsigned char *buf;
	void *mem;

	if (argc != 4) {
		fprintf(stderr, "usage: kiln-blkbench DEVICE seq-read|seq-write|rand-read|rand-write TOTAL_MIB\n");
		fail("usage: kiln-blkbench DEVICE MODE TOTAL_MIB");
	}
	mode_name = argv[2];
	if (strcmp(argv[2], "seq-read") == 0) {
		is_write = 0, is_rand = 0;
	} else if (strcmp(argv[2], "seq-write") == 0) {
		is_write = 1, is_rand = 0;
	} else if (strcmp(argv[2], "rand-read") == 0) {
		is_write = 0, is_rand = 1;
	} else if (strcmp(argv[2], "rand-write") == 0) {
		is_write = 1, is_rand = 1;
	} else {
		fail("unknown mode (seq-read, seq-write, rand-read, rand-write)");
		return 1;
	}
	total = parse_mib(argv[3]) << 20;
	ops = total / BLOCK;

	if (posix_memalign(&mem, BLOCK, BLOCK) != 0)
		fail("posix_memalign failed");
	buf = mem;
	/* Not all zeros, so nothing along the way can take a zero-page shortcut. */
	for (i = 0; i < BLOCK; i++)
		buf[i] = (unsigned char)(i * 31u + 7u);

	flags = (is_write ? O_RDWR : O_RDONLY) | O_CLOEXEC;
	fd = open(argv[1], flags | O_DIRECT);
	if (fd < 0 && errno == EINVAL) {
		direct = 0;
		fd = open(argv[1], flags);
	}
	if (fd < 0)
		fail("open %s: %s", argv[1], strerror(errno));
	size = device_size(fd);
	nblocks = size / BLOCK;
	if (nblocks == 0)
		fail("%s is smaller than 4 KiB (%" PRIu64 " bytes)", argv[1], size);
	/* Some file systems accept O_DIRECT at open but refuse the I/O: probe one read. */
	if (direct && pread(fd, buf, BLOCK, 0) < 0) {
		if (errno != EINVAL)
			fail("pread %s at 0: %s", argv[1], strerror(errno));
		close(fd);
		direct = 0;
		fd = open(argv[1], flags);
		if (fd < 0)
			fail("open %s: %s", argv[1], strerror(errno));
	}
	for (i = 0; i < BLOCK; i++)
		buf[i] = (unsigned char)(i * 31u + 7u);

	marker("START");
	t0 = now_usec();
	for (i = 0; i < ops; i++) {
		uint64_t block = is_rand ? xorshift64() % nblocks : i % nblocks;
		off_t off = (off_t)(block * BLOCK);
		ssize_t n;

		if (is_write) {
			/* Stamp the op number so every block written differs. */
			memcpy(buf, &i, sizeof(i));
			n = pwrite(fd, buf, BLOCK, off);
		} else {
			n = pread(fd, buf, BLOCK, off);
		}
		if (n < 0)
			fail("%s at %" PRIu64 ": %s", is_write ? "pwrite" : "pread",
			     (uint64_t)off, strerror(errno));
		if ((size_t)n != BLOCK)
			fail("%s at %" PRIu64 ": short transfer (%zd of %u bytes)",
			     is_write ? "pwrite" : "pread", (uint64_t)off, n, BLOCK);
	}
	if (is_write && fdatasync(fd) != 0)
		fail("fdatasync: %s", strerror(errno));
	usec = now_usec() - t0;
	marker("END");
	if (close(fd) != 0)
		fail("close: %s", strerror(errno));
	if (usec == 0)
		usec = 1;

	printf("KILN-BENCH %s bytes=%" PRIu64 " usec=%" PRIu64 " MiBps=%.1f iops=%" PRIu64 "%s\n",
	       mode_name, total, usec, (double)total / 1048576.0 / ((double)usec / 1e6),
	       (uint64_t)((double)ops * 1e6 / (double)usec), direct ? "" : " direct=0");
	if (fflush(stdout) != 0)
		return 1;
	return 0;
}
