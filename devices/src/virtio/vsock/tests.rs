//! The device against mock queues in guest memory and real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::packet::{Op, PacketHeader, HEADER_LEN};
use super::*;
use crate::virtio::test_queue::add_chains_at;

use super::test_support::{guest_header, socket_dir, TempDir, GUEST_CID};

const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn vsock(test: &str) -> (Vsock, PathBuf, TempDir) {
    let (path, dir) = socket_dir(&format!("dev-{test}"));
    let listener = UnixListener::bind(&path).unwrap();
    let dev = Vsock::new(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: path.clone(),
        listener,
    })
    .unwrap();
    (dev, path, dir)
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// Queues `chains` (at most two descriptors each, at most eight outstanding per queue) without
/// overwriting the chains queued before.
fn add_chains(vq: &MockSplitQueue<'_, GuestMemoryMmap>, chains: &[&[RawDescriptor]]) {
    let avail = vq.avail().idx().load();
    add_chains_at(vq, chains, (avail * 2) % 16);
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// rx, tx and event queues of 16 entries.
fn queues(mem: &GuestMemoryMmap) -> [MockSplitQueue<'_, GuestMemoryMmap>; 3] {
    [
        MockSplitQueue::create(mem, GuestAddress(0), 16),
        MockSplitQueue::create(mem, GuestAddress(0x8000), 16),
        MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16),
    ]
}

