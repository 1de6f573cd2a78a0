//! The snapshot memory file: guest RAM, region after region, at the offsets the state records.
//!
//! Saving writes only pages that hold something: a page of zeros (every page the guest never
//! touched reads so) is left a hole, so the file is sparse and its allocated size is what the
//! guest used. Restoring maps the file `MAP_PRIVATE`: nothing is read up front, a page comes
//! from the file when the guest first touches it, a write copies it, and every VM restored from
//! one file shares the pages none of them wrote.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use devices::{GuestMemoryMmap, GuestRegionMmap};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The page size the memory file's holes are cut at.
const PAGE: usize = 4096;
/// How much guest memory is copied out at a time.
const CHUNK: usize = 1 << 20;

/// One guest RAM region and where it sits in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// The region's guest physical address.
    pub guest_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Where its bytes start in the memory file.
    pub file_offset: u64,
}

/// Why guest memory could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The memory file could not be created, written or opened.
    #[error("memory file {path}: {source}")]
    Io {
        /// The memory file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file's size is not the one the state describes.
    #[error("memory file {path} has {actual} bytes; the snapshot's guest memory is {expected}")]
    SizeMismatch {
        /// The memory file.
        path: String,
        /// Its size.
        actual: u64,
        /// The size the state's regions add up to.
        expected: u64,
    },
    /// The state's regions are not a guest memory layout (overlapping, empty, out of order).
    #[error("the snapshot's memory layout is invalid: {0}")]
    Layout(String),
    /// Guest memory could not be read or mapped.
    #[error("guest memory: {0}")]
    Guest(String),
}

/// The regions of `mem` laid end to end in a file.
pub fn layout_of(mem: &GuestMemoryMmap) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let state = MemoryRegionState {
                guest_addr: region.start_addr().0,
                size: region.len(),
                file_offset: offset,
            };
            offset += region.len();
            state
        })
        .collect()
}

/// Which pages of guest memory a snapshot's memory file holds.
#[derive(Clone, Copy, Debug)]
pub enum Pages<'a> {
    /// Every page with data (a Full snapshot): zero pages are holes.
    All,
    /// Only the pages written since the last snapshot (a Diff): those KVM's dirty log marks
    /// (one bitmap per region, as `Vm::take_dirty_log` gives it) and those the VMM wrote
    /// (guest memory's own bitmap). A dirty page of zeros is written too: in a Diff, a hole
    /// means "unchanged".
    Dirty(&'a [Vec<u64>]),
}

/// True if bit `page` of a KVM dirty bitmap is set.
fn logged(log: Option<&Vec<u64>>, page: usize) -> bool {
    log.and_then(|words| words.get(page / 64))
        .is_some_and(|word| word & (1 << (page % 64)) != 0)
}

/// Writes `pages` of `mem` to a new file at `path` (replacing one there) as large as guest
/// memory and sparse, then clears guest memory's record of the VMM's writes, so the next Diff
/// starts from here. Returns the layout the state records.
pub fn save(
    mem: &GuestMemoryMmap,
    path: &Path,
    pages: Pages<'_>,
) -> Result<Vec<MemoryRegionState>, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let layout = layout_of(mem);
    let total: u64 = layout.iter().map(|r| r.size).sum();
    let file = super::create_owner_only(path).map_err(io)?;
    file.set_len(total).map_err(io)?;
    let mut buf = vec![0u8; CHUNK];
    for (number, (region, guest_region)) in layout.iter().zip(mem.iter()).enumerate() {
        let wanted = |page: usize, bytes: &[u8]| match pages {
            Pages::All => bytes.iter().any(|&b| b != 0),
            Pages::Dirty(log) => {
                logged(log.get(number), page) || (**guest_region).bitmap().is_bit_set(page)
            }
        };
        let mut done = 0u64;
        while done < region.size {
            let len = CHUNK.min((region.size - done) as usize);
            let chunk = &mut buf[..len];
            mem.read_slice(chunk, GuestAddress(region.guest_addr + done))
                .map_err(|e| MemoryFileError::Guest(e.to_string()))?;
            let first_page = (done as usize) / PAGE;
            for (index, page) in chunk.chunks(PAGE).enumerate() {
                if wanted(first_page + index, page) {
                    let at = region.file_offset + done + (index * PAGE) as u64;
                    file.write_all_at(page, at).map_err(io)?;
                }
            }
            done += len as u64;
        }
        (**guest_region).bitmap().reset();
    }
    file.sync_all().map_err(io)?;
    Ok(layout)
}

