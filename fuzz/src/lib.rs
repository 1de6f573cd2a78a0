//! What Kiln's fuzz targets share: a reader over the fuzz input, and a hostile guest for the
//! virtio devices (guest memory whose every byte, rings and descriptors included, comes from the
//! input).
//!
//! The guest is what the virtio-mmio transport would hand a device on DRIVER_OK: acked features
//! (a subset of what the device offers), and queues that passed the transport's own checks
//! (`Queue::is_valid`). Everything inside the rings is the input's, so the targets exercise exactly
//! what a hostile guest controls: descriptor chains (loops, indirect tables, wrong directions,
//! lengths and addresses), request headers and payloads.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::{features, Interrupt, VirtioDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use devices::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Reads the fuzz input front to back; past its end every number reads as zero and every slice
/// as empty, so a target never has to check lengths.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps the fuzz input.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }

    /// A length-prefixed (u16) slice: one frame, one packet.
    pub fn frame(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    /// Whether anything is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// Bytes of guest memory, from guest address 0; the input fills it from the start.
pub const MEM_SIZE: usize = 0x1_0000;
/// Each queue's rings sit in their own slot: queue `i` at `i * QUEUE_SLOT`.
pub const QUEUE_SLOT: u64 = 0x200;
/// Largest queue the guest sets up, so the rings of every queue fit in its slot.
pub const MAX_QUEUE_SIZE: u16 = 16;

/// Offsets of the rings inside a queue's slot (16 descriptors of 16 bytes, then the rings).
const AVAIL_OFFSET: u64 = 0x100;
const USED_OFFSET: u64 = 0x140;

/// [`MEM_SIZE`] bytes of guest memory holding `image` from address 0 (cut to fit), zeros after it.
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("anonymous guest memory");
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0))
        .expect("the image fits guest memory");
    mem
}

/// A hostile guest's side of an activated device.
pub struct Guest {
    /// Guest memory, filled from the input.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line (an eventfd nobody reads).
    pub interrupt: Arc<Interrupt>,
    /// The driver's queues, valid in `mem`.
    pub queues: Vec<Queue>,
    /// Features the driver acked (a subset of the device's).
    pub acked: u64,
}

impl Guest {
    /// Reads the guest from the input: a u64 of features (masked to the device's offer), one
    /// byte per queue choosing its size (1 to 16), then the memory image. None when the queues
    /// are ones the transport would refuse.
    pub fn read(input: Input<'_>, device: &dyn VirtioDevice) -> Option<Guest> {
        let mut input = input;
        let acked = input.u64() & device.avail_features();
        let sizes: Vec<u8> = device
            .queue_max_sizes()
            .iter()
            .map(|_| input.u8())
            .collect();
        let image = input.rest();

        let mem = guest_memory(image);

        let mut queues = Vec::new();
        for (i, (&max, size)) in device.queue_max_sizes().iter().zip(sizes).enumerate() {
            let mut queue = Queue::new(max).ok()?;
            let size = (1u16 << (size % 5)).min(max).min(MAX_QUEUE_SIZE);
            let base = i as u64 * QUEUE_SLOT;
            queue.set_size(size);
            queue.set_desc_table_address(Some(base as u32), Some(0));
            queue.set_avail_ring_address(Some((base + AVAIL_OFFSET) as u32), Some(0));
            queue.set_used_ring_address(Some((base + USED_OFFSET) as u32), Some(0));
            queue.set_event_idx(acked & features::RING_EVENT_IDX != 0);
            queue.set_ready(true);
            if !queue.is_valid(&mem) {
                return None;
            }
            queues.push(queue);
        }
        let irqfd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        Some(Guest {
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            acked,
        })
    }

    /// Acks the features and activates `device` with this guest's queues, as the transport does
    /// on DRIVER_OK.
    pub fn activate(self, device: &mut dyn VirtioDevice) {
        device.set_acked_features(self.acked);
        device
            .activate(self.mem, self.interrupt, self.queues)
            .expect("the device takes as many queues as it asked for");
    }
}

/// Runs `device` on its own event loop as the VMM's would: the guest notifies every queue, then
/// the loop serves whatever is ready, `rounds` times (devices re-notify themselves when a queue
/// holds more than one pass's budget).
pub fn run_event_loop<D>(device: Arc<Mutex<D>>, rounds: usize)
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let mut manager = EventManager::<Arc<Mutex<D>>>::new().expect("epoll");
    manager.add_subscriber(device.clone());
    for _ in 0..rounds {
        {
            let device = device.lock().expect("device lock");
            for evt in device.queue_events() {
                let _ = evt.write(1);
            }
        }
        if manager.run_with_timeout(0).is_err() {
            break;
        }
    }
}

/// A file path private to this fuzzing process, in `$TMPDIR` (fuzz/run.sh points it at a scratch
/// directory, in /dev/shm when there is one, and removes it afterwards).
pub fn scratch_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-fuzz-{}-{name}", std::process::id()))
}

/// Size of the block targets' scratch image: 128 sectors, so requests inside and past its end are
/// both easy to reach.
pub const DISK_BYTES: u64 = 64 * 1024;

/// The block targets' scratch image, created (zeroed) once per process.
pub fn scratch_disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = scratch_path("disk.img");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("scratch disk image");
        file.set_len(DISK_BYTES).expect("scratch disk size");
        path
    })
}
