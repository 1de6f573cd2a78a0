# Shared by guest-images/build.sh and guest-images/virtiofsd.sh (sourced, not run): messages,
# the cache lock, and installing missing Debian packages. Every message goes to stderr (the
# scripts keep stdout, as fd 3, for their one result line).

log() { printf 'guest-images: %s\n' "$*"; }
die() {
	printf 'guest-images: error: %s\n' "$*"
	exit 1
}
step_start() {
	STEP_NAME=$1
	STEP_T0=$SECONDS
	log "$1..."
}
step_done() { log "$STEP_NAME: done in $((SECONDS - STEP_T0)) s"; }

# take_lock FILE: one holder of FILE at a time (fd 9); a second caller waits, saying so.
HAVE_LOCK=
take_lock() {
	[ -z "$HAVE_LOCK" ] || return 0
	exec 9>"$1"
	if ! flock -n 9; then
		log "waiting for another $(basename "$0") holding $1..."
		flock 9
	fi
	HAVE_LOCK=1
}

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }
pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# ensure_packages PKG...: apt-get installs the ones missing (as root; retried after an
# apt-get update).
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or: apt-get install ${missing[*]})"
	step_start "installing ${missing[*]}"
	# (apt-get waits for a dpkg lock another install holds, rather than failing at once)
	local apt=(apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}")
	if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}"; then
		log "apt-get install failed; running apt-get update and retrying"
		apt-get update || die "apt-get update failed"
		DEBIAN_FRONTEND=noninteractive "${apt[@]}" || die "apt-get install ${missing[*]} failed"
	fi
	step_done
}
