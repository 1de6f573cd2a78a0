//! The files Kiln writes its own output to (the log, the metrics, a console file), opened one
//! way: created 0600, never through a symbolic link, close-on-exec, non-blocking, and a named
//! pipe without a reader accepted. The logger, the metrics and the console all open through here,
//! so none of them depends on another for it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Errors in opening a log or metrics output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The path is a symbolic link, which Kiln does not follow for the files it writes.
    #[error("{}: is a symbolic link; Kiln does not follow links for its log and metrics outputs (give the target's path)", .0.display())]
    Symlink(PathBuf),
    /// The file could not be opened or created.
    #[error("{}: {source}", path.display())]
    Open {
        /// The path as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Opens `path` for appending, as Kiln opens its log and metrics outputs: created 0600 if missing,
/// never through a symbolic link (`O_NOFOLLOW`), close-on-exec, and non-blocking so a full pipe
/// drops output instead of stalling the thread that writes.
///
/// A named pipe is accepted like a file. Opening one write-only fails while it has no reader, so
/// Kiln then opens it read-write, as Firecracker does: Linux lets that open succeed at once, and
/// output is buffered in the pipe until a reader comes.
pub fn open_output(path: &Path) -> Result<File, OutputError> {
    open_nonblocking_output(path, OutputMode::Append).map_err(|source| {
        match source.raw_os_error() {
            Some(libc::ELOOP) => OutputError::Symlink(path.to_path_buf()),
            _ => OutputError::Open {
                path: path.to_path_buf(),
                source,
            },
        }
    })
}

/// How [`open_nonblocking_output`] starts: after what the file holds, or empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// Append (the log, the metrics).
    Append,
    /// Truncate first (a console file, one per boot).
    Truncate,
}

/// Opens an output as [`open_output`] describes (0600, `O_NOFOLLOW`, close-on-exec,
/// non-blocking, a FIFO without a reader opened read-write), appending or truncating.
pub fn open_nonblocking_output(path: &Path, mode: OutputMode) -> std::io::Result<File> {
    let open = |read: bool| {
        OpenOptions::new()
            .read(read)
            .write(true)
            .append(mode == OutputMode::Append)
            .truncate(mode == OutputMode::Truncate)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
    };
    match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => open(true),
        other => other,
    }
}
