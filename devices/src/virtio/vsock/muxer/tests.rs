//! The muxer against real Unix sockets, with guest packets as plain byte buffers.

use std::io::{Cursor, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::vsock::connection::CONNECT_TIMEOUT;
use crate::virtio::vsock::packet::{SHUTDOWN_BOTH, SHUTDOWN_SEND};
use crate::virtio::vsock::test_support::{guest_header as header, socket_dir, TempDir, GUEST_CID};

/// A guest tx buffer.
struct Packet(Cursor<Vec<u8>>);

impl Read for Packet {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl ReadPacket for Packet {
    fn available(&self) -> usize {
        self.0.get_ref().len() - self.0.position() as usize
    }
    fn as_read(&mut self) -> &mut dyn Read {
        self
    }
}

/// A guest rx buffer of a fixed size.
struct RxBuf {
    data: Vec<u8>,
    cap: usize,
}

impl Write for RxBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.cap - self.data.len());
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WritePacket for RxBuf {
    fn available(&self) -> usize {
        self.cap - self.data.len()
    }
}

struct Fixture {
    muxer: Muxer,
    path: PathBuf,
    _dir: TempDir,
}

fn fixture(test: &str) -> Fixture {
    let (path, dir) = socket_dir(&format!("mux-{test}"));
    let listener = UnixListener::bind(&path).unwrap();
    Fixture {
        muxer: Muxer::new(GUEST_CID, listener, path.clone()).unwrap(),
        path,
        _dir: dir,
    }
}

fn send(muxer: &mut Muxer, hdr: PacketHeader, payload: &[u8]) {
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    muxer.handle_guest_packet(&mut Packet(Cursor::new(bytes)), Instant::now());
}

/// The next packet for the guest, with its payload.
fn recv(muxer: &mut Muxer) -> Option<(PacketHeader, Vec<u8>)> {
    let mut buf = RxBuf {
        data: Vec::new(),
        cap: HEADER_LEN + 4096,
    };
    match muxer.fill_rx(&mut buf) {
        RxFill::Nothing => None,
        RxFill::Used(len) => {
            assert_eq!(len as usize, buf.data.len());
            let raw: [u8; HEADER_LEN] = buf.data[..HEADER_LEN].try_into().unwrap();
            Some((
                PacketHeader::from_bytes(&raw),
                buf.data[HEADER_LEN..].to_vec(),
            ))
        }
    }
}

/// Runs the muxer's host side until `cond` holds (events are delivered asynchronously only in
/// the sense that epoll reports them; a few rounds always suffice).
fn pump(muxer: &mut Muxer) {
    for _ in 0..3 {
        muxer.process_host_events(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A host client connected through `CONNECT port`, accepted by the guest.
fn host_connect(f: &mut Fixture, port: u32) -> (UnixStream, PacketHeader) {
    let mut client = UnixStream::connect(&f.path).unwrap();
    client
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    pump(&mut f.muxer);
    let (req, _) = recv(&mut f.muxer).expect("a REQUEST for the guest");
    assert_eq!(req.op, Op::Request);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, port)
    );
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    send(
        &mut f.muxer,
        header(Op::Response, port, req.src_port, 0),
        &[],
    );
    let mut line = [0u8; 32];
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = client.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {}\n", req.src_port).as_bytes());
    (client, req)
}

#[test]
fn host_initiated_stream_carries_bytes_both_ways() {
    let mut f = fixture("host-init");
    let (mut client, req) = host_connect(&mut f, 52);
    assert_eq!(f.muxer.counters().host_connections, 1);

    client.write_all(b"ping").unwrap();
    pump(&mut f.muxer);
    let (rw, data) = recv(&mut f.muxer).expect("data for the guest");
    assert_eq!(rw.op, Op::Rw);
    assert_eq!((rw.src_port, rw.dst_port), (req.src_port, 52));
    assert_eq!(data, b"ping");
    assert!(recv(&mut f.muxer).is_none());

    send(&mut f.muxer, header(Op::Rw, 52, req.src_port, 4), b"pong");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(f.muxer.counters().rx_bytes, 4);
    assert_eq!(f.muxer.counters().tx_bytes, 4);

    // The guest closes: RST back, and the client sees EOF.
    let mut shut = header(Op::Shutdown, 52, req.src_port, 0);
    shut.flags = SHUTDOWN_BOTH;
    send(&mut f.muxer, shut, &[]);
    let (rst, _) = recv(&mut f.muxer).unwrap();
    assert_eq!(rst.op, Op::Rst);
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(f.muxer.connection_count(), 0);
}

#[test]
fn bytes_sent_right_after_the_connect_line_are_not_lost() {
    let mut f = fixture("pipelined");
    let mut client = UnixStream::connect(&f.path).unwrap();
    client.write_all(b"CONNECT 9\nearly bytes").unwrap();
    pump(&mut f.muxer);
    let (req, _) = recv(&mut f.muxer).unwrap();
    send(&mut f.muxer, header(Op::Response, 9, req.src_port, 0), &[]);
    let (rw, data) = recv(&mut f.muxer).expect("the early bytes");
    assert_eq!(rw.op, Op::Rw);
    assert_eq!(data, b"early bytes");
}

#[test]
fn bad_connect_lines_are_refused_and_the_listener_carries_on() {
    let mut f = fixture("bad-lines");
    for line in [
        &b"CONNECT\n"[..],
        b"CONNECT -1\n",
        b"CONNECT 99999999999\n",
        b"connect 5\n",
        b"CONNECT 5 6\n",
        b"CONNECT 0x10\n",
    ] {
        let mut client = UnixStream::connect(&f.path).unwrap();
        client.write_all(line).unwrap();
        pump(&mut f.muxer);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert!(reply.starts_with(b"ERROR"), "{line:?}");
    }
    // A line that never ends: refused once it is too long.
    let mut client = UnixStream::connect(&f.path).unwrap();
    client.write_all(&[b'C'; MAX_CONNECT_LINE + 1]).unwrap();
    pump(&mut f.muxer);
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert!(reply.is_empty());
    assert_eq!(f.muxer.counters().host_connect_failures, 7);
    assert!(!f.muxer.has_rx());
    // A good client still gets through.
    let _ = host_connect(&mut f, 7);
}

#[test]
fn a_silent_client_is_dropped_after_the_timeout() {
    let mut f = fixture("silent");
    let mut client = UnixStream::connect(&f.path).unwrap();
    client.write_all(b"CONN").unwrap();
    pump(&mut f.muxer);
    f.muxer.sweep(Instant::now());
    client.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 8];
    assert!(
        client.read(&mut buf).is_err(),
        "still open before the deadline"
    );
    f.muxer
        .sweep(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1));
    client.set_nonblocking(false).unwrap();
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(f.muxer.counters().host_connect_failures, 1);
}