/// Applies the Diff memory file at `diff` onto the memory file at `base` (both of one VM's
/// memory size): every range the Diff holds data for is copied over the base, which then
/// restores, with the Diff's state file, to the VM as it was at the Diff.
pub fn merge(base: &Path, diff: &Path) -> Result<(), MemoryFileError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| MemoryFileError::Io {
            path: path.clone(),
            source,
        }
    };
    let diff_file = devices::host_file::open(diff, false, devices::host_file::Accept::RegularFile)
        .map_err(|e| io(diff)(std::io::Error::other(e.to_string())))?;
    let base_file = devices::host_file::open(base, true, devices::host_file::Accept::RegularFile)
        .map_err(|e| io(base)(std::io::Error::other(e.to_string())))?;
    let size = diff_file.metadata().map_err(io(diff))?.len();
    let base_size = base_file.metadata().map_err(io(base))?.len();
    if size != base_size {
        return Err(MemoryFileError::SizeMismatch {
            path: diff.display().to_string(),
            actual: size,
            expected: base_size,
        });
    }
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < size {
        let Some(start) = seek(&diff_file, at, libc::SEEK_DATA).map_err(io(diff))? else {
            break;
        };
        let end = seek(&diff_file, start, libc::SEEK_HOLE)
            .map_err(io(diff))?
            .unwrap_or(size);
        let mut offset = start;
        while offset < end {
            let len = CHUNK.min((end - offset) as usize);
            diff_file
                .read_exact_at(&mut buf[..len], offset)
                .map_err(io(diff))?;
            base_file
                .write_all_at(&buf[..len], offset)
                .map_err(io(base))?;
            offset += len as u64;
        }
        at = end;
    }
    base_file.sync_all().map_err(io(base))
}

/// `lseek(2)` with SEEK_DATA or SEEK_HOLE from `from`; `None` when no data follows.
fn seek(file: &std::fs::File, from: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(std::io::Error::other)?;
    // SAFETY: lseek on a descriptor `file` owns; it moves the file offset and nothing else.
    let offset = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if offset < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(error),
        };
    }
    Ok(Some(offset as u64))
}

/// Checks that `layout` is a guest memory layout: regions in address order, none empty, none
/// overlapping another in memory or in the file, none past the end of the address space.
/// Returns the file size it needs.
pub fn check_layout(layout: &[MemoryRegionState]) -> Result<u64, MemoryFileError> {
    let bad = |why: String| Err(MemoryFileError::Layout(why));
    if layout.is_empty() {
        return bad("no memory regions".into());
    }
    let mut next_addr = 0u64;
    let mut file_end = 0u64;
    for region in layout {
        let Some(end) = region.guest_addr.checked_add(region.size) else {
            return bad(format!("region at {:#x} overflows", region.guest_addr));
        };
        if region.size == 0 || region.size % PAGE as u64 != 0 || region.guest_addr < next_addr {
            return bad(format!(
                "region at {:#x} of {} bytes",
                region.guest_addr, region.size
            ));
        }
        if region.file_offset != file_end {
            return bad(format!(
                "region at {:#x} is at file offset {}, not {file_end}",
                region.guest_addr, region.file_offset
            ));
        }
        next_addr = end;
        file_end += region.size;
    }
    Ok(file_end)
}

