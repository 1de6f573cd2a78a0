//! Unit tests of the device against mock queues and an in-process fake TAP (a datagram socket
//! pair: one datagram per frame, non-blocking, pollable, like a TAP).

use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::tap::{TUN_F_CSUM, TUN_F_TSO4};
use super::*;
use crate::rate_limiter::TokenBucketConfig;
use crate::virtio::test_queue::add_chains;

const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The device's end of the fake TAP.
struct FakeTap {
    socket: UnixDatagram,
    offloads: Arc<AtomicU32>,
}

impl Read for FakeTap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }
}

impl Write for FakeTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offloads.store(flags, Ordering::SeqCst);
        Ok(())
    }
}

/// The host's end of the fake TAP: what it sends the device receives.
struct Host {
    socket: UnixDatagram,
    offloads: Arc<AtomicU32>,
}

impl Host {
    fn send(&self, frame: &[u8]) {
        assert_eq!(self.socket.send(frame).unwrap(), frame.len());
    }

    /// The next frame the device wrote, if any.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("fake tap: {e}"),
        }
    }
}

fn fake_tap() -> (FakeTap, Host) {
    let (device_end, host_end) = UnixDatagram::pair().unwrap();
    device_end.set_nonblocking(true).unwrap();
    host_end.set_nonblocking(true).unwrap();
    let offloads = Arc::new(AtomicU32::new(u32::MAX));
    (
        FakeTap {
            socket: device_end,
            offloads: offloads.clone(),
        },
        Host {
            socket: host_end,
            offloads,
        },
    )
}

fn config(tap: FakeTap) -> NetDeviceConfig<FakeTap> {
    NetDeviceConfig {
        id: "net0".into(),
        tap,
        mac: Some(MAC),
        mtu: None,
        rx_rate_limiter: RateLimiterConfig::default(),
        tx_rate_limiter: RateLimiterConfig::default(),
        mmds: None,
    }
}

fn net() -> (Net<FakeTap>, Host) {
    let (tap, host) = fake_tap();
    (Net::new(config(tap)).unwrap(), host)
}

/// A rate limiter of one operation per 100 s.
fn one_op() -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: None,
            refill_time: 100_000,
        }),
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// The receive and transmit queues, 16 entries each, rings at 0 and 0x8000.
fn queues(mem: &GuestMemoryMmap) -> [MockSplitQueue<'_, GuestMemoryMmap>; 2] {
    [
        MockSplitQueue::create(mem, GuestAddress(0), 16),
        MockSplitQueue::create(mem, GuestAddress(0x8000), 16),
    ]
}

fn activate(
    net: &mut Net<FakeTap>,
    mem: &GuestMemoryMmap,
    [rx, tx]: &[MockSplitQueue<'_, GuestMemoryMmap>; 2],
    acked: u64,
) -> Arc<Interrupt> {
    let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    net.set_acked_features(acked);
    let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    net.activate(mem.clone(), int.clone(), queues).unwrap();
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

/// A frame: a vnet header with recognisable flags and a payload of `len` bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1; // NEEDS_CSUM, passed through untouched.
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// `frame` as the guest must see it: `num_buffers` filled in.
fn with_num_buffers(frame: &[u8], n: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
    f
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// Stores a two-descriptor loop at `first` and `first + 1` and makes it available.
fn add_looping_chain(vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, flags: u16) {
    let table = vq.desc_table();
    let d = |next| RawDescriptor::from(SplitDescriptor::new(0x60_0000, 64, flags | NEXT, next));
    table.store(first, d(first + 1)).unwrap();
    table.store(first + 1, d(first)).unwrap();
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % 16))
        .unwrap()
        .store(first);
    vq.avail().idx().store(idx + 1);
}

/// Makes the single-descriptor chain at table index `index` available.
fn add_single(vq: &MockSplitQueue<'_, GuestMemoryMmap>, index: u16, d: RawDescriptor) {
    vq.desc_table().store(index, d).unwrap();
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % 16))
        .unwrap()
        .store(index);
    vq.avail().idx().store(idx + 1);
}

