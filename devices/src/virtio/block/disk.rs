//! The file behind a virtio-blk device, and the I/O a parsed request does on it.
//!
//! Invariants: the capacity is a whole number of sectors and never more than the file holds when
//! opened; every access is checked against it before it reaches the file; a read-only disk's file
//! is opened without write access, so no code path can modify it.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vm_memory::Bytes;

use crate::GuestMemoryMmap;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::host_file::{self, Accept, HostFileError};

use super::request::{DataBuffer, Segment};
use super::SECTOR_SIZE;

/// Errors in opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened.
    #[error("disk image {path}: {source}")]
    Open {
        /// The disk image that could not be opened.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file or block device.
    #[error("disk image {path} is {found}, not a regular file or block device")]
    NotAFile {
        /// The disk image.
        path: PathBuf,
        /// What the file is instead, e.g. "a directory".
        found: &'static str,
    },
    /// Another process holds a conflicting lock (another VMM is using it).
    #[error("disk image {path} is in use by another process (locked)")]
    Locked {
        /// The locked disk image.
        path: PathBuf,
    },
}

/// Why a request's I/O failed (answered VIRTIO_BLK_S_IOERR).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The range runs past the end of the disk.
    #[error("sectors {sector}+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Number of sectors requested.
        sectors: u64,
        /// The disk's size, in sectors.
        capacity: u64,
    },
    /// The disk is read-only.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The host file failed.
    #[error("host I/O: {0}")]
    Host(#[from] std::io::Error),
    /// Copying between the file and guest memory failed.
    #[error("guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

impl From<vm_memory::GuestMemoryError> for IoError {
    /// The file's own failures (ENOSPC, EIO) arrive wrapped by vm-memory's copy; they are the
    /// host's, not the guest's.
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        match e {
            vm_memory::GuestMemoryError::IOError(e) => IoError::Host(e),
            e => IoError::Memory(e),
        }
    }
}

impl IoError {
    /// True when the host side failed (the file), not the guest's request.
    pub fn is_host(&self) -> bool {
        matches!(self, IoError::Host(_))
    }
}

/// An open disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    capacity_sectors: u64,
    read_only: bool,
}

