#!/usr/bin/env bash
# Install the virtio-fs daemon virtiofsd (crates.io virtiofsd 1.14.0, built with
# `cargo install --locked`) for Kiln's virtio-fs device. Debian 12 has no package of it.
#
# Usage: guest-images/virtiofsd.sh
#   stdout: exactly one line, the absolute path of the virtiofsd binary
#   stderr: progress (KILN_VERBOSE=1 passes the whole cargo output through)
#   exit status: non-zero with a `guest-images: error: ...` line if anything fails
#
# KILN_VIRTIOFSD=/path/to/virtiofsd: use that binary instead (checked to be
# executable, printed as an absolute path; nothing is installed).
#
# Output: ${KILN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/virtiofsd-1.14.0/
#   bin/virtiofsd  manifest.txt (version, rustc, Debian package versions, sha256)
# A second run only prints the path. The install runs under flock on
# <cache root>/.virtiofsd.lock (concurrent runs wait), into
# <cache root>/.virtiofsd-tmp-<pid>/, renamed into place when complete: a killed
# install leaves no half-finished virtiofsd-1.14.0/.
set -euo pipefail

# Everything goes to stderr; fd 3 is the real stdout, for the one result line.
exec 3>&1 1>&2

VERSION=1.14.0
# Build needs: libseccomp-dev (libseccomp-sys links -lseccomp), libcap-ng-dev (capng
# links -lcap-ng), gcc + libc6-dev (the linker rustc drives; the `cc` crate).
# No pkg-config: neither -sys crate uses it. The runtime libraries libseccomp2 and
# libcap-ng0 come with the -dev packages.
PACKAGES=(libseccomp-dev libcap-ng-dev gcc libc6-dev)

START=$SECONDS
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

# --- Override ------------------------------------------------------------------------------
if [ -n "${KILN_VIRTIOFSD:-}" ]; then
	bin=$KILN_VIRTIOFSD
	case $bin in
	*/*) ;;
	*) bin=$(command -v -- "$bin") || die "KILN_VIRTIOFSD=$KILN_VIRTIOFSD: not found in PATH" ;;
	esac
	[ -f "$bin" ] && [ -x "$bin" ] || die "KILN_VIRTIOFSD=$KILN_VIRTIOFSD is not an executable file"
	case $bin in
	/*) ;;
	*) bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin") ;;
	esac
	echo "$bin" >&3
	exit 0
fi

CACHE_ROOT=${KILN_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/kiln}
mkdir -p "$CACHE_ROOT" || die "cannot create cache directory $CACHE_ROOT"
CACHE_ROOT=$(cd "$CACHE_ROOT" && pwd -P)
OUT=$CACHE_ROOT/virtiofsd-$VERSION
BIN=$OUT/bin/virtiofsd

# A usable install: the binary runs (its shared libraries are there) and is $VERSION.
installed_ok() {
	[ -x "$BIN" ] && [ -f "$OUT/manifest.txt" ] &&
		"$BIN" --version 2>/dev/null | grep -qx "virtiofsd $VERSION"
}

if installed_ok; then
	echo "$BIN" >&3
	exit 0
fi

# Its own lock file (not build.sh's .lock): a kernel build need not wait for this, nor this for it.
take_lock "$CACHE_ROOT/.virtiofsd.lock"
if installed_ok; then # installed by another invocation while we waited
	echo "$BIN" >&3
	exit 0
fi
ensure_packages "${PACKAGES[@]}"
if installed_ok; then # it only lacked its runtime libraries
	echo "$BIN" >&3
	exit 0
fi

command -v cargo >/dev/null || die "cargo not found in PATH (virtiofsd is built from source with cargo; install Rust, e.g. with rustup)"
# Settings from the caller's environment that would change or misplace the build.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET CARGO_INSTALL_ROOT CARGO_BUILD_TARGET_DIR \
	RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS \
	LIBSECCOMP_LINK_TYPE LIBSECCOMP_LIB_PATH LIBCAPNG_LINK_TYPE LIBCAPNG_LIB_PATH
export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never

# Leftovers of killed installs: we hold the lock, so no one else is using them.
rm -rf "$CACHE_ROOT"/.virtiofsd-tmp-*
[ -e "$OUT" ] && { log "removing unusable $OUT"; rm -rf "$OUT"; }
TMP=$CACHE_ROOT/.virtiofsd-tmp-$$
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
mkdir -p "$TMP/root"

# --- cargo install -------------------------------------------------------------------------
log "building virtiofsd $VERSION with $(cargo --version) into $OUT; ~75 s on 2 cores"
BUILD_LOG=$CACHE_ROOT/virtiofsd-build.log
progress() {
	local n=0 t0=$SECONDS line
	while IFS= read -r line; do
		printf '%s\n' "$line" >>"$BUILD_LOG"
		if [ -n "${KILN_VERBOSE:-}" ]; then
			printf '%s\n' "$line"
		else
			case $line in
			*Compiling*)
				n=$((n + 1))
				[ $((n % 25)) -eq 0 ] && printf 'guest-images: virtiofsd: %4d s, %3d crates, at: %s\n' \
					$((SECONDS - t0)) "$n" "${line#"${line%%[! ]*}"}"
				;;
			*"to your PATH"*) ;; # the temporary --root, not for anyone's PATH
			error* | *" error"* | warning:* | *Finished* | *Installed*) printf '%s\n' "$line" ;;
			esac
		fi
	done
	return 0
}
: >"$BUILD_LOG"
if ! cargo install --locked virtiofsd --version "$VERSION" \
	--root "$TMP/root" --target-dir "$TMP/target" --no-track 2>&1 | progress; then
	tail -n 40 "$BUILD_LOG"
	die "cargo install virtiofsd $VERSION failed (full log: $BUILD_LOG)"
fi
rm -rf "$TMP/target"

got=$("$TMP/root/bin/virtiofsd" --version 2>&1) || die "the new virtiofsd does not run: $got"
[ "$got" = "virtiofsd $VERSION" ] || die "the new virtiofsd reports '$got', expected 'virtiofsd $VERSION'"

# --- Manifest and atomic publish -----------------------------------------------------------
{
	echo "# virtiofsd $VERSION for Kiln, built by guest-images/virtiofsd.sh"
	echo "version $got"
	echo "built_with $(rustc --version 2>/dev/null || echo rustc-unknown)"
	for p in "${PACKAGES[@]}" libseccomp2 libcap-ng0; do
		printf 'debian %s %s\n' "$p" "$(pkg_version "$p")"
	done
	(cd "$TMP/root" && sha256sum bin/virtiofsd)
} >"$TMP/root/manifest.txt"
mv -T "$TMP/root" "$OUT" || die "cannot move the result into $OUT"
log "done in $((SECONDS - START)) s: $BIN"
echo "$BIN" >&3