#[test]
fn config_space_and_features() {
    let (net, _host) = net();
    assert_eq!(net.device_type(), device_type::NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    assert_eq!(net.queue_events().len(), 2);
    let offered = net.avail_features();
    for f in [
        features::VERSION_1,
        features::RING_EVENT_IDX,
        features::RING_INDIRECT_DESC,
        feature::MAC,
        feature::MRG_RXBUF,
        feature::CSUM,
        feature::GUEST_CSUM,
        feature::GUEST_TSO4,
        feature::GUEST_TSO6,
        feature::GUEST_UFO,
        feature::HOST_TSO4,
        feature::HOST_TSO6,
        feature::HOST_UFO,
    ] {
        assert_ne!(offered & f, 0, "feature {f:#x} not offered");
    }
    assert_eq!(offered & feature::MTU, 0);
    assert_eq!(offered & (1 << virtio_net::VIRTIO_NET_F_STATUS), 0);
    let mut space = [0u8; 12];
    net.read_config(0, &mut space);
    assert_eq!(space, [2, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0]);

    let (tap, _host) = fake_tap();
    let net = Net::new(NetDeviceConfig {
        mac: None,
        mtu: Some(1400),
        ..config(tap)
    })
    .unwrap();
    assert_eq!(net.avail_features() & feature::MAC, 0);
    assert_ne!(net.avail_features() & feature::MTU, 0);
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1400);
    assert_eq!(net.id(), "net0");
}

#[test]
fn invalid_settings_are_refused() {
    let (tap, _host) = fake_tap();
    let err = Net::new(NetDeviceConfig {
        mtu: Some(67),
        ..config(tap)
    })
    .err()
    .unwrap();
    assert!(matches!(err, NetError::MtuTooSmall(67)), "{err}");
    for mac in [[1, 0, 0, 0, 0, 1], [0; 6]] {
        let (tap, _host) = fake_tap();
        let err = Net::new(NetDeviceConfig {
            mac: Some(mac),
            ..config(tap)
        })
        .err()
        .unwrap();
        assert!(matches!(err, NetError::InvalidMac { .. }), "{err}");
    }
    let (tap, _host) = fake_tap();
    let err = Net::new(NetDeviceConfig {
        mac: Some([0xff; 6]),
        ..config(tap)
    })
    .err()
    .unwrap();
    assert!(
        err.to_string().starts_with("mac ff:ff:ff:ff:ff:ff: "),
        "{err}"
    );
}

#[test]
fn activation_sets_tap_offloads_from_guest_features() {
    let mem = mem();
    let vqs = queues(&mem);
    let (mut net, host) = net();
    let acked = features::VERSION_1
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::HOST_TSO6
        | feature::MRG_RXBUF;
    activate(&mut net, &mem, &vqs, acked);
    assert_eq!(
        host.offloads.load(Ordering::SeqCst),
        TUN_F_CSUM | TUN_F_TSO4
    );
    net.reset();
    activate(
        &mut net,
        &mem,
        &vqs,
        features::VERSION_1 | feature::GUEST_TSO4,
    );
    assert_eq!(host.offloads.load(Ordering::SeqCst), 0);
}

#[test]
fn wrong_queue_count_is_refused() {
    let mem = mem();
    let [rx, _] = queues(&mem);
    let (mut net, _host) = net();
    let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let err = net
        .activate(mem.clone(), int, vec![rx.create_queue().unwrap()])
        .unwrap_err();
    assert_eq!(
        err,
        ActivateError::QueueCount {
            expected: 2,
            given: 1
        }
    );
    assert!(!net.is_activated());
}

