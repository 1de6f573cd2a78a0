#!/usr/bin/env bash
# Build Kiln's guest images: a minimal Linux 6.12 kernel for KVM microVMs, a
# busybox root filesystem (ext4 image and uncompressed initramfs), the static
# guest tools of tools/*.c (benchmarks, kept out of both root filesystems) and
# run-initramfs.cpio, whose only program is the `kiln run` init (run/init.c).
#
# Usage: guest-images/build.sh
#   stdout: exactly one line, the absolute path of the output directory
#   stderr: progress (KILN_VERBOSE=1 passes the whole kernel build output through)
#   exit status: non-zero with a message on stderr if anything fails
#
# Output: ${KILN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/guest-images}/<hash>/
#   vmlinux  bzImage  System.map  kernel.config  rootfs.ext4  initramfs.cpio
#   run-initramfs.cpio  kiln-blkbench  kiln-vsock  manifest.txt
# <hash> covers every input (this script, the kernel config fragment, the patches,
# the rootfs files, the tool sources, the files under run/, the versions of the Debian
# packages used), so a second run with the same inputs only prints the directory.
# See README.md.
set -euo pipefail

# Everything goes to stderr; fd 3 is the real stdout, for the one result line.
exec 3>&1 1>&2

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KERNEL_FRAGMENT=$HERE/kernel/x86_64.config
PATCH_DIR=$HERE/kernel/patches
ROOTFS_DIR=$HERE/rootfs
TOOLS_DIR=$HERE/tools
RUN_DIR=$HERE/run

# Fixed build identity (reproducible builds): 2025-01-01 00:00:00 UTC.
EPOCH=1735689600
ROOTFS_UUID=6b696c6e-6775-4573-8000-000000000001   # "kilnguEs..." fixed
ROOTFS_SIZE=32M

# Debian packages the build needs. The first group's versions are part of <hash>.
VERSIONED_PACKAGES=(linux-source-6.12 busybox-static gcc e2fsprogs cpio binutils make lz4 libc6-dev)
PACKAGES=("${VERSIONED_PACKAGES[@]}" build-essential flex bison bc libelf-dev xz-utils patch)

export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH=$EPOCH
umask 022
# Settings from the caller's environment that would change the kernel build.
unset ARCH CROSS_COMPILE KBUILD_OUTPUT O KCFLAGS KCPPFLAGS KAFLAGS KRUSTFLAGS \
	LOCALVERSION MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES GNUMAKEFLAGS

START=$SECONDS
# shellcheck source=common.sh
. "$HERE/common.sh"

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (this is $(uname -m))"

CACHE_ROOT=${KILN_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/kiln/guest-images}
mkdir -p "$CACHE_ROOT" || die "cannot create cache directory $CACHE_ROOT"
CACHE_ROOT=$(cd "$CACHE_ROOT" && pwd -P)

ensure_packages "${PACKAGES[@]}"

