//! Opening a host file a user named (a kernel, a drive, a config file) without ever blocking on
//! it, and refusing what is not the kind of file expected.
//!
//! `open(2)` of a named pipe blocks until its other end is opened, and a read of a character
//! device such as /dev/zero never ends: either would hang the thread that builds the VM, and with
//! it the API and the handling of SIGTERM. So the file is opened with `O_NONBLOCK` (a FIFO's open
//! then returns at once), its kind is checked on the opened descriptor (no race with a rename of
//! the path), and only then is `O_NONBLOCK` cleared for the ordinary I/O that regular files and
//! block devices do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What an opened path turned out to be, when it is not what was asked for.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// The open or the fstat failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The path is another kind of file.
    #[error("it is {found}, not {expected}")]
    WrongKind {
        /// What the path is ("a named pipe (FIFO)", "a directory", ...).
        found: &'static str,
        /// What was asked for.
        expected: &'static str,
    },
}

impl From<HostFileError> for io::Error {
    fn from(e: HostFileError) -> Self {
        match e {
            HostFileError::Io(e) => e,
            e @ HostFileError::WrongKind { .. } => {
                io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
            }
        }
    }
}

/// Which kinds of file a caller takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (kernels, initrds, config files).
    RegularFile,
    /// Regular files and block devices (drives).
    RegularOrBlockDevice,
}

impl Accept {
    fn expected(self) -> &'static str {
        match self {
            Accept::RegularFile => "a regular file",
            Accept::RegularOrBlockDevice => "a regular file or a block device",
        }
    }
}

/// Opens `path` (read-only, or read-write when `write`) without blocking, refuses it unless it is
/// of a kind `accept` takes, and returns it in blocking mode.
pub fn open(path: &Path, write: bool, accept: Accept) -> Result<File, HostFileError> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let file_type = file.metadata()?.file_type();
    let found = if file_type.is_file() {
        None
    } else if file_type.is_block_device() {
        (accept == Accept::RegularFile).then_some("a block device")
    } else if file_type.is_dir() {
        Some("a directory")
    } else if file_type.is_fifo() {
        Some("a named pipe (FIFO)")
    } else if file_type.is_char_device() {
        Some("a character device")
    } else if file_type.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    };
    if let Some(found) = found {
        return Err(HostFileError::WrongKind {
            found,
            expected: accept.expected(),
        });
    }
    clear_nonblocking(&file)?;
    Ok(file)
}

fn clear_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd this function's caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags read from the same fd; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kiln-host-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_regular_file_opens_in_blocking_mode() {
        let dir = scratch("regular");
        let path = dir.join("kernel");
        std::fs::write(&path, b"bytes").unwrap();
        let file = open(&path, false, Accept::RegularFile).unwrap();
        // SAFETY: F_GETFL on an open fd.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_for_writing() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        for write in [false, true] {
            let start = Instant::now();
            let err = open(&fifo, write, Accept::RegularOrBlockDevice).unwrap_err();
            assert!(start.elapsed() < Duration::from_secs(1));
            // Read-write open of a FIFO succeeds and is refused by kind; so is a read-only one.
            assert!(
                err.to_string()
                    .contains("a named pipe (FIFO), not a regular file or a block device"),
                "{err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn directories_character_devices_and_block_devices_are_named() {
        let dir = scratch("kinds");
        let err = open(&dir, false, Accept::RegularFile).unwrap_err();
        assert_eq!(err.to_string(), "it is a directory, not a regular file");
        let err = open(Path::new("/dev/zero"), false, Accept::RegularFile).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is a character device, not a regular file"
        );
        let err: io::Error = open(Path::new("/dev/null"), true, Accept::RegularOrBlockDevice)
            .unwrap_err()
            .into();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let missing = open(&dir.join("missing"), false, Accept::RegularFile).unwrap_err();
        assert!(matches!(missing, HostFileError::Io(ref e) if e.kind() == io::ErrorKind::NotFound));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