#[test]
fn tx_frame_reaches_backend_intact() {
    let mem = mem();
    let vqs = queues(&mem);
    let sent = frame(100, 3);
    mem.write_slice(&sent[..VNET_HDR_LEN], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&sent[VNET_HDR_LEN..], GuestAddress(0x10_1000))
        .unwrap();
    add_chains(
        &vqs[1],
        &[&[desc(0x10_0000, 12, 0), desc(0x10_1000, 100, 0)]],
    );
    let (mut net, host) = net();
    let int = activate(&mut net, &mem, &vqs, features::VERSION_1);
    net.process_tx();
    assert_eq!(host.recv().unwrap(), sent);
    assert_eq!(host.recv(), None);
    assert_eq!(used(&mem, &vqs[1], 0), (0, 0));
    assert_eq!(int.irqfd().read().unwrap(), 1);
    let c = net.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.guest_errors), (1, 100, 0));
}

#[test]
fn hostile_tx_chains_fail_alone() {
    let mem = mem();
    let vqs = queues(&mem);
    let good = frame(60, 9);
    mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    add_chains(
        &vqs[1],
        &[
            // A writable buffer.
            &[desc(0x10_0000, 12, 0), desc(0x20_0000, 60, WRITE)],
            // Longer than any frame.
            &[desc(0x20_0000, MAX_BUFFER_LEN as u32 + 1, 0)],
            // Outside guest memory.
            &[desc(0x10_0000, 12, 0), desc(0xfff_0000, 60, 0)],
            // Shorter than a header.
            &[desc(0x10_0000, 4, 0)],
            // A good one afterwards still goes out.
            &[desc(0x10_0000, good.len() as u32, 0)],
        ],
    );
    let (mut net, host) = net();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    net.process_tx();
    assert_eq!(vqs[1].used().idx().load(), 5);
    for i in 0..5 {
        assert_eq!(used(&mem, &vqs[1], i).1, 0);
    }
    assert_eq!(host.recv().unwrap(), good);
    assert_eq!(host.recv(), None);
    assert_eq!(read_guest(&mem, 0x20_0000, 60), vec![0u8; 60]);
    assert!(net.is_activated());
    let c = net.counters();
    assert_eq!((c.tx_frames, c.guest_errors), (1, 4));
}

#[test]
fn looping_tx_chain_fails_alone() {
    let mem = mem();
    let vqs = queues(&mem);
    let good = frame(20, 1);
    mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    add_looping_chain(&vqs[1], 0, 0);
    add_single(&vqs[1], 2, desc(0x10_0000, good.len() as u32, 0));
    let (mut net, host) = net();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    net.process_tx();
    assert_eq!(vqs[1].used().idx().load(), 2);
    assert_eq!(host.recv().unwrap(), good);
    assert_eq!(host.recv(), None);
    assert_eq!(net.counters().guest_errors, 1);
}

#[test]
fn tx_backend_errors_drop_the_frame() {
    let mem = mem();
    let vqs = queues(&mem);
    mem.write_slice(&frame(20, 1), GuestAddress(0x10_0000))
        .unwrap();
    add_chains(
        &vqs[1],
        &[&[desc(0x10_0000, 32, 0)], &[desc(0x10_0000, 32, 0)]],
    );
    let (mut net, host) = net();
    drop(host);
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    net.process_tx();
    assert_eq!(vqs[1].used().idx().load(), 2);
    let c = net.counters();
    assert_eq!((c.tx_frames, c.tx_dropped, c.guest_errors), (0, 2, 0));
    assert!(net.is_activated());
}

#[test]
fn tx_rate_limiter_holds_frames_back() {
    let mem = mem();
    let vqs = queues(&mem);
    mem.write_slice(&frame(20, 1), GuestAddress(0x10_0000))
        .unwrap();
    add_chains(
        &vqs[1],
        &[&[desc(0x10_0000, 32, 0)], &[desc(0x10_0000, 32, 0)]],
    );
    let (tap, host) = fake_tap();
    let mut net = Net::new(NetDeviceConfig {
        tx_rate_limiter: one_op(),
        ..config(tap)
    })
    .unwrap();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    net.process_tx();
    assert_eq!(vqs[1].used().idx().load(), 1);
    assert!(host.recv().is_some());
    assert_eq!(host.recv(), None);
    // Another kick changes nothing until the limiter's timer fires.
    net.process_tx();
    assert_eq!(vqs[1].used().idx().load(), 1);
    assert!(net.tx_rate_limiter.is_blocked());
    assert_eq!(net.counters().tx_dropped, 0);
}