#[test]
fn guest_refusal_or_silence_closes_the_client() {
    let mut f = fixture("refused");
    let mut client = UnixStream::connect(&f.path).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    pump(&mut f.muxer);
    let (req, _) = recv(&mut f.muxer).unwrap();
    send(&mut f.muxer, header(Op::Rst, 1, req.src_port, 0), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert!(recv(&mut f.muxer).is_none(), "no RST answers an RST");

    let mut client = UnixStream::connect(&f.path).unwrap();
    client.write_all(b"CONNECT 2\n").unwrap();
    pump(&mut f.muxer);
    let (req, _) = recv(&mut f.muxer).unwrap();
    f.muxer
        .sweep(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1));
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    let (rst, _) = recv(&mut f.muxer).expect("the guest is told");
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (Op::Rst, req.src_port, 2)
    );
    assert_eq!(f.muxer.counters().host_connect_failures, 2);
}

#[test]
fn guest_initiated_stream_reaches_the_port_socket() {
    let mut f = fixture("guest-init");
    let mut port_path = f.path.clone().into_os_string();
    port_path.push("_1234");
    let listener = UnixListener::bind(&port_path).unwrap();

    send(&mut f.muxer, header(Op::Request, 5000, 1234, 0), &[]);
    let (resp, _) = recv(&mut f.muxer).unwrap();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (Op::Response, 1234, 5000)
    );
    let (mut host, _) = listener.accept().unwrap();
    send(&mut f.muxer, header(Op::Rw, 5000, 1234, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    // The guest half-closes: the host reads EOF and can still answer.
    let mut shut = header(Op::Shutdown, 5000, 1234, 0);
    shut.flags = SHUTDOWN_SEND;
    send(&mut f.muxer, shut, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    host.write_all(b"bye").unwrap();
    drop(host);
    pump(&mut f.muxer);
    let (rw, data) = recv(&mut f.muxer).unwrap();
    assert_eq!((rw.op, data.as_slice()), (Op::Rw, &b"bye"[..]));
    // EOF after both directions are done: the connection ends with an RST.
    let (rst, _) = recv(&mut f.muxer).unwrap();
    assert_eq!(rst.op, Op::Rst);
    assert_eq!(f.muxer.connection_count(), 0);
    assert_eq!(f.muxer.counters().guest_connections, 1);

    // Nobody listens on port 99: refused.
    send(&mut f.muxer, header(Op::Request, 5001, 99, 0), &[]);
    let (rst, _) = recv(&mut f.muxer).unwrap();
    assert_eq!((rst.op, rst.dst_port), (Op::Rst, 5001));
    assert_eq!(f.muxer.counters().guest_connect_failures, 1);
}

#[test]
fn hostile_packets_are_refused_without_harm() {
    let mut f = fixture("hostile");
    let (mut client, req) = host_connect(&mut f, 52);

    // Shorter than a header: logged, nothing answered.
    f.muxer
        .handle_guest_packet(&mut Packet(Cursor::new(vec![0u8; 10])), Instant::now());
    assert!(recv(&mut f.muxer).is_none());

    // Spoofed source CID: ignored, even if it names the connection.
    let mut spoofed = header(Op::Rst, 52, req.src_port, 0);
    spoofed.src_cid = 7;
    send(&mut f.muxer, spoofed, &[]);
    assert!(recv(&mut f.muxer).is_none());
    assert_eq!(f.muxer.connection_count(), 1);

    // Another VM's CID, another socket type, an unknown op: refused with RST.
    let mut other_vm = header(Op::Request, 1, 2, 0);
    other_vm.dst_cid = 9;
    send(&mut f.muxer, other_vm, &[]);
    let mut seqpacket = header(Op::Request, 1, 3, 0);
    seqpacket.type_ = 2;
    send(&mut f.muxer, seqpacket, &[]);
    send(&mut f.muxer, header(Op::Unknown(77), 1, 4, 0), &[]);
    for port in [2, 3, 4] {
        let (rst, _) = recv(&mut f.muxer).unwrap();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (Op::Rst, port, 1));
    }

    // A payload length past the chain, or past 64 KiB, resets the connection it names.
    let (mut client2, req2) = host_connect(&mut f, 53);
    send(
        &mut f.muxer,
        header(Op::Rw, 53, req2.src_port, 100),
        b"short",
    );
    let (rst, _) = recv(&mut f.muxer).unwrap();
    assert_eq!((rst.op, rst.dst_port), (Op::Rst, 53));
    let mut buf = [0u8; 4];
    assert_eq!(client2.read(&mut buf).unwrap(), 0);
    let big = vec![0u8; MAX_PAYLOAD + 1];
    send(&mut f.muxer, header(Op::Rw, 1, 2, big.len() as u32), &big);
    assert_eq!(recv(&mut f.muxer).unwrap().0.op, Op::Rst);

    // The first connection is untouched.
    send(&mut f.muxer, header(Op::Rw, 52, req.src_port, 2), b"ok");
    client.read_exact(&mut buf[..2]).unwrap();
    assert_eq!(&buf[..2], b"ok");
    assert!(f.muxer.guest_errors() >= 3);
}

#[test]
fn rsts_waiting_for_buffers_are_bounded() {
    let mut f = fixture("rst-flood");
    for port in 0..(MAX_PENDING_RESETS as u32 + 100) {
        send(&mut f.muxer, header(Op::Rw, port, 1, 0), &[]);
    }
    assert_eq!(f.muxer.counters().resets_dropped, 100);
    let mut sent = 0;
    while recv(&mut f.muxer).is_some() {
        sent += 1;
    }
    assert_eq!(sent, MAX_PENDING_RESETS);
}

#[test]
fn rx_buffers_too_small_for_a_header_are_returned_empty() {
    let mut f = fixture("small-rx");
    send(&mut f.muxer, header(Op::Rw, 1, 2, 0), &[]);
    let mut tiny = RxBuf {
        data: Vec::new(),
        cap: 8,
    };
    assert_eq!(f.muxer.fill_rx(&mut tiny), RxFill::Used(0));
    // The RST is still there for a proper buffer.
    assert_eq!(recv(&mut f.muxer).unwrap().0.op, Op::Rst);
}

#[test]
fn many_connections_share_rx_buffers_fairly() {
    let mut f = fixture("fair");
    let mut clients = Vec::new();
    for port in 0..8 {
        clients.push(host_connect(&mut f, 100 + port));
    }
    for (client, _) in clients.iter_mut() {
        client.write_all(&[1u8; 10_000]).unwrap();
    }
    pump(&mut f.muxer);
    // 4 KiB buffers: each connection gets one packet before any gets a second.
    let mut first_round = std::collections::HashSet::new();
    for _ in 0..8 {
        let (rw, data) = recv(&mut f.muxer).unwrap();
        assert_eq!(data.len(), 4096);
        first_round.insert(rw.dst_port);
    }
    assert_eq!(first_round.len(), 8);
    let mut total = 8 * 4096;
    while let Some((_, data)) = recv(&mut f.muxer) {
        total += data.len();
    }
    assert_eq!(total, 8 * 10_000);
}

#[test]
fn device_reset_closes_every_stream() {
    let mut f = fixture("reset");
    let (mut client, _) = host_connect(&mut f, 52);
    f.muxer.reset();
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(f.muxer.connection_count(), 0);
    assert!(!f.muxer.has_rx());
}

#[test]
fn header_only_rx_buffers_never_fake_an_eof() {
    let mut f = fixture("header-only");
    let (mut client, req) = host_connect(&mut f, 52);
    client.write_all(b"data").unwrap();
    pump(&mut f.muxer);
    let mut exact = RxBuf {
        data: Vec::new(),
        cap: HEADER_LEN,
    };
    assert_eq!(f.muxer.fill_rx(&mut exact), RxFill::Used(0));
    let (rw, data) = recv(&mut f.muxer).expect("the data, in a proper buffer");
    assert_eq!(
        (rw.op, rw.dst_port, data.as_slice()),
        (Op::Rw, 52, &b"data"[..])
    );
    assert_eq!(rw.src_port, req.src_port);
}

#[test]
fn a_full_host_backlog_refuses_at_once_instead_of_blocking() {
    let mut f = fixture("backlog");
    let mut port_path = f.path.clone().into_os_string();
    port_path.push("_77");
    let listener =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&socket2::SockAddr::unix(&port_path).unwrap())
        .unwrap();
    listener.listen(0).unwrap();
    // Fill the backlog with clients nobody accepts.
    let mut fillers = Vec::new();
    loop {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        if s.connect(&socket2::SockAddr::unix(&port_path).unwrap())
            .is_err()
        {
            break;
        }
        fillers.push(s);
        assert!(fillers.len() < 64, "the backlog never filled");
    }
    let start = Instant::now();
    send(&mut f.muxer, header(Op::Request, 9, 77, 0), &[]);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the connect blocked"
    );
    let (rst, _) = recv(&mut f.muxer).unwrap();
    assert_eq!((rst.op, rst.dst_port), (Op::Rst, 9));
    assert_eq!(f.muxer.counters().guest_connect_failures, 1);
}