fn activate(
    dev: &mut Vsock,
    mem: &GuestMemoryMmap,
    qs: &[MockSplitQueue<'_, GuestMemoryMmap>; 3],
) -> Arc<Interrupt> {
    let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.set_acked_features(dev.avail_features());
    let queues = qs.iter().map(|q| q.create_queue().unwrap()).collect();
    dev.activate(mem.clone(), int.clone(), queues).unwrap();
    int
}

/// Used ring entry `i`: (chain head, bytes written).
fn used(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: u64) -> (u32, u32) {
    let base = vq.used_addr().unchecked_add(4 + 8 * i);
    (
        mem.read_obj(base).unwrap(),
        mem.read_obj(base.unchecked_add(4)).unwrap(),
    )
}

fn used_idx(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap()
}

/// Places a guest packet at `addr`, split over two readable descriptors in the middle of the
/// header (drivers may split anywhere), and queues it on tx.
fn queue_tx(
    mem: &GuestMemoryMmap,
    tx: &MockSplitQueue<'_, GuestMemoryMmap>,
    addr: u64,
    hdr: PacketHeader,
    payload: &[u8],
) {
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    let split = 20u32;
    add_chains(
        tx,
        &[&[
            desc(addr, split, 0),
            desc(addr + split as u64, bytes.len() as u32 - split, 0),
        ]],
    );
}

/// Reads the packet the device wrote into an rx chain of two writable descriptors at `addr`
/// (header part) and `addr + 0x1000`.
fn read_rx(mem: &GuestMemoryMmap, addr: u64, len: u32) -> (PacketHeader, Vec<u8>) {
    let mut bytes = vec![0u8; len as usize];
    let first = (len as usize).min(HEADER_LEN);
    mem.read_slice(&mut bytes[..first], GuestAddress(addr))
        .unwrap();
    if len as usize > HEADER_LEN {
        mem.read_slice(&mut bytes[HEADER_LEN..], GuestAddress(addr + 0x1000))
            .unwrap();
    }
    let raw: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
    (PacketHeader::from_bytes(&raw), bytes[HEADER_LEN..].to_vec())
}

fn add_rx_buffers(rx: &MockSplitQueue<'_, GuestMemoryMmap>, base: u64, count: u64) {
    let chains: Vec<Vec<RawDescriptor>> = (0..count)
        .map(|i| {
            let addr = base + i * 0x2000;
            vec![
                desc(addr, HEADER_LEN as u32, WRITE),
                desc(addr + 0x1000, 4096, WRITE),
            ]
        })
        .collect();
    let refs: Vec<&[RawDescriptor]> = chains.iter().map(Vec::as_slice).collect();
    add_chains(rx, &refs);
}

fn pump(dev: &mut Vsock) {
    for _ in 0..3 {
        dev.process_host_events();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn config_space_features_and_cid_checks() {
    let (dev, path, _dir) = vsock("config");
    assert_eq!(dev.device_type(), device_type::VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_ne!(dev.avail_features() & features::VERSION_1, 0);
    let mut cid = [0xffu8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    assert_eq!(dev.uds_path(), path);
    assert_eq!(dev.guest_cid(), GUEST_CID);

    for bad in [0, 1, 2, u32::MAX as u64, 1 << 40] {
        let dir =
            std::env::temp_dir().join(format!("kiln-vsockdev-cid-{bad}-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let err = Vsock::new(VsockConfig {
            guest_cid: bad,
            uds_path: dir.clone(),
            listener,
        })
        .err()
        .expect("reserved cid refused");
        assert!(matches!(err, VsockError::InvalidCid(c) if c == bad));
        let _ = std::fs::remove_file(&dir);
    }
}

#[test]
fn activation_needs_three_queues() {
    let (mut dev, _path, _dir) = vsock("activation");
    let mem = mem();
    let qs = queues(&mem);
    let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let err = dev
        .activate(mem.clone(), int, vec![qs[0].create_queue().unwrap()])
        .unwrap_err();
    assert_eq!(
        err,
        ActivateError::QueueCount {
            expected: 3,
            given: 1
        }
    );
    assert!(!dev.is_activated());
    activate(&mut dev, &mem, &qs);
    assert!(dev.is_activated());
    dev.reset();
    assert!(!dev.is_activated());
}

#[test]
fn host_client_reaches_the_guest_through_guest_memory() {
    let (mut dev, path, _dir) = vsock("e2e");
    let mem = mem();
    let qs = queues(&mem);
    let int = activate(&mut dev, &mem, &qs);
    let [rx, tx, _] = &qs;
    add_rx_buffers(rx, 0x20_0000, 4);

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    pump(&mut dev);
    assert_eq!(used_idx(&mem, rx), 1);
    let (head, len) = used(&mem, rx, 0);
    assert_eq!((head, len), (0, HEADER_LEN as u32));
    let (req, _) = read_rx(&mem, 0x20_0000, len);
    assert_eq!(
        (req.op, req.dst_cid, req.dst_port),
        (Op::Request, GUEST_CID, 52)
    );
    assert_eq!(int.irqfd().read().unwrap(), 1);

    queue_tx(
        &mem,
        tx,
        0x40_0000,
        guest_header(Op::Response, 52, req.src_port, 0),
        &[],
    );
    dev.process_tx();
    assert_eq!(used_idx(&mem, tx), 1);
    assert_eq!(used(&mem, tx, 0).1, 0);
    let mut line = [0u8; 32];
    let n = client.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {}\n", req.src_port).as_bytes());

    // Host → guest: the payload lands in the chain's second descriptor.
    client.write_all(b"from the host").unwrap();
    pump(&mut dev);
    assert_eq!(used_idx(&mem, rx), 2);
    let (_, len) = used(&mem, rx, 1);
    let (rw, data) = read_rx(&mem, 0x20_2000, len);
    assert_eq!((rw.op, rw.len), (Op::Rw, 13));
    assert_eq!(data, b"from the host");

    // Guest → host.
    queue_tx(
        &mem,
        tx,
        0x40_1000,
        guest_header(Op::Rw, 52, req.src_port, 9),
        b"and back!",
    );
    dev.process_tx();
    let mut buf = [0u8; 9];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"and back!");
    assert_eq!(dev.counters().tx_bytes, 9);
    assert_eq!(dev.counters().rx_bytes, 13);

    // A device reset closes the host stream.
    dev.reset();
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn hostile_chains_fail_alone() {
    let (mut dev, path, _dir) = vsock("hostile");
    let mem = mem();
    let qs = queues(&mem);
    let _int = activate(&mut dev, &mem, &qs);
    let [rx, tx, _] = &qs;
    add_rx_buffers(rx, 0x20_0000, 8);

    // A tx descriptor outside guest memory, a write-only tx chain, a 10-byte packet.
    add_chains(tx, &[&[desc(0x1000_0000, 64, 0)]]);
    add_chains(tx, &[&[desc(0x40_0000, 64, WRITE)]]);
    add_chains(tx, &[&[desc(0x40_0000, 10, 0)]]);
    dev.process_tx();
    assert_eq!(used_idx(&mem, tx), 3);
    assert_eq!(dev.guest_errors(), 3);
    assert_eq!(used_idx(&mem, rx), 0, "nothing to answer");

    // The device still works.
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    pump(&mut dev);
    assert_eq!(used_idx(&mem, rx), 1);
    assert!(dev.is_activated());
}

#[test]
fn rx_buffer_outside_memory_is_returned_empty() {
    let (mut dev, _path, _dir) = vsock("rx-outside");
    let mem = mem();
    let qs = queues(&mem);
    let _int = activate(&mut dev, &mem, &qs);
    let [rx, tx, _] = &qs;
    add_chains(rx, &[&[desc(0x1000_0000, 4096, WRITE)]]);
    add_rx_buffers(rx, 0x20_0000, 1);
    // A packet to nobody: answered with an RST, which goes into the second buffer.
    queue_tx(&mem, tx, 0x40_0000, guest_header(Op::Rw, 1, 2, 0), &[]);
    dev.process_tx();
    assert_eq!(used_idx(&mem, rx), 2);
    assert_eq!(used(&mem, rx, 0).1, 0);
    assert_eq!(used(&mem, rx, 1).1, HEADER_LEN as u32);
}

#[test]
fn broken_tx_ring_needs_reset() {
    let (mut dev, _path, _dir) = vsock("broken");
    let mem = mem();
    let qs = queues(&mem);
    let int = activate(&mut dev, &mem, &qs);
    qs[TX_QUEUE].avail().idx().store(1000);
    dev.process_tx();
    assert!(int.needs_reset());
    assert!(!dev.is_activated());
}

#[test]
fn event_loop_wiring() {
    let (mut dev, path, _dir) = vsock("event-loop");
    let mem = mem();
    let qs = queues(&mem);
    let _int = activate(&mut dev, &mem, &qs);
    add_rx_buffers(&qs[RX_QUEUE], 0x20_0000, 2);
    let dev = Arc::new(Mutex::new(dev));
    let mut manager = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    manager.add_subscriber(dev.clone());
    manager.run_with_timeout(50).unwrap();

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    for _ in 0..10 {
        manager.run_with_timeout(100).unwrap();
        if used_idx(&mem, &qs[RX_QUEUE]) > 0 {
            break;
        }
    }
    let (_, len) = used(&mem, &qs[RX_QUEUE], 0);
    let (req, _) = read_rx(&mem, 0x20_0000, len);
    assert_eq!((req.op, req.dst_port), (Op::Request, 7));

    // The guest's RESPONSE arrives through the tx queue's eventfd.
    queue_tx(
        &mem,
        &qs[TX_QUEUE],
        0x40_0000,
        guest_header(Op::Response, 7, req.src_port, 0),
        &[],
    );
    dev.lock().unwrap().queue_events()[TX_QUEUE]
        .write(1)
        .unwrap();
    manager.run_with_timeout(100).unwrap();
    let mut line = [0u8; 32];
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = client.read(&mut line).unwrap();
    assert!(line[..n].starts_with(b"OK "));
}