#[test]
fn rx_frame_lands_in_one_chain() {
    let mem = mem();
    let vqs = queues(&mem);
    add_chains(&vqs[0], &[&[desc(0x10_0000, 2048, WRITE)]]);
    let (mut net, host) = net();
    let int = activate(&mut net, &mem, &vqs, features::VERSION_1);
    let sent = frame(60, 5);
    host.send(&sent);
    net.process_rx();
    assert_eq!(used(&mem, &vqs[0], 0), (0, 72));
    assert_eq!(read_guest(&mem, 0x10_0000, 72), with_num_buffers(&sent, 1));
    assert_eq!(int.irqfd().read().unwrap(), 1);
    let c = net.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (1, 60, 0));
    assert_eq!(net.rx_pending, None);
}

#[test]
fn rx_frame_spans_chains_with_mrg_rxbuf() {
    let mem = mem();
    let vqs = queues(&mem);
    add_chains(
        &vqs[0],
        &[
            &[desc(0x10_0000, 1000, WRITE)],
            // Two descriptors in one chain.
            &[desc(0x20_0000, 400, WRITE), desc(0x21_0000, 600, WRITE)],
            &[desc(0x30_0000, 1000, WRITE)],
            &[desc(0x40_0000, 1000, WRITE)],
        ],
    );
    let (mut net, host) = net();
    activate(
        &mut net,
        &mem,
        &vqs,
        features::VERSION_1 | feature::MRG_RXBUF,
    );
    let sent = frame(2500, 11);
    host.send(&sent);
    net.process_rx();
    assert_eq!(
        vqs[0].used().idx().load(),
        3,
        "the fourth chain is untouched"
    );
    assert_eq!(used(&mem, &vqs[0], 0), (0, 1000));
    assert_eq!(used(&mem, &vqs[0], 1), (1, 1000));
    assert_eq!(used(&mem, &vqs[0], 2), (3, 512));
    let mut guest = read_guest(&mem, 0x10_0000, 1000);
    guest.extend(read_guest(&mem, 0x20_0000, 400));
    guest.extend(read_guest(&mem, 0x21_0000, 600));
    guest.extend(read_guest(&mem, 0x30_0000, 512));
    assert_eq!(guest, with_num_buffers(&sent, 3));
    assert_eq!(net.counters().rx_bytes, 2500);
}

#[test]
fn rx_frame_waits_for_guest_buffers() {
    let mem = mem();
    let vqs = queues(&mem);
    let (mut net, host) = net();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    let (first, second) = (frame(30, 1), frame(40, 2));
    host.send(&first);
    host.send(&second);
    net.process_rx();
    assert_eq!(vqs[0].used().idx().load(), 0);
    assert_eq!(net.rx_pending, Some(first.len()), "one frame is held");
    // One buffer arrives: the held frame goes in, the next one is read and held.
    add_chains(&vqs[0], &[&[desc(0x10_0000, 2048, WRITE)]]);
    net.process_rx();
    assert_eq!(used(&mem, &vqs[0], 0), (0, first.len() as u32));
    assert_eq!(
        read_guest(&mem, 0x10_0000, first.len()),
        with_num_buffers(&first, 1)
    );
    assert_eq!(net.rx_pending, Some(second.len()));
    add_chains(&vqs[0], &[&[desc(0x20_0000, 2048, WRITE)]]);
    net.process_rx();
    assert_eq!(vqs[0].used().idx().load(), 2);
    assert_eq!(
        read_guest(&mem, 0x20_0000, second.len()),
        with_num_buffers(&second, 1)
    );
    assert_eq!(net.rx_pending, None);
    assert_eq!(net.counters().rx_frames, 2);
}