#[test]
fn connection_churn_without_rx_buffers_leaves_no_stale_work() {
    let mut f = fixture("churn");
    let mut port_path = f.path.clone().into_os_string();
    port_path.push("_88");
    let listener = UnixListener::bind(&port_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    for _ in 0..2000 {
        send(&mut f.muxer, header(Op::Request, 9, 88, 0), &[]);
        send(&mut f.muxer, header(Op::Rst, 9, 88, 0), &[]);
        while listener.accept().is_ok() {}
    }
    assert_eq!(f.muxer.connection_count(), 0);
    assert!(!f.muxer.has_rx(), "nothing is left to send");
}

#[test]
fn a_client_half_close_before_the_guest_answers_is_not_a_reset() {
    let mut f = fixture("half-close");
    let mut client = UnixStream::connect(&f.path).unwrap();
    client.write_all(b"CONNECT 52\nrequest").unwrap();
    pump(&mut f.muxer);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    pump(&mut f.muxer);
    let (req, _) = recv(&mut f.muxer).unwrap();
    assert_eq!(req.op, Op::Request);
    send(&mut f.muxer, header(Op::Response, 52, req.src_port, 0), &[]);
    let mut line = [0u8; 32];
    let n = client.read(&mut line).unwrap();
    assert!(line[..n].starts_with(b"OK "));
    // The bytes, then the half-close as SHUTDOWN(SEND).
    let (rw, data) = recv(&mut f.muxer).unwrap();
    assert_eq!((rw.op, data.as_slice()), (Op::Rw, &b"request"[..]));
    let (shut, _) = recv(&mut f.muxer).unwrap();
    assert_eq!((shut.op, shut.flags), (Op::Shutdown, SHUTDOWN_SEND));
    // The guest can still answer.
    send(&mut f.muxer, header(Op::Rw, 52, req.src_port, 5), b"reply");
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"reply");
}