impl DiskFile {
    /// Opens `path`, read-only or read-write, and locks it (shared for read-only, exclusive for
    /// read-write) so two VMMs cannot write one image at once.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        // Never blocks, even on a FIFO: the control loop opens drives (PUT, PATCH, the start).
        let mut file = match host_file::open(path, !read_only, Accept::RegularOrBlockDevice) {
            Ok(file) => file,
            Err(HostFileError::Io(e)) => return Err(open_err(e)),
            Err(HostFileError::WrongKind { found, .. }) => {
                return Err(DiskError::NotAFile {
                    path: path.to_owned(),
                    found,
                })
            }
        };
        let locked = if read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        if locked.is_err() {
            return Err(DiskError::Locked {
                path: path.to_owned(),
            });
        }
        // A block device's metadata says 0 bytes: seeking to the end gives its size either way.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            capacity_sectors: size / SECTOR_SIZE,
            read_only,
        })
    }

    /// The disk's size in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// True when the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when `path` names the file this disk has open (same device and inode, whatever the
    /// spelling of the path: a symlink or another hard link counts). False when `path` cannot be
    /// looked up.
    pub fn is_same_file(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }

    /// Re-reads the size of the open file (it may have been resized since it was opened) and
    /// records `path` as its name, keeping the descriptor and its lock. `path` must name the
    /// same file ([`is_same_file`](Self::is_same_file)). On error nothing changes.
    pub fn refresh(&mut self, path: &Path) -> Result<(), DiskError> {
        let size = self
            .file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        self.capacity_sectors = size / SECTOR_SIZE;
        self.path = path.to_owned();
        Ok(())
    }

    fn check_range(&self, sector: u64, sectors: u64) -> Result<u64, IoError> {
        let out_of_range = || IoError::OutOfRange {
            sector,
            sectors,
            capacity: self.capacity_sectors,
        };
        let end = sector.checked_add(sectors).ok_or_else(out_of_range)?;
        if end > self.capacity_sectors {
            return Err(out_of_range());
        }
        sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)
    }

    /// Reads `len` bytes from `sector` into the guest buffers.
    pub fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        len: u32,
        bufs: &[DataBuffer],
    ) -> Result<(), IoError> {
        let offset = self.check_range(sector, u64::from(len) / SECTOR_SIZE)?;
        self.file.seek(SeekFrom::Start(offset))?;
        for buf in bufs {
            mem.read_exact_volatile_from(buf.addr, &mut self.file, buf.len as usize)?;
        }
        Ok(())
    }

    /// Writes the guest buffers, `len` bytes in all, at `sector`.
    pub fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        len: u32,
        bufs: &[DataBuffer],
    ) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        let offset = self.check_range(sector, u64::from(len) / SECTOR_SIZE)?;
        self.file.seek(SeekFrom::Start(offset))?;
        for buf in bufs {
            mem.write_all_volatile_to(buf.addr, &mut self.file, buf.len as usize)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
    }

    /// Drops the data of the segments (DISCARD): the ranges read as zeroes afterwards.
    pub fn discard(&mut self, segments: &[Segment]) -> Result<(), IoError> {
        self.zero_segments(segments)
    }

    /// Makes the segments read as zeroes (WRITE_ZEROES), by punching holes where the file system
    /// can and by writing zeroes where it cannot.
    pub fn write_zeroes(&mut self, segments: &[Segment]) -> Result<(), IoError> {
        self.zero_segments(segments)
    }

    fn zero_segments(&mut self, segments: &[Segment]) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        // Check every range before touching any, so a bad request changes nothing.
        let mut ranges = Vec::with_capacity(segments.len());
        for seg in segments {
            let offset = self.check_range(seg.sector, u64::from(seg.num_sectors))?;
            ranges.push((offset, u64::from(seg.num_sectors) * SECTOR_SIZE));
        }
        for (offset, len) in ranges {
            if len == 0 {
                continue;
            }
            if fallocate(&self.file, FallocateMode::PunchHole, true, offset, len).is_err() {
                self.write_zero_bytes(offset, len)?;
            }
        }
        Ok(())
    }

    fn write_zero_bytes(&mut self, offset: u64, mut len: u64) -> Result<(), IoError> {
        let zeroes = [0u8; 64 * 1024];
        self.file.seek(SeekFrom::Start(offset))?;
        while len > 0 {
            let n = len.min(zeroes.len() as u64) as usize;
            self.file.write_all(&zeroes[..n])?;
            len -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vm_memory::GuestAddress;

    #[test]
    fn the_files_own_failures_are_the_hosts_and_bad_guest_buffers_are_not() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err = IoError::from(vm_memory::GuestMemoryError::IOError(full));
        assert!(err.is_host());
        assert!(err.to_string().contains("No space left on device"), "{err}");
        let err = IoError::from(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(0x1000),
        ));
        assert!(!err.is_host());
        assert!(!IoError::ReadOnly.is_host());
    }

    fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-disk-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn contents(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(path).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn capacity_ignores_a_partial_sector() {
        let path = scratch("cap", &[1u8; 1500]);
        let disk = DiskFile::open(&path, true).unwrap();
        assert_eq!(disk.capacity_sectors(), 2);
    }

    #[test]
    fn read_write_round_trip_and_bounds() {
        let path = scratch("rw", &[0u8; 4096]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[7u8; 512], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[9u8; 512], GuestAddress(0x3000)).unwrap();
        let mut disk = DiskFile::open(&path, false).unwrap();
        let bufs = [
            DataBuffer {
                addr: GuestAddress(0x1000),
                len: 512,
            },
            DataBuffer {
                addr: GuestAddress(0x3000),
                len: 512,
            },
        ];
        disk.write(&mem, 2, 1024, &bufs).unwrap();
        disk.flush().unwrap();
        let data = contents(&path);
        assert_eq!(&data[1024..1536], &[7u8; 512]);
        assert_eq!(&data[1536..2048], &[9u8; 512]);
        assert_eq!(&data[..1024], &[0u8; 1024]);

        let out = [DataBuffer {
            addr: GuestAddress(0x8000),
            len: 1024,
        }];
        disk.read(&mem, 2, 1024, &out).unwrap();
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(&back[..512], &[7u8; 512]);

        assert!(matches!(
            disk.read(&mem, 7, 1024, &out),
            Err(IoError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write(&mem, u64::MAX, 512, &bufs[..1]),
            Err(IoError::OutOfRange { .. })
        ));
        assert_eq!(contents(&path).len(), 4096, "nothing written past the end");
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let path = scratch("ro", &[5u8; 2048]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut disk = DiskFile::open(&path, true).unwrap();
        let bufs = [DataBuffer {
            addr: GuestAddress(0x1000),
            len: 512,
        }];
        assert!(matches!(
            disk.write(&mem, 0, 512, &bufs),
            Err(IoError::ReadOnly)
        ));
        let seg = [Segment {
            sector: 0,
            num_sectors: 1,
            unmap: false,
        }];
        assert!(matches!(disk.discard(&seg), Err(IoError::ReadOnly)));
        assert!(matches!(disk.write_zeroes(&seg), Err(IoError::ReadOnly)));
        disk.flush().unwrap();
        assert_eq!(contents(&path), vec![5u8; 2048]);
    }

    #[test]
    fn write_zeroes_and_discard() {
        let path = scratch("zero", &[0xffu8; 8192]);
        let mut disk = DiskFile::open(&path, false).unwrap();
        disk.write_zeroes(&[Segment {
            sector: 1,
            num_sectors: 2,
            unmap: true,
        }])
        .unwrap();
        disk.discard(&[Segment {
            sector: 8,
            num_sectors: 8,
            unmap: false,
        }])
        .unwrap();
        let data = contents(&path);
        assert_eq!(data.len(), 8192, "size is kept");
        assert_eq!(&data[..512], &[0xffu8; 512][..]);
        assert_eq!(&data[512..1536], &[0u8; 1024][..]);
        assert_eq!(&data[1536..4096], &[0xffu8; 2560][..]);
        assert_eq!(&data[4096..], &[0u8; 4096][..]);
        // One bad segment: nothing changes.
        let before = contents(&path);
        assert!(disk
            .write_zeroes(&[
                Segment {
                    sector: 0,
                    num_sectors: 1,
                    unmap: false
                },
                Segment {
                    sector: 15,
                    num_sectors: 2,
                    unmap: false
                }
            ])
            .is_err());
        assert_eq!(contents(&path), before);
    }

    #[test]
    fn second_writer_is_refused() {
        let path = scratch("lock", &[0u8; 512]);
        let _first = DiskFile::open(&path, false).unwrap();
        assert!(matches!(
            DiskFile::open(&path, false),
            Err(DiskError::Locked { .. })
        ));
        assert!(matches!(
            DiskFile::open(&path, true),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let path = scratch("dir", &[]);
        assert!(matches!(
            DiskFile::open(path.parent().unwrap(), true),
            Err(DiskError::NotAFile { .. } | DiskError::Open { .. })
        ));
        assert!(matches!(
            DiskFile::open(&path.with_extension("missing"), true),
            Err(DiskError::Open { .. })
        ));
    }
}