#[test]
fn rx_without_mrg_rxbuf_drops_frames_too_big_for_a_chain() {
    let mem = mem();
    let vqs = queues(&mem);
    add_chains(&vqs[0], &[&[desc(0x10_0000, 100, WRITE)]]);
    let (mut net, host) = net();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    host.send(&frame(200, 1));
    let small = frame(50, 2);
    host.send(&small);
    net.process_rx();
    // The big frame was dropped; the chain it did not fit took the next one.
    assert_eq!(vqs[0].used().idx().load(), 1);
    assert_eq!(used(&mem, &vqs[0], 0), (0, small.len() as u32));
    assert_eq!(
        read_guest(&mem, 0x10_0000, small.len()),
        with_num_buffers(&small, 1)
    );
    let c = net.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
}

#[test]
fn hostile_rx_chains_fail_alone() {
    let mem = mem();
    let vqs = queues(&mem);
    mem.write_slice(&[0xaa; 64], GuestAddress(0x50_0000))
        .unwrap();
    add_chains(
        &vqs[0],
        &[
            // Read-only.
            &[desc(0x50_0000, 2048, 0)],
            // A writable buffer then a read-only one.
            &[desc(0x50_1000, 1024, WRITE), desc(0x50_0000, 64, 0)],
            // Outside guest memory.
            &[desc(0xfff_0000, 2048, WRITE)],
            // Too small for a header.
            &[desc(0x50_2000, 4, WRITE)],
            // A good one afterwards still receives.
            &[desc(0x10_0000, 2048, WRITE)],
        ],
    );
    let (mut net, host) = net();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    let sent = frame(60, 4);
    host.send(&sent);
    net.process_rx();
    assert_eq!(vqs[0].used().idx().load(), 5);
    for i in 0..4 {
        assert_eq!(used(&mem, &vqs[0], i).1, 0, "chain {i}");
    }
    assert_eq!(used(&mem, &vqs[0], 4), (5, sent.len() as u32));
    assert_eq!(read_guest(&mem, 0x50_0000, 64), vec![0xaa; 64]);
    assert_eq!(read_guest(&mem, 0x50_1000, 64), vec![0; 64]);
    assert_eq!(
        read_guest(&mem, 0x10_0000, sent.len()),
        with_num_buffers(&sent, 1)
    );
    assert!(net.is_activated());
    assert_eq!(net.counters().guest_errors, 4);
}

#[test]
fn broken_chain_between_merged_buffers_is_returned_first() {
    let mem = mem();
    let vqs = queues(&mem);
    add_chains(
        &vqs[0],
        &[
            &[desc(0x10_0000, 1000, WRITE)],
            &[desc(0x50_0000, 1000, 0)],
            &[desc(0x20_0000, 1000, WRITE)],
        ],
    );
    let (mut net, host) = net();
    activate(
        &mut net,
        &mem,
        &vqs,
        features::VERSION_1 | feature::MRG_RXBUF,
    );
    let sent = frame(1488, 6);
    host.send(&sent);
    net.process_rx();
    // The frame's two chains are consecutive in the used ring.
    assert_eq!(used(&mem, &vqs[0], 0), (1, 0));
    assert_eq!(used(&mem, &vqs[0], 1), (0, 1000));
    assert_eq!(used(&mem, &vqs[0], 2), (2, 500));
    let mut guest = read_guest(&mem, 0x10_0000, 1000);
    guest.extend(read_guest(&mem, 0x20_0000, 500));
    assert_eq!(guest, with_num_buffers(&sent, 2));
}