#[test]
fn silent_host_clients_cannot_starve_guest_connections() {
    let mut f = fixture("handshake-cap");
    let mut silent = Vec::new();
    for _ in 0..MAX_HANDSHAKES + 5 {
        silent.push(UnixStream::connect(&f.path).unwrap());
    }
    pump(&mut f.muxer);
    assert_eq!(f.muxer.counters().host_connect_failures, 5);
    let mut port_path = f.path.clone().into_os_string();
    port_path.push("_99");
    let _listener = UnixListener::bind(&port_path).unwrap();
    send(&mut f.muxer, header(Op::Request, 9, 99, 0), &[]);
    assert_eq!(recv(&mut f.muxer).unwrap().0.op, Op::Response);
}

#[test]
fn a_connection_reset_is_never_dropped() {
    let mut f = fixture("conn-rst");
    let (_client, req) = host_connect(&mut f, 52);
    // Fill the stray-RST queue.
    for port in 0..MAX_PENDING_RESETS as u32 + 10 {
        send(&mut f.muxer, header(Op::Rw, port + 10_000, 1, 0), &[]);
    }
    // A packet past the connection's credit resets it; its RST still goes out, first.
    let big = vec![0u8; 1024];
    let mut hdr = header(Op::Rw, 52, req.src_port, big.len() as u32);
    hdr.op = Op::Response;
    send(&mut f.muxer, hdr, &big);
    let (rst, _) = recv(&mut f.muxer).unwrap();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (Op::Rst, req.src_port, 52)
    );
}