/// Maps the memory file at `path` as guest memory laid out as `layout`, `MAP_PRIVATE`: lazy and
/// copy-on-write (see the module's doc). The file must be exactly as large as the layout.
pub fn restore_from_file(
    path: &Path,
    layout: &[MemoryRegionState],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let expected = check_layout(layout)?;
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = devices::host_file::open(path, false, devices::host_file::Accept::RegularFile)
        .map_err(|e| MemoryFileError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let actual = file.metadata().map_err(io)?.len();
    if actual != expected {
        return Err(MemoryFileError::SizeMismatch {
            path: path.display().to_string(),
            actual,
            expected,
        });
    }
    let file = Arc::new(file);
    let regions = layout
        .iter()
        .map(|region| {
            let mapping = MmapRegionBuilder::new_with_bitmap(
                region.size as usize,
                AtomicBitmap::with_len(region.size as usize),
            )
            .with_file_offset(FileOffset::from_arc(file.clone(), region.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryFileError::Guest(e.to_string()))?;
            GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
                .ok_or_else(|| MemoryFileError::Layout("a region overflows".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-memfile-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("mem")
    }

    #[test]
    fn saved_memory_is_sparse_and_maps_back_lazily_and_privately() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 << 20), 4 << 20),
        ])
        .unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        mem.write_obj(0x55u8, GuestAddress((16 << 20) + 4095))
            .unwrap();
        let path = scratch("sparse");
        let layout = save(&mem, &path, Pages::All).unwrap();
        assert_eq!(layout[1].file_offset, 8 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 12 << 20);
        // Two pages of data (file systems may allocate a little more around them).
        assert!(meta.blocks() * 512 <= 256 << 10, "{} blocks", meta.blocks());

        let restored = restore_from_file(&path, &layout).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((16 << 20) + 4095))
                .unwrap(),
            0x55
        );
        // A guest write stays in the VM: the file is untouched.
        restored.write_obj(7u32, GuestAddress(0x1234)).unwrap();
        let again = restore_from_file(&path, &layout).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_or_layout_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let path = scratch("mismatch");
        let layout = save(&mem, &path, Pages::All).unwrap();
        let mut bigger = layout.clone();
        bigger[0].size = 2 << 20;
        assert!(matches!(
            restore_from_file(&path, &bigger),
            Err(MemoryFileError::SizeMismatch { .. })
        ));
        for bad in [
            vec![],
            vec![MemoryRegionState {
                guest_addr: u64::MAX - 10,
                size: 4096,
                file_offset: 0,
            }],
            vec![
                MemoryRegionState {
                    guest_addr: 0,
                    size: 8192,
                    file_offset: 0,
                },
                MemoryRegionState {
                    guest_addr: 4096,
                    size: 4096,
                    file_offset: 8192,
                },
            ],
            vec![MemoryRegionState {
                guest_addr: 0,
                size: 100,
                file_offset: 0,
            }],
        ] {
            assert!(matches!(
                restore_from_file(&path, &bad),
                Err(MemoryFileError::Layout(_))
            ));
        }
        assert!(matches!(
            restore_from_file(&path.with_extension("missing"), &layout),
            Err(MemoryFileError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_diff_holds_the_pages_written_since_the_last_snapshot_and_merges_onto_its_base() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(1u64, GuestAddress(0)).unwrap();
        mem.write_obj(2u64, GuestAddress(0x5000)).unwrap();
        let dir = scratch("diff");
        let (base, diff) = (dir.with_file_name("base"), dir.with_file_name("diff"));
        let layout = save(&mem, &base, Pages::All).unwrap();
        // The VMM writes page 7 (its bitmap sees it), the guest page 9 (KVM's log says so),
        // and page 5 goes back to zeros.
        mem.write_obj(3u64, GuestAddress(0x7000)).unwrap();
        mem.write_obj(0u64, GuestAddress(0x5000)).unwrap();
        mem.write_obj(4u64, GuestAddress(0x9000)).unwrap();
        let kvm_log = vec![vec![1u64 << 9]];
        save(&mem, &diff, Pages::Dirty(&kvm_log)).unwrap();
        let meta = std::fs::metadata(&diff).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert!(meta.blocks() * 512 <= 64 << 10, "{} blocks", meta.blocks());

        merge(&base, &diff).unwrap();
        let merged = restore_from_file(&base, &layout).unwrap();
        for (addr, value) in [(0, 1u64), (0x5000, 0), (0x7000, 3), (0x9000, 4)] {
            assert_eq!(
                merged.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                value,
                "{addr:#x}"
            );
        }
        // Nothing written since: an empty Diff.
        save(&mem, &diff, Pages::Dirty(&[vec![0]])).unwrap();
        assert!(std::fs::metadata(&diff).unwrap().blocks() * 512 <= 8 << 10);
        // A Diff of another size is refused.
        std::fs::write(&diff, b"short").unwrap();
        assert!(merge(&base, &diff).is_err());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