#[test]
fn looping_rx_chain_fails_alone() {
    let mem = mem();
    let vqs = queues(&mem);
    add_looping_chain(&vqs[0], 0, WRITE);
    add_single(&vqs[0], 2, desc(0x10_0000, 2048, WRITE));
    let (mut net, host) = net();
    activate(
        &mut net,
        &mem,
        &vqs,
        features::VERSION_1 | feature::MRG_RXBUF,
    );
    let sent = frame(100, 8);
    host.send(&sent);
    net.process_rx();
    assert_eq!(used(&mem, &vqs[0], 0), (0, 0));
    assert_eq!(used(&mem, &vqs[0], 1), (2, sent.len() as u32));
    assert_eq!(net.counters().guest_errors, 1);
}

#[test]
fn rx_frame_larger_than_the_whole_ring_is_dropped() {
    let mem = mem();
    let vqs = queues(&mem);
    let tiny: Vec<RawDescriptor> = (0..16)
        .map(|i| desc(0x10_0000 + i * 0x1000, 16, WRITE))
        .collect();
    let chains: Vec<&[RawDescriptor]> = tiny.chunks(1).collect();
    add_chains(&vqs[0], &chains);
    let (mut net, host) = net();
    activate(
        &mut net,
        &mem,
        &vqs,
        features::VERSION_1 | feature::MRG_RXBUF,
    );
    host.send(&frame(1000, 1));
    let small = frame(8, 2);
    host.send(&small);
    net.process_rx();
    // The big frame could never fit; the small one takes two of the still available chains.
    assert_eq!(vqs[0].used().idx().load(), 2);
    assert_eq!(used(&mem, &vqs[0], 0), (0, 16));
    assert_eq!(used(&mem, &vqs[0], 1), (1, 4));
    assert_eq!(net.counters().rx_dropped, 1);
}

#[test]
fn rx_rate_limiter_holds_frames_back() {
    let mem = mem();
    let vqs = queues(&mem);
    add_chains(
        &vqs[0],
        &[
            &[desc(0x10_0000, 2048, WRITE)],
            &[desc(0x20_0000, 2048, WRITE)],
        ],
    );
    let (tap, host) = fake_tap();
    let mut net = Net::new(NetDeviceConfig {
        rx_rate_limiter: one_op(),
        ..config(tap)
    })
    .unwrap();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    host.send(&frame(10, 1));
    let held = frame(20, 2);
    host.send(&held);
    net.process_rx();
    assert_eq!(vqs[0].used().idx().load(), 1);
    assert_eq!(net.rx_pending, Some(held.len()));
    assert!(net.rx_rate_limiter.is_blocked());
    assert_eq!(net.counters().rx_dropped, 0);
}

#[test]
fn broken_rx_ring_needs_reset() {
    let mem = mem();
    let vqs = queues(&mem);
    let (mut net, host) = net();
    let int = activate(&mut net, &mem, &vqs, features::VERSION_1);
    // 100 entries "available" in a 16-entry ring.
    vqs[0].avail().idx().store(100);
    host.send(&frame(10, 1));
    net.process_rx();
    assert!(!net.is_activated());
    assert!(int.needs_reset());
}

#[test]
fn reset_drops_the_held_frame() {
    let mem = mem();
    let vqs = queues(&mem);
    let (mut net, host) = net();
    activate(&mut net, &mem, &vqs, features::VERSION_1);
    host.send(&frame(10, 1));
    net.process_rx();
    assert!(net.rx_pending.is_some());
    net.reset();
    assert!(!net.is_activated());
    assert_eq!(net.rx_pending, None);
    assert_eq!(net.counters().rx_dropped, 1);
}

