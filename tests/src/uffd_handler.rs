//! A page-fault handler for snapshot loads with the `Uffd` memory backend, written from
//! Firecracker's protocol (what its example handlers do), to check Kiln speaks it.
//!
//! It listens on a Unix socket; the VMM connects and sends a JSON list of its guest memory
//! regions (`base_host_virt_addr`, `size`, `offset`, `page_size`) with its userfaultfd as
//! `SCM_RIGHTS`. The handler maps the snapshot's memory file and answers each missing-page fault
//! with `UFFDIO_COPY` of that page from the file, counting the faults it served; remove events
//! (a balloon's `MADV_DONTNEED`) are counted too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAGE: u64 = 4096;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

mod ioctls {
    #![allow(missing_docs)]
    use super::UffdioCopy;
    use vmm_sys_util::ioctl_iowr_nr;
    ioctl_iowr_nr!(UFFDIO_COPY, 0xaa, 0x03, UffdioCopy);
}

/// One region as the VMM describes it.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: u64,
    size: u64,
    offset: u64,
}

/// A running handler: what it served, and a way to stop it.
pub struct UffdHandler {
    /// Missing-page faults answered.
    pub faults: Arc<AtomicU64>,
    /// Remove events seen.
    pub removes: Arc<AtomicU64>,
    /// The region list the VMM sent, as JSON.
    pub regions_json: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UffdHandler {
    /// Listens at `socket` and serves one VMM's faults from the memory file at `mem_file`.
    pub fn start(socket: &Path, mem_file: &Path) -> Self {
        let listener = UnixListener::bind(socket).expect("bind the handler's socket");
        let memory = File::open(mem_file).expect("memory file");
        let len = memory.metadata().expect("memory file size").len() as usize;
        // SAFETY: a private read-only mapping of a file we opened; it stays mapped for the
        // thread's life (it is never unmapped: the test process ends soon after).
        let source = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                memory.as_raw_fd(),
                0,
            )
        };
        assert_ne!(source, libc::MAP_FAILED, "mmap the memory file");
        let source = source as u64;
        let faults = Arc::new(AtomicU64::new(0));
        let removes = Arc::new(AtomicU64::new(0));
        let regions_json = Arc::new(std::sync::Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, r, j, s) = (
            faults.clone(),
            removes.clone(),
            regions_json.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("the VMM connects");
            let mut body = vec![0u8; 64 << 10];
            let (read, fd) = stream.recv_with_fd(&mut body[..]).expect("regions and fd");
            let uffd = fd.expect("the VMM sent its userfaultfd");
            let value: serde_json::Value =
                serde_json::from_slice(&body[..read]).expect("regions JSON");
            let regions: Vec<Region> = value
                .as_array()
                .expect("a list of regions")
                .iter()
                .map(|r| Region {
                    base: r["base_host_virt_addr"].as_u64().unwrap(),
                    size: r["size"].as_u64().unwrap(),
                    offset: r["offset"].as_u64().unwrap(),
                })
                .collect();
            *j.lock().unwrap() = Some(value);
            serve(&uffd, &regions, source, len as u64, &f, &r, &s);
        });
        Self {
            faults,
            removes,
            regions_json,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UffdHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    uffd: &File,
    regions: &[Region],
    source: u64,
    source_len: u64,
    faults: &AtomicU64,
    removes: &AtomicU64,
    stop: &AtomicBool,
) {
    let fd = uffd.as_raw_fd();
    while !stop.load(Ordering::Acquire) {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        if pollfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes (one `struct uffd_msg`) into `msg`.
        let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), msg.len()) };
        if n != 32 {
            continue;
        }
        match msg[0] {
            UFFD_EVENT_PAGEFAULT => {
                let address = u64::from_le_bytes(msg[16..24].try_into().unwrap());
                let page = address & !(PAGE - 1);
                let Some(region) = regions
                    .iter()
                    .find(|r| (r.base..r.base + r.size).contains(&page))
                else {
                    continue;
                };
                let file_offset = region.offset + (page - region.base);
                assert!(
                    file_offset + PAGE <= source_len,
                    "fault past the memory file"
                );
                let mut copy = UffdioCopy {
                    dst: page,
                    src: source + file_offset,
                    len: PAGE,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy`; `src` is inside
                // the memory file's mapping and `dst` inside a registered region.
                let ret = unsafe { libc::ioctl(fd, ioctls::UFFDIO_COPY(), &mut copy) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                // EEXIST: another fault on the page was answered first.
                if ret == 0 || errno == Some(libc::EEXIST) {
                    faults.fetch_add(1, Ordering::Relaxed);
                }
            }
            UFFD_EVENT_REMOVE => {
                removes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}