# --- Input hash -------------------------------------------------------------------------
INPUT_FILES=("$HERE/build.sh" "$HERE/common.sh" "$KERNEL_FRAGMENT")
mapfile -t PATCHES < <(find "$PATCH_DIR" -maxdepth 1 -name '*.patch' -type f | sort)
[ ${#PATCHES[@]} -gt 0 ] || die "no patches found in $PATCH_DIR"
mapfile -t ROOTFS_FILES < <(find "$ROOTFS_DIR" -type f | sort)
mapfile -t TOOL_SOURCES < <(find "$TOOLS_DIR" -maxdepth 1 -name '*.c' -type f | sort)
for tool in kiln-blkbench kiln-vsock; do
	[ -f "$TOOLS_DIR/$tool.c" ] || die "$TOOLS_DIR/$tool.c is missing"
done
mapfile -t RUN_FILES < <(find "$RUN_DIR" -type f | sort)
[ -f "$RUN_DIR/init.c" ] || die "$RUN_DIR/init.c is missing"
INPUT_FILES+=("${PATCHES[@]}" "${ROOTFS_FILES[@]}" "${TOOL_SOURCES[@]}" "${RUN_FILES[@]}")

GCC_REAL=$(readlink -f "$(command -v gcc)")
GCC_PKG=$(dpkg-query -S "$GCC_REAL" 2>/dev/null | head -n1 | cut -d: -f1 || true)

input_description() {
	local f p
	echo "# files (sha256, path relative to guest-images/)"
	for f in "${INPUT_FILES[@]}"; do
		printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "${f#"$HERE"/}"
	done
	echo "# Debian packages"
	for p in "${VERSIONED_PACKAGES[@]}" ${GCC_PKG:+"$GCC_PKG"}; do
		printf '%s %s\n' "$p" "$(pkg_version "$p")"
	done
}
INPUTS=$(input_description)
HASH=$(printf '%s\n' "$INPUTS" | sha256sum | cut -c1-16)
OUT=$CACHE_ROOT/$HASH

if [ -f "$OUT/manifest.txt" ]; then
	echo "$OUT" >&3
	exit 0
fi

# One build at a time per cache root.
take_lock "$CACHE_ROOT/.lock"
if [ -f "$OUT/manifest.txt" ]; then # built by another invocation while we waited
	echo "$OUT" >&3
	exit 0
fi
[ "$(id -u)" -eq 0 ] || die "building needs root (device node /dev/console, root-owned files); nothing cached for $HASH in $CACHE_ROOT"

log "building guest images $HASH into $CACHE_ROOT"
# Leftovers of killed builds: we hold the lock, so no one else is using them.
rm -rf "$CACHE_ROOT"/.tmp-*
TMP=$CACHE_ROOT/.tmp-$HASH-$$
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
mkdir -p "$TMP/out"

# --- Kernel source tree (unpacked once per source version + patch set) -----------------
KVER_PKG=$(pkg_version linux-source-6.12)
TARBALL=$(dpkg-query -L linux-source-6.12 | grep -E '^/usr/src/linux-source-6\.12\.tar\.(xz|bz2|gz)$' | head -n1 || true)
if [ -z "$TARBALL" ] || [ ! -f "$TARBALL" ]; then
	die "linux-source-6.12 is installed but its tarball is missing under /usr/src"
fi
SRC_STAMP=$({
	echo "linux-source-6.12 $KVER_PKG"
	cat "${PATCHES[@]}"
} | sha256sum | cut -c1-16)
WORK=$CACHE_ROOT/work
KSRC=$WORK/linux-$SRC_STAMP
mkdir -p "$WORK"

if [ ! -f "$KSRC/.kiln-ready" ]; then
	# Other trees are for other source versions or patch sets (or half-unpacked).
	rm -rf "$WORK"/linux-*
	step_start "unpacking $(basename "$TARBALL") ($KVER_PKG) into $KSRC"
	mkdir -p "$KSRC.partial"
	tar -xf "$TARBALL" -C "$KSRC.partial" --strip-components=1 ||
		die "cannot unpack $TARBALL"
	step_done
	for p in "${PATCHES[@]}"; do
		log "applying $(basename "$p")"
		patch -d "$KSRC.partial" -p1 --forward --batch --no-backup-if-mismatch <"$p" ||
			die "patch $(basename "$p") does not apply to linux-source-6.12 $KVER_PKG"
	done
	touch "$KSRC.partial/.kiln-ready"
	mv "$KSRC.partial" "$KSRC"
fi

KMAKE=(make -C "$KSRC" ARCH=x86_64
	KBUILD_BUILD_TIMESTAMP="$(date -u -d "@$EPOCH")"
	KBUILD_BUILD_USER=kiln KBUILD_BUILD_HOST=kiln KBUILD_BUILD_VERSION=1
	LOCALVERSION=)

# --- Kernel config ---------------------------------------------------------------------
step_start "configuring the kernel (tinyconfig + kernel/x86_64.config)"
CONFIG_LOG=$WORK/config.log
[ -f "$KSRC/.config" ] && cp -p "$KSRC/.config" "$KSRC/.config.kiln-prev"
if ! {
	"${KMAKE[@]}" tinyconfig &&
		(cd "$KSRC" && scripts/kconfig/merge_config.sh -m .config "$KERNEL_FRAGMENT") &&
		"${KMAKE[@]}" olddefconfig
} >"$CONFIG_LOG" 2>&1; then
	tail -n 30 "$CONFIG_LOG"
	die "kernel configuration failed (log: $CONFIG_LOG)"
fi
# Keep the old file (and its mtime) if nothing changed: no needless rebuild work.
if [ -f "$KSRC/.config.kiln-prev" ]; then
	if cmp -s "$KSRC/.config" "$KSRC/.config.kiln-prev"; then
		mv "$KSRC/.config.kiln-prev" "$KSRC/.config"
	else
		rm -f "$KSRC/.config.kiln-prev"
	fi
fi

# Every line of the fragment must hold in the final .config.
dropped=()
while IFS= read -r line; do
	case $line in
	CONFIG_*=*)
		grep -qxF -- "$line" "$KSRC/.config" ||
			dropped+=("$line (final: $(grep -E "^(# )?${line%%=*}[= ]" "$KSRC/.config" || echo 'absent'))")
		;;
	"# CONFIG_"*" is not set")
		sym=${line#\# }
		sym=${sym%% *}
		if grep -q "^$sym=" "$KSRC/.config"; then
			dropped+=("$line (final: $(grep "^$sym=" "$KSRC/.config"))")
		fi
		;;
	esac
done <"$KERNEL_FRAGMENT"
if [ ${#dropped[@]} -gt 0 ]; then
	log "kernel/x86_64.config lines that Kconfig did not keep:"
	printf '  %s\n' "${dropped[@]}"
	die "${#dropped[@]} line(s) of the kernel config fragment dropped (unmet dependencies?)"
fi
step_done

# --- Kernel build ----------------------------------------------------------------------
step_start "building the kernel (vmlinux, bzImage) with $(nproc) jobs; ~4 min from scratch on 2 cores"
BUILD_LOG=$WORK/kernel-build.log
progress() {
	local n=0 t0=$SECONDS line
	while IFS= read -r line; do
		printf '%s\n' "$line" >>"$BUILD_LOG"
		n=$((n + 1))
		if [ -n "${KILN_VERBOSE:-}" ]; then
			printf '%s\n' "$line"
		elif [ $((n % 50)) -eq 0 ]; then
			printf 'guest-images: kernel: %4d s, %5d build steps, at:%s\n' \
				$((SECONDS - t0)) "$n" "${line#" "}"
		fi
	done
	log "kernel: $n build steps in $((SECONDS - t0)) s"
}
: >"$BUILD_LOG"
if ! "${KMAKE[@]}" -j"$(nproc)" vmlinux bzImage 2>&1 | progress; then
	tail -n 40 "$BUILD_LOG"
	die "kernel build failed (full log: $BUILD_LOG)"
fi
step_done

cp "$KSRC/vmlinux" "$TMP/out/vmlinux"
cp "$KSRC/arch/x86/boot/bzImage" "$TMP/out/bzImage"
cp "$KSRC/System.map" "$TMP/out/System.map"
cp "$KSRC/.config" "$TMP/out/kernel.config"
KRELEASE=$(cat "$KSRC/include/config/kernel.release")
readelf -n "$TMP/out/vmlinux" | grep -q 'Xen' ||
	die "vmlinux has no PVH (Xen) ELF note although CONFIG_PVH=y"

# --- Root filesystem tree ----------------------------------------------------------------
step_start "assembling the root filesystem (busybox-static $(pkg_version busybox-static))"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing although busybox-static is installed"
R=$TMP/rootfs
mkdir -p "$R"
for d in bin sbin usr/bin usr/sbin dev proc sys tmp mnt root etc run var usr/share/udhcpc; do
	mkdir -p "$R/$d"
done
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"
cp "$BUSYBOX" "$R/bin/busybox"
chmod 0755 "$R/bin/busybox"
# The applet links `busybox --install -s` would make, except init/linuxrc.
"$BUSYBOX" --list-full | sort | while IFS= read -r applet; do
	case $applet in
	bin/busybox | sbin/init | linuxrc) continue ;;
	esac
	[ -e "$R/$applet" ] || [ -L "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done
[ -L "$R/bin/sh" ] || die "busybox has no sh applet"
install -m 0755 "$ROOTFS_DIR/init" "$R/init"
ln -s /init "$R/sbin/init"
install -m 0644 "$ROOTFS_DIR/fstab" "$R/etc/fstab"
install -m 0755 "$ROOTFS_DIR/udhcpc.script" "$R/usr/share/udhcpc/default.script"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
printf 'kiln\n' >"$R/etc/hostname"
ln -s /proc/mounts "$R/etc/mtab"
mknod -m 0600 "$R/dev/console" c 5 1
find "$R" -exec touch -h -d "@$EPOCH" {} +
NFILES=$(find "$R" | wc -l)
step_done

# initramfs: newc, uncompressed, sorted, root-owned, fixed mtimes and inode numbers.
step_start "writing initramfs.cpio"
(cd "$R" && find . -mindepth 1 -print0 | sort -z |
	cpio --create --null --format=newc --reproducible --owner=0:0 --quiet) \
	>"$TMP/out/initramfs.cpio" || die "cpio failed"
step_done

# rootfs.ext4: `mkfs.ext4 -d DIR` (e2fsprogs 1.47.0) copies each file's ctime (the
# build time) and follows the host directory order, so its bytes differ between
# builds. Instead: an empty file system with fixed UUID/hash seed/times, filled by
# one debugfs script in sorted order, every inode root-owned with the tree's mode.
step_start "writing rootfs.ext4 ($ROOTFS_SIZE, ext4 without journal)"
IMG=$TMP/out/rootfs.ext4
export E2FSPROGS_FAKE_TIME=$EPOCH
mkfs.ext4 -q -F -L kiln-root -U "$ROOTFS_UUID" -m 0 -O ^has_journal \
	-E "hash_seed=$ROOTFS_UUID,root_owner=0:0,nodiscard,lazy_itable_init=0" \
	"$IMG" "$ROOTFS_SIZE" || die "mkfs.ext4 failed"
DEBUGFS_CMDS=$TMP/debugfs.cmds
(
	cd "$R"
	find . -mindepth 1 -print0 | sort -z | while IFS= read -r -d '' p; do
		p=${p#./}
		case $p in *[[:space:]\"]*) die "unsupported file name in rootfs: $p" ;; esac
		# Create each entry by its base name inside its parent: debugfs's mknod
		# (unlike mkdir) does not resolve a path.
		echo "cd /$(dirname "$p")"
		name=$(basename "$p")
		if [ -L "$p" ]; then
			echo "symlink $name $(readlink "$p")"
		elif [ -d "$p" ]; then
			echo "mkdir $name"
		elif [ -c "$p" ]; then
			echo "mknod $name c $((0x$(stat -c %t "$p"))) $((0x$(stat -c %T "$p")))"
		elif [ -f "$p" ]; then
			echo "write $p $name"
		else
			die "unsupported file type in rootfs: $p"
		fi
		echo "cd /"
		echo "sif /$p mode 0x$(stat -c %f "$p")"
		echo "sif /$p uid 0"
		echo "sif /$p gid 0"
	done
	echo "sif / mode 0x$(stat -c %f .)"
) >"$DEBUGFS_CMDS"
# (run in the tree: `write` takes the host path relative to the current directory)
(cd "$R" && debugfs -w -f "$DEBUGFS_CMDS" "$IMG") >"$TMP/debugfs.log" 2>&1 || {
	tail -n 20 "$TMP/debugfs.log"
	die "debugfs could not fill rootfs.ext4"
}
DEBUGFS_OK='^(debugfs [0-9.]+ \(.*\)|debugfs: .*|Allocated inode: [0-9]+)$'
if grep -vE "$DEBUGFS_OK" "$TMP/debugfs.log" | grep -q .; then
	grep -vE "$DEBUGFS_OK" "$TMP/debugfs.log" | head -n 20
	die "debugfs reported errors while filling rootfs.ext4"
fi
e2fsck -fn "$IMG" >"$TMP/e2fsck.log" 2>&1 || {
	cat "$TMP/e2fsck.log"
	die "rootfs.ext4 fails e2fsck"
}
unset E2FSPROGS_FAKE_TIME
step_done

# --- Guest tools -------------------------------------------------------------------------------
# Static programs the tests copy into a guest over a raw drive when they need them; not in
# initramfs.cpio or rootfs.ext4, which every boot reads. Reproducible: no build id, no host paths.
compile_static() { # SOURCE OUTPUT
	gcc -Os -static -s -Wall -Wextra -ffile-prefix-map="$HERE"=guest-images \
		-Wl,--build-id=none -o "$2" "$1"
}
step_start "compiling the guest tools (tools/*.c, static glibc $(pkg_version libc6-dev))"
for src in "${TOOL_SOURCES[@]}"; do
	tool=$(basename "$src" .c)
	compile_static "$src" "$TMP/out/$tool" || die "cannot compile tools/$tool.c"
done
step_done

# --- kiln run initramfs --------------------------------------------------------------------------
# run-initramfs.cpio: /init = run/init.c (static), its mount points and /dev/console, nothing
# else; the root CMD runs in comes from the host (a disk or virtio-fs). Same cpio flags as above.
step_start "writing run-initramfs.cpio (run/init.c, static glibc)"
RR=$TMP/run-initramfs
mkdir -p "$RR"
for d in dev proc sys tmp run lower rw newroot; do
	mkdir -p "$RR/$d"
done
chmod 1777 "$RR/tmp"
compile_static "$RUN_DIR/init.c" "$RR/init" || die "cannot compile run/init.c"
chmod 0755 "$RR/init"
mknod -m 0600 "$RR/dev/console" c 5 1
find "$RR" -exec touch -h -d "@$EPOCH" {} +
(cd "$RR" && find . -mindepth 1 -print0 | sort -z |
	cpio --create --null --format=newc --reproducible --owner=0:0 --quiet) \
	>"$TMP/out/run-initramfs.cpio" || die "cpio failed for run-initramfs.cpio"
step_done

# --- Manifest and atomic publish ---------------------------------------------------------------
{
	echo "# Kiln guest images $HASH"
	echo "kernel_release $KRELEASE"
	echo "rootfs_files $NFILES"
	echo "source_date_epoch $EPOCH"
	echo "$INPUTS"
	echo "# outputs (sha256)"
	(cd "$TMP/out" && sha256sum vmlinux bzImage System.map kernel.config initramfs.cpio rootfs.ext4 \
		run-initramfs.cpio kiln-blkbench kiln-vsock)
} >"$TMP/out/manifest.txt"
chmod a-w "$TMP/out"/*
mv -T "$TMP/out" "$OUT" || die "cannot move the result into $OUT"
log "done in $((SECONDS - START)) s: $OUT"
echo "$OUT" >&3