/// Through the event loop, as the VMM runs it: a frame that reached the TAP before activation
/// is delivered on ACTIVATE although its (edge-triggered) readiness was reported before, and a
/// transmit kick sends.
#[test]
fn event_loop_delivers_frames_from_before_activation() {
    let mem = mem();
    let vqs = queues(&mem);
    let (net, host) = net();
    let net = Arc::new(Mutex::new(net));
    let mut manager = EventManager::<Arc<Mutex<Net<FakeTap>>>>::new().unwrap();
    manager.add_subscriber(net.clone());
    let early = frame(30, 3);
    host.send(&early);
    manager.run_with_timeout(50).unwrap();
    add_chains(&vqs[0], &[&[desc(0x10_0000, 2048, WRITE)]]);
    activate(&mut net.lock().unwrap(), &mem, &vqs, features::VERSION_1);
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(used(&mem, &vqs[0], 0), (0, early.len() as u32));

    // A later frame is reported by the TAP itself.
    add_chains(&vqs[0], &[&[desc(0x20_0000, 2048, WRITE)]]);
    let late = frame(40, 4);
    host.send(&late);
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(vqs[0].used().idx().load(), 2);
    assert_eq!(
        read_guest(&mem, 0x20_0000, late.len()),
        with_num_buffers(&late, 1)
    );

    let sent = frame(50, 5);
    mem.write_slice(&sent, GuestAddress(0x30_0000)).unwrap();
    add_chains(&vqs[1], &[&[desc(0x30_0000, sent.len() as u32, 0)]]);
    net.lock().unwrap().common.queue_evts()[TX_QUEUE]
        .write(1)
        .unwrap();
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(host.recv().unwrap(), sent);
}

/// An ARP request from the guest (MAC, 10.0.0.2) for `target`, vnet header first.
fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    // Ethernet/IPv4, request.
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

#[test]
fn mmds_frames_are_answered_by_the_device_and_never_reach_the_tap() {
    use crate::mmds::{MmdsStack, MmdsStackConfig, MmdsStore};
    let mem = mem();
    let vqs = queues(&mem);
    let (tap, host) = fake_tap();
    let mut net = Net::new(NetDeviceConfig {
        mmds: Some(MmdsStack::new(MmdsStackConfig {
            ipv4: std::net::Ipv4Addr::new(169, 254, 169, 254),
            store: MmdsStore::shared(1024),
        })),
        ..config(tap)
    })
    .unwrap();
    let for_mmds = arp_request([169, 254, 169, 254]);
    let for_tap = arp_request([10, 0, 0, 1]);
    mem.write_slice(&for_mmds, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&for_tap, GuestAddress(0x11_0000)).unwrap();
    add_chains(
        &vqs[1],
        &[
            &[desc(0x10_0000, for_mmds.len() as u32, 0)],
            &[desc(0x11_0000, for_tap.len() as u32, 0)],
        ],
    );
    add_chains(&vqs[0], &[&[desc(0x20_0000, 2048, WRITE)]]);
    let _int = activate(&mut net, &mem, &vqs, features::VERSION_1);
    net.process_tx();
    net.deliver_mmds_answers();
    // Only the other frame reached the TAP.
    assert_eq!(host.recv().unwrap(), for_tap);
    assert_eq!(host.recv(), None);
    // MMDS's ARP reply is in the guest's receive chain: from MMDS's MAC, to the guest.
    let (head, len) = used(&mem, &vqs[0], 0);
    assert_eq!(head, 0);
    let reply = read_guest(&mem, 0x20_0000, len as usize);
    let eth = &reply[VNET_HDR_LEN..];
    assert_eq!(&eth[0..6], &MAC, "to the guest");
    assert_eq!(&eth[6..12], &crate::mmds::stack::MMDS_MAC, "from MMDS");
    assert_eq!(&eth[12..14], &[0x08, 0x06]);
    assert_eq!(&eth[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&eth[28..32], &[169, 254, 169, 254]);
    let mmds = net.mmds_counters().unwrap();
    assert_eq!((mmds.frames_taken, mmds.frames_sent), (1, 1));
    let groups = net.service_metric_groups();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].0, "mmds");
    assert!(groups[0].1.contains(&("rx_accepted", 1)), "{groups:?}");
    assert_eq!(net.counters().tx_frames, 1);
}
