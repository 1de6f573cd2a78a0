//! The API socket file: created owner-only, never through a symlink, removed again on exit.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Mode of the socket file: only the owner may connect.
const SOCKET_MODE: u32 = 0o600;

/// The umask that makes `bind` create the socket with [`SOCKET_MODE`].
const BIND_UMASK: libc::mode_t = 0o177;

/// Serialises the umask changes of concurrent [`bind_api_socket`] calls, so none restores a mask
/// another one set.
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// Why a private socket (the API's, the vsock device's) could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A symbolic link is at the path; it is never followed.
    #[error(
        "{path}: is a symbolic link; refusing to follow it (remove it or choose another path)"
    )]
    Symlink {
        /// The requested socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("{path}: exists and is {kind}, not a socket; remove it or choose another path")]
    NotASocket {
        /// The requested socket path.
        path: PathBuf,
        /// What is there instead, e.g. "a directory".
        kind: &'static str,
    },
    /// A socket is at the path and a process still accepts connections on it.
    #[error("{path}: another process is listening on it; stop it or choose another path")]
    InUse {
        /// The requested socket path.
        path: PathBuf,
    },
    /// Right after binding, the path no longer holds a socket: another file replaced it.
    #[error("{path}: replaced by another file right after it was bound; check who writes to its directory")]
    Replaced {
        /// The socket path whose file was replaced.
        path: PathBuf,
    },
    /// The path's metadata could not be read (for a reason other than it not existing).
    #[error("{path}: cannot inspect it: {source}")]
    Inspect {
        /// The path that could not be inspected.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A stale socket file left by an earlier run could not be removed.
    #[error("{path}: cannot remove the stale socket: {source}")]
    RemoveStale {
        /// The stale socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `bind` failed.
    #[error("{path}: cannot bind: {source}")]
    Bind {
        /// The path that could not be bound.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bound socket's mode could not be checked or set to 0600.
    #[error("{path}: cannot make it owner-only (0600): {source}")]
    SetMode {
        /// The bound socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Creates a private Unix socket (the API's, the vsock device's) at `path`, mode 0600.
///
/// A socket file left by an earlier run is replaced, unless a process still listens on it; a
/// symlink, regular file, directory or other file at `path` is refused. The socket is bound under
/// umask 0177 so it never exists with a wider mode. The umask is process-wide: a file another
/// thread creates during the `bind` call also gets at most 0600 (calls of this function are
/// serialised among themselves). Pair the listener with a [`SocketGuard`] to remove the file.
pub fn bind_api_socket(path: &Path) -> Result<UnixListener, BindError> {
    let owned_path = || path.to_path_buf();
    match fs::symlink_metadata(path) {
        Ok(metadata) => {
            let file_type = metadata.file_type();
            if file_type.is_symlink() {
                return Err(BindError::Symlink { path: owned_path() });
            }
            if !file_type.is_socket() {
                let kind = if file_type.is_dir() {
                    "a directory"
                } else if file_type.is_file() {
                    "a regular file"
                } else {
                    "a special file"
                };
                return Err(BindError::NotASocket {
                    path: owned_path(),
                    kind,
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse { path: owned_path() });
            }
            fs::remove_file(path).map_err(|source| BindError::RemoveStale {
                path: owned_path(),
                source,
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BindError::Inspect {
                path: owned_path(),
                source,
            })
        }
    }

    let bound = {
        let _serialised = UMASK_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: umask only swaps the process's file creation mask; it cannot fail.
        let previous = unsafe { libc::umask(BIND_UMASK) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the mask saved just before.
        unsafe { libc::umask(previous) };
        bound
    };
    let listener = bound.map_err(|source| BindError::Bind {
        path: owned_path(),
        source,
    })?;

    // In case the filesystem did not honour the umask. `set_permissions` follows symlinks, so
    // check first that the path is still our socket.
    let set_mode_error = |source| BindError::SetMode {
        path: owned_path(),
        source,
    };
    let metadata = fs::symlink_metadata(path).map_err(set_mode_error)?;
    if !metadata.file_type().is_socket() {
        return Err(BindError::Replaced { path: owned_path() });
    }
    if metadata.mode() & 0o777 != SOCKET_MODE {
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(set_mode_error)?;
    }
    Ok(listener)
}

/// Removes the socket file at its path when dropped — if the file is still the socket that was
/// there when the guard was made (same device, inode and change time), so a later server's
/// socket at the same path is left alone.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    /// Identity of the guarded socket; `None` if there was no socket at `path`.
    identity: Option<SocketIdentity>,
}

impl SocketGuard {
    /// Guards the socket now at `path` (normally just created by [`bind_api_socket`]).
    pub fn new(path: &Path) -> SocketGuard {
        SocketGuard {
            path: path.to_path_buf(),
            identity: socket_identity(path),
        }
    }

    /// The path of the guarded socket file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if self.identity.is_some() && socket_identity(&self.path) == self.identity {
            // Nothing useful to do if it is already gone.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// What tells one socket file from another at the same path: device and inode, plus the change
/// time, since a filesystem may give a new file the inode number of one just removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketIdentity {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

/// The identity of the socket at `path`, without following a symlink; `None` if it is not one.
fn socket_identity(path: &Path) -> Option<SocketIdentity> {
    let metadata = fs::symlink_metadata(path).ok()?;
    metadata.file_type().is_socket().then(|| SocketIdentity {
        dev: metadata.dev(),
        ino: metadata.ino(),
        ctime: (metadata.ctime(), metadata.ctime_nsec()),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn temp_path(test: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("kiln-sock-{}-{test}-{n}", std::process::id()))
    }

    #[test]
    fn creates_owner_only_socket_and_guard_removes_it() {
        let path = temp_path("mode");
        let listener = bind_api_socket(&path).unwrap();
        let guard = SocketGuard::new(&path);
        let metadata = fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.mode() & 0o777, 0o600);
        assert_eq!(guard.path(), path);
        drop(guard);
        assert!(fs::symlink_metadata(&path).is_err());
        drop(listener);
    }

    #[test]
    fn refuses_symlink() {
        let target = temp_path("symlink-target");
        let link = temp_path("symlink");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let result = bind_api_socket(&link);
        assert!(
            matches!(result, Err(BindError::Symlink { .. })),
            "{result:?}"
        );
        assert!(
            fs::symlink_metadata(&target).is_err(),
            "nothing created at the target"
        );
        fs::remove_file(&link).unwrap();
    }

    #[test]
    fn refuses_regular_file_and_directory() {
        let file = temp_path("file");
        fs::write(&file, b"keep me").unwrap();
        let result = bind_api_socket(&file);
        assert!(matches!(
            result,
            Err(BindError::NotASocket {
                kind: "a regular file",
                ..
            })
        ));
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
        fs::remove_file(&file).unwrap();

        let dir = temp_path("dir");
        fs::create_dir(&dir).unwrap();
        let result = bind_api_socket(&dir);
        assert!(matches!(
            result,
            Err(BindError::NotASocket {
                kind: "a directory",
                ..
            })
        ));
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn replaces_stale_socket_but_not_live_one() {
        let path = temp_path("stale");
        let live = UnixListener::bind(&path).unwrap();
        let result = bind_api_socket(&path);
        assert!(matches!(result, Err(BindError::InUse { .. })), "{result:?}");
        drop(live); // the file stays behind, as after a crash
        let listener = bind_api_socket(&path).unwrap();
        let _guard = SocketGuard::new(&path);
        UnixStream::connect(&path).unwrap();
        drop(listener);
    }

    #[test]
    fn guard_leaves_a_replaced_socket_alone() {
        let path = temp_path("replaced");
        let first = bind_api_socket(&path).unwrap();
        let guard = SocketGuard::new(&path);
        drop(first);
        // Moved away rather than removed, so the new socket cannot reuse its inode number.
        let moved = temp_path("replaced-old");
        fs::rename(&path, &moved).unwrap();
        let _second = UnixListener::bind(&path).unwrap();
        drop(guard);
        assert!(fs::symlink_metadata(&path).is_ok());
        fs::remove_file(&path).unwrap();
        fs::remove_file(&moved).unwrap();
    }

    #[test]
    fn error_names_the_path() {
        let error = BindError::NotASocket {
            path: PathBuf::from("/run/kiln.sock"),
            kind: "a regular file",
        };
        assert!(error.to_string().starts_with("/run/kiln.sock: exists"));
    }
}
