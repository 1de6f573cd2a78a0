use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;

use vm_memory::FileOffset;

use super::*;
use crate::virtio::INT_USED_RING;

// vhost-user request codes (the vhost-user spec's "Front-end message types").
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;

const PROTOCOL_FEATURES: u64 = 1 << 30;
const MQ: u64 = 1;

/// A vhost-user backend that answers the GET requests and records every request it gets (the
/// attached fds are dropped with the ancillary data). It stops after `stop_after` requests,
/// closing the socket as a dying daemon would.
fn fake_backend(features: u64, stop_after: usize) -> (PathBuf, mpsc::Receiver<(u32, u64)>) {
    let dir = std::env::temp_dir().join(format!(
        "kiln-fs-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("fs.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _): (UnixStream, _) = listener.accept().unwrap();
        for _ in 0..stop_after {
            let mut header = [0u8; 12];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let code = u32::from_le_bytes(header[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            stream.read_exact(&mut body).unwrap();
            let first = body
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .unwrap_or_default();
            let reply = match code {
                GET_FEATURES => Some(features),
                GET_PROTOCOL_FEATURES => Some(MQ),
                GET_QUEUE_NUM => Some(2),
                // VhostUserVringState: the queue's index, then where it stopped.
                GET_VRING_BASE => Some(first & 0xffff_ffff | (7 << 32)),
                _ => None,
            };
            if let Some(value) = reply {
                let mut out = Vec::new();
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
                stream.write_all(&out).unwrap();
            }
            if tx.send((code, first)).is_err() {
                return;
            }
        }
    });
    (socket, rx)
}

fn config(socket: PathBuf) -> FsConfig {
    FsConfig {
        tag: "share".into(),
        socket,
        num_request_queues: 1,
        queue_size: 256,
    }
}

fn shared_memory() -> GuestMemoryMmap {
    let file = tempfile_in_memory(1 << 20);
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        1 << 20,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn tempfile_in_memory(len: u64) -> std::fs::File {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("kiln-fs-mem-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(len).unwrap();
    file
}

fn queues(n: usize) -> Vec<Queue> {
    (0..n).map(|_| Queue::new(256).unwrap()).collect()
}

/// The next `n` requests the backend got (it may still be reading those the frontend sent
/// without waiting for a reply).
fn take(rx: &mpsc::Receiver<(u32, u64)>, n: usize) -> Vec<(u32, u64)> {
    (0..n)
        .map_while(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
        .collect()
}

fn codes(rx: &mpsc::Receiver<(u32, u64)>, n: usize) -> Vec<u32> {
    let got: Vec<u32> = take(rx, n).into_iter().map(|(code, _)| code).collect();
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "more than {n} requests"
    );
    got
}

#[test]
fn negotiates_at_creation_and_hands_the_queues_over_on_the_event_loop() {
    let features = features::VERSION_1 | features::RING_EVENT_IDX | PROTOCOL_FEATURES | (1 << 3);
    let (socket, rx) = fake_backend(features, 100);
    let mut fs = Fs::new(&config(socket)).unwrap();
    assert_eq!(
        codes(&rx, 5),
        [
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM
        ]
    );
    // The guest sees the virtio bits Kiln passes on, never the vhost-user one.
    assert_eq!(
        fs.avail_features(),
        features::VERSION_1 | features::RING_EVENT_IDX
    );
    let mut config_space = [0u8; 40];
    fs.read_config(0, &mut config_space);
    assert_eq!(&config_space[..6], b"share\0");
    assert_eq!(&config_space[36..], &1u32.to_le_bytes());

    fs.set_acked_features(features::VERSION_1 | features::RING_EVENT_IDX);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    fs.activate(shared_memory(), interrupt.clone(), queues(2))
        .unwrap();
    assert!(fs.is_activated());
    // Nothing is sent from the vCPU's call.
    assert_eq!(codes(&rx, 0), Vec::<u32>::new());
    fs.apply_pending();
    let sent = take(&rx, 14);
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let expected: Vec<u32> = [SET_FEATURES, SET_MEM_TABLE]
        .into_iter()
        .chain(per_queue)
        .chain(per_queue)
        .collect();
    assert_eq!(sent.iter().map(|(c, _)| *c).collect::<Vec<_>>(), expected);
    // The backend is told of the driver's features plus the vhost-user protocol bit.
    assert_eq!(
        sent[0].1,
        features::VERSION_1 | features::RING_EVENT_IDX | PROTOCOL_FEATURES
    );
    assert_eq!(fs.queue_positions().len(), 2);

    // The backend's call becomes the device's used-ring interrupt.
    fs.call_evt.write(1).unwrap();
    fs.backend_called();
    assert_eq!(interrupt.status() & INT_USED_RING, INT_USED_RING);

    // A reset stops the rings, again from the event loop.
    fs.reset();
    assert!(!fs.is_activated());
    fs.apply_pending();
    assert_eq!(codes(&rx, 2), [GET_VRING_BASE, GET_VRING_BASE]);
}

#[test]
fn private_memory_or_a_dead_backend_fail_the_device_not_the_vmm() {
    let features = features::VERSION_1 | PROTOCOL_FEATURES;
    let (socket, _rx) = fake_backend(features, 100);
    let mut fs = Fs::new(&config(socket)).unwrap();
    fs.set_acked_features(features::VERSION_1);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let private = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    fs.activate(private, interrupt.clone(), queues(2)).unwrap();
    fs.apply_pending();
    assert!(interrupt.needs_reset());
    assert_eq!(fs.counters().activate_fails, 1);

    // The backend closes its socket after the creation handshake.
    let (socket, _rx) = fake_backend(features, 5);
    let mut fs = Fs::new(&config(socket)).unwrap();
    fs.set_acked_features(features::VERSION_1);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    fs.activate(shared_memory(), interrupt.clone(), queues(2))
        .unwrap();
    fs.apply_pending();
    assert!(
        interrupt.needs_reset(),
        "SET_FEATURES to a closed socket fails"
    );
    fs.backend_gone();
    assert_eq!(fs.counters().backend_disconnects, 1);
    fs.reset();
    fs.apply_pending();
}

#[test]
fn bad_settings_and_missing_sockets_are_errors() {
    let long = FsConfig {
        tag: "x".repeat(MAX_TAG_LEN + 1),
        ..config("/nonexistent".into())
    };
    assert!(matches!(Fs::new(&long), Err(FsError::Tag(_))));
    let queues = FsConfig {
        num_request_queues: 0,
        ..config("/nonexistent".into())
    };
    assert!(matches!(Fs::new(&queues), Err(FsError::Queues(_))));
    let size = FsConfig {
        queue_size: 100,
        ..config("/nonexistent".into())
    };
    assert!(matches!(Fs::new(&size), Err(FsError::Queues(_))));
    let started = Instant::now();
    let missing = connect(
        Path::new("/nonexistent/fs.sock"),
        2,
        Duration::from_millis(100),
    );
    assert!(matches!(missing, Err(FsError::Connect { .. })));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_backend_without_version_1_is_refused() {
    let (socket, _rx) = fake_backend(PROTOCOL_FEATURES, 100);
    assert!(matches!(
        Fs::new(&config(socket)),
        Err(FsError::Unsupported(_))
    ));
}
