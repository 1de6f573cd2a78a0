//! The host side of the vsock device: Firecracker's hybrid vsock over Unix sockets.
//!
//! - Host-initiated: a host client connects to the listening socket at `uds_path` and writes
//!   `CONNECT <port>\n`; the muxer asks the guest (REQUEST) and, once the guest listener
//!   accepts (RESPONSE), answers `OK <local_port>\n` and the stream carries bytes both ways.
//! - Guest-initiated: a guest REQUEST to host port `P` connects to the Unix socket
//!   `<uds_path>_<P>`; RESPONSE if that works, RST if not.
//!
//! Every host stream is non-blocking and watched edge-triggered on the muxer's own epoll fd,
//! which the device's event loop watches in turn. Connections with something to send the guest
//! wait on a ready list (each at most once), served round-robin one packet per guest rx buffer.
//!
//! Bounds, whatever the guest or a host peer does:
//! - at most [`MAX_CONNECTIONS`] connections (counting ended ones whose RST the guest has not
//!   been given yet) and [`MAX_HANDSHAKES`] host clients still sending their CONNECT line; more
//!   are refused, so host clients that never finish a line cannot starve guest connections;
//! - the muxer never blocks: guest-initiated connects are non-blocking (a host listener with a
//!   full backlog is a refused connection), and when the process runs out of file descriptors
//!   the listener is paused and retried once a second rather than reported ready forever;
//! - each connection holds at most [`BUF_ALLOC`](super::BUF_ALLOC) buffered bytes (see `connection.rs`);
//! - a handshake line is at most [`MAX_CONNECT_LINE`] bytes and must arrive within
//!   [`CONNECT_TIMEOUT`]; a host-initiated connection the guest never answers is dropped after
//!   [`CONNECT_TIMEOUT`];
//! - at most [`MAX_PENDING_RESETS`] RSTs wait for guest buffers; later ones are dropped (the guest
//!   then sees its connect time out instead of being refused).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, DataRead, RxWork, State, Verdict, CONNECT_TIMEOUT};
use super::packet::{Op, PacketHeader, HEADER_LEN, HOST_CID, TYPE_STREAM};
use crate::virtio::guest_errors::GuestErrorLog;

/// Most connections at once (including ended ones whose RST is still queued).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients at once that have not finished their CONNECT line.
pub const MAX_HANDSHAKES: usize = 128;
/// Longest `CONNECT <port>\n` line accepted (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_CONNECT_LINE: usize = 32;
/// Most RSTs answering stray guest packets (no connection) waiting for guest rx buffers; the
/// RSTs of real connections are queued apart and never dropped.
pub const MAX_PENDING_RESETS: usize = 1024;
/// Largest payload of one packet, in either direction (Linux never sends more than 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// First port handed out to host-initiated connections (as Firecracker: above the ports guests
/// usually listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How often deadlines are checked while any are pending.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// Host events handled per wake-up; more wake the loop again (the muxer's epoll fd stays
/// readable).
const EVENTS_PER_WAKE: usize = 64;

/// Identifies a connection: the host side's port and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host side port (the `OK` port for host-initiated streams, `P` for guest-initiated).
    pub local_port: u32,
    /// Guest side port.
    pub peer_port: u32,
}

/// Why a guest packet was not accepted (logged through [`GuestErrorLog`]).
#[derive(Debug, thiserror::Error)]
enum PacketError {
    #[error("packet shorter than its {HEADER_LEN}-byte header ({0} bytes)")]
    Short(usize),
    #[error("{0}: payload longer than the chain or than {MAX_PAYLOAD} bytes")]
    BadLength(PacketHeader),
    #[error("{hdr}: source cid is not the guest's ({guest_cid})")]
    WrongSourceCid { hdr: PacketHeader, guest_cid: u64 },
    #[error("rx buffer of {0} bytes is too small for the packet waiting")]
    RxBufferTooSmall(usize),
}

/// Counters, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    /// Host-initiated connections the guest accepted.
    pub host_connections: u64,
    /// Guest-initiated connections delivered to a host listener.
    pub guest_connections: u64,
    /// Guest connections to host ports nobody listens on.
    pub guest_connect_failures: u64,
    /// Host clients dropped before their connection was set up (bad or slow CONNECT line,
    /// refused or unanswered by the guest, too many connections).
    pub host_connect_failures: u64,
    /// Bytes sent to the guest.
    pub rx_bytes: u64,
    /// Bytes received from the guest.
    pub tx_bytes: u64,
    /// RSTs sent to the guest.
    pub resets_sent: u64,
    /// RSTs to stray packets dropped because [`MAX_PENDING_RESETS`] were already waiting.
    pub resets_dropped: u64,
}

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// How a handshake read ended.
enum HandshakeStep {
    /// Needs more bytes.
    Wait,
    /// A valid line for this guest port.
    Connect(u32),
    /// Garbage, too long, or the client left.
    Refuse,
}

/// What [`Muxer::fill_rx`] put in a guest rx buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxFill {
    /// A packet of this many bytes (0: the buffer was unusable and is returned empty).
    Used(u32),
    /// Nothing to send: leave the buffer for later.
    Nothing,
}

/// The connection table and the host sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    ready: VecDeque<ConnKey>,
    /// RSTs of connections that ended; each still counts against [`MAX_CONNECTIONS`].
    conn_resets: VecDeque<PacketHeader>,
    /// RSTs answering packets that named no connection.
    resets: VecDeque<PacketHeader>,
    /// The listener is out of the epoll set after EMFILE/ENFILE, until the next sweep.
    listener_paused: bool,
    next_local_port: u32,
    sweep_timer: TimerFd,
    sweep_armed: bool,
    scratch: Box<[u8]>,
    counters: VsockCounters,
    errors: GuestErrorLog,
    log_name: String,
}

impl Muxer {
    /// Serves `listener` (already bound at `uds_path`) for the guest `guest_cid`.
    pub fn new(guest_cid: u64, listener: UnixListener, uds_path: PathBuf) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
        )?;
        Ok(Self {
            guest_cid,
            log_name: format!("virtio-vsock {}", uds_path.display()),
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            ready: VecDeque::new(),
            conn_resets: VecDeque::new(),
            resets: VecDeque::new(),
            listener_paused: false,
            next_local_port: FIRST_LOCAL_PORT,
            sweep_timer: TimerFd::new().map_err(io::Error::from)?,
            sweep_armed: false,
            scratch: vec![0u8; MAX_PAYLOAD].into_boxed_slice(),
            counters: VsockCounters::default(),
            errors: GuestErrorLog::default(),
        })
    }

    /// The fd that polls readable when a host socket has an event.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The fd that polls readable when deadlines must be checked ([`Self::sweep`]).
    pub fn sweep_fd(&self) -> RawFd {
        self.sweep_timer.as_raw_fd()
    }

    /// The counters so far.
    pub fn counters(&self) -> VsockCounters {
        self.counters
    }

    /// Malformed packets the guest sent.
    pub fn guest_errors(&self) -> u64 {
        self.errors.count()
    }

    /// Connections open (connected or waiting for the guest), not counting handshakes.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// True if a packet is waiting for a guest rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.conn_resets.is_empty() || !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Connection slots in use: open connections and ended ones with an RST still queued.
    fn connection_slots(&self) -> usize {
        self.conns.len() + self.conn_resets.len()
    }

    /// Forgets every connection (device reset): host streams are closed, nothing is sent.
    pub fn reset(&mut self) {
        for (fd, _) in self.by_fd.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        for (fd, _) in self.handshakes.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.conns.clear();
        self.ready.clear();
        self.conn_resets.clear();
        self.resets.clear();
    }

    /// Handles what the host sockets reported: new clients, handshake bytes, stream readiness.
    pub fn process_host_events(&mut self, now: Instant) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::error!("{}: waiting for host socket events: {e}", self.log_name);
                return;
            }
        };
        for event in &events[..n] {
            let fd = event.data() as RawFd;
            let set = event.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept_clients(now);
            } else if self.handshakes.contains_key(&fd) {
                self.advance_handshake(fd, now);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                self.stream_event(key, set, now);
            }
        }
    }

    fn accept_clients(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of fds: the pending client stays in the backlog. Leaving the
                    // level-triggered listener armed would report it ready forever.
                    log::warn!(
                        "{}: accepting a host client: {e}; pausing the listener",
                        self.log_name
                    );
                    self.pause_listener();
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and the like: this client is lost, the listener is not.
                    log::warn!("{}: accepting a host client: {e}", self.log_name);
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                self.counters.host_connect_failures += 1;
                continue;
            }
            let fd = stream.as_raw_fd();
            if stream.set_nonblocking(true).is_err() || self.watch(fd).is_err() {
                self.counters.host_connect_failures += 1;
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: now + CONNECT_TIMEOUT,
                },
            );
            self.arm_sweep();
            // The client may have written its line before the edge was armed.
            self.advance_handshake(fd, now);
        }
    }

    fn pause_listener(&mut self) {
        if !self.listener_paused {
            self.unwatch(self.listener.as_raw_fd());
            self.listener_paused = true;
            self.arm_sweep();
        }
    }

    fn resume_listener(&mut self) {
        let fd = self.listener.as_raw_fd();
        let watched = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        );
        if watched.is_ok() {
            self.listener_paused = false;
        }
    }

    fn watch(&self, fd: RawFd) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        )
    }

    fn unwatch(&self, fd: RawFd) {
        // Closing the fd would remove it too; deleting first keeps the interest list exact.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn advance_handshake(&mut self, fd: RawFd, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match read_connect_line(hs) {
            HandshakeStep::Wait => {}
            HandshakeStep::Refuse => {
                self.drop_handshake(fd);
            }
            HandshakeStep::Connect(peer_port) => {
                if self.connection_slots() >= MAX_CONNECTIONS {
                    self.drop_handshake(fd);
                    return;
                }
                let Some(hs) = self.handshakes.remove(&fd) else {
                    return;
                };
                let local_port = self.allocate_local_port(peer_port);
                let key = ConnKey {
                    local_port,
                    peer_port,
                };
                self.conns.insert(
                    key,
                    Connection::new_local(hs.stream, local_port, peer_port, now),
                );
                self.by_fd.insert(fd, key);
                self.mark_ready(key);
            }
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            self.unwatch(fd);
            self.counters.host_connect_failures += 1;
        }
    }

    /// A host port no open connection to `peer_port` uses.
    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            // At most MAX_CONNECTIONS keys exist, so a free port is found within that many steps.
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    fn stream_event(&mut self, key: ConnKey, set: EventSet, now: Instant) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut verdict = Verdict::Keep;
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            verdict = conn.on_host_hangup();
        } else if set.intersects(EventSet::READ_HANG_UP) {
            // Only the client's write side is closed (a half-close): its EOF is read later.
            conn.on_host_readable();
        }
        if verdict == Verdict::Keep && set.intersects(EventSet::IN) {
            conn.on_host_readable();
        }
        if verdict == Verdict::Keep
            && set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
            && conn.buffered() > 0
        {
            verdict = conn.on_host_writable(now);
        }
        self.apply(key, verdict);
    }

    /// Acts on a connection's verdict: keeps it (queueing what it wants to send), or ends it.
    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {
                if self
                    .conns
                    .get(&key)
                    .and_then(Connection::deadline)
                    .is_some()
                {
                    self.arm_sweep();
                }
                self.mark_ready(key);
            }
            Verdict::Reset => {
                if let Some(mut conn) = self.remove(key) {
                    // A guest that never got the REQUEST has nothing to tear down.
                    if conn.guest_knows() {
                        let hdr = conn.header(self.guest_cid, HOST_CID, Op::Rst, 0, 0);
                        self.conn_resets.push_back(hdr);
                    }
                }
            }
            Verdict::Drop => {
                self.remove(key);
            }
        }
    }

    /// Forgets the connection and closes its host stream; one ended before the guest accepted
    /// it counts as a failed host connect.
    fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        if matches!(conn.state(), State::LocalInit { .. }) {
            self.counters.host_connect_failures += 1;
        }
        let fd = conn.stream().as_raw_fd();
        self.by_fd.remove(&fd);
        self.unwatch(fd);
        if conn.in_ready {
            // A later connection with the same key would queue itself again, so a stale entry
            // must go now (the list is at most MAX_CONNECTIONS long).
            self.ready.retain(|k| *k != key);
        }
        Some(conn)
    }

    fn queue_reset(&mut self, hdr: PacketHeader) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(hdr);
        } else {
            self.counters.resets_dropped += 1;
        }
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_ready && conn.wants_rx() {
                conn.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Handles one packet the guest sent: `packet` reads the chain's readable bytes.
    pub fn handle_guest_packet(&mut self, packet: &mut dyn ReadPacket, now: Instant) {
        let available = packet.available();
        if available < HEADER_LEN {
            self.errors
                .record(&self.log_name, &PacketError::Short(available));
            return;
        }
        let mut raw = [0u8; HEADER_LEN];
        if packet.read_exact(&mut raw).is_err() {
            self.errors
                .record(&self.log_name, &PacketError::Short(available));
            return;
        }
        let hdr = PacketHeader::from_bytes(&raw);
        if hdr.src_cid != self.guest_cid {
            // Not from this guest's address: nothing to answer.
            let guest_cid = self.guest_cid;
            self.errors.record(
                &self.log_name,
                &PacketError::WrongSourceCid { hdr, guest_cid },
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let len = hdr.len as usize;
        if len > MAX_PAYLOAD || len > available - HEADER_LEN {
            self.errors
                .record(&self.log_name, &PacketError::BadLength(hdr));
            self.refuse(key, &hdr);
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            // Another VM, or a socket type this device does not offer: refused, like a port
            // nobody listens on.
            self.refuse(key, &hdr);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            if hdr.op == Op::Rw {
                self.counters.tx_bytes += hdr.len as u64;
            }
            let verdict = conn.on_guest_packet(&hdr, packet.as_read(), &mut self.scratch, now);
            if hdr.op == Op::Response && verdict == Verdict::Keep {
                self.counters.host_connections += 1;
            }
            self.apply(key, verdict);
            return;
        }
        match hdr.op {
            Op::Request => self.connect_to_host(key, &hdr),
            // Nothing to tear down.
            Op::Rst => {}
            _ => self.queue_reset(hdr.reply(Op::Rst)),
        }
    }

    /// Answers a bad packet: the connection it belongs to (if any) is reset, otherwise the
    /// packet's sender gets an RST.
    fn refuse(&mut self, key: ConnKey, hdr: &PacketHeader) {
        if self.conns.contains_key(&key) {
            self.apply(key, Verdict::Reset);
        } else if hdr.op != Op::Rst {
            self.queue_reset(hdr.reply(Op::Rst));
        }
    }

    /// A guest REQUEST: connects to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, hdr: &PacketHeader) {
        if self.connection_slots() >= MAX_CONNECTIONS {
            self.counters.guest_connect_failures += 1;
            self.queue_reset(hdr.reply(Op::Rst));
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = connect_nonblocking(std::path::Path::new(&path));
        let stream = match stream.and_then(|s| self.watch(s.as_raw_fd()).map(|()| s)) {
            Ok(s) => s,
            Err(_) => {
                self.counters.guest_connect_failures += 1;
                self.queue_reset(hdr.reply(Op::Rst));
                return;
            }
        };
        self.by_fd.insert(stream.as_raw_fd(), key);
        self.conns.insert(key, Connection::new_peer(stream, hdr));
        self.counters.guest_connections += 1;
        self.mark_ready(key);
    }

    /// Writes the next packet for the guest into `buf`, a guest rx buffer.
    pub fn fill_rx(&mut self, buf: &mut dyn WritePacket) -> RxFill {
        let room = buf.available();
        loop {
            if !self.has_rx() {
                return RxFill::Nothing;
            }
            if room < HEADER_LEN {
                self.errors
                    .record(&self.log_name, &PacketError::RxBufferTooSmall(room));
                return RxFill::Used(0);
            }
            if let Some(rst) = self
                .conn_resets
                .pop_front()
                .or_else(|| self.resets.pop_front())
            {
                self.counters.resets_sent += 1;
                return write_packet(buf, &rst, &[]);
            }
            let Some(key) = self.ready.pop_front() else {
                return RxFill::Nothing;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_ready = false;
            let (hdr, payload_len) = match conn.next_rx() {
                None => continue,
                Some(RxWork::Control { op, flags }) => {
                    (conn.header(self.guest_cid, HOST_CID, op, flags, 0), 0)
                }
                Some(RxWork::Data { max }) => {
                    let n = (room - HEADER_LEN)
                        .min(max as usize)
                        .min(self.scratch.len());
                    if n == 0 {
                        // A buffer with room for a header only: a zero-byte read would look
                        // like EOF, so it goes back empty and the data waits for the next one.
                        self.errors
                            .record(&self.log_name, &PacketError::RxBufferTooSmall(room));
                        self.mark_ready(key);
                        return RxFill::Used(0);
                    }
                    match conn.read_host(&mut self.scratch[..n]) {
                        DataRead::Bytes(n) => {
                            let hdr = conn.header(self.guest_cid, HOST_CID, Op::Rw, 0, n as u32);
                            (hdr, n)
                        }
                        DataRead::Nothing => {
                            self.mark_ready(key);
                            continue;
                        }
                        DataRead::Reset => {
                            self.apply(key, Verdict::Reset);
                            continue;
                        }
                    }
                }
            };
            let fill = write_packet(buf, &hdr, &self.scratch[..payload_len]);
            if fill == RxFill::Used(0) {
                // Guest memory refused the write: the stream lost bytes, so it cannot go on.
                self.apply(key, Verdict::Reset);
            } else {
                self.counters.rx_bytes += payload_len as u64;
                self.mark_ready(key);
            }
            return fill;
        }
    }

    /// Ends handshakes and connections whose deadline passed; stops the timer when none is left.
    pub fn sweep(&mut self, now: Instant) {
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| now >= hs.deadline)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            self.drop_handshake(fd);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expired(now))
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            self.apply(key, Verdict::Reset);
        }
        if self.listener_paused {
            self.resume_listener();
        }
        let waiting = self.listener_paused
            || !self.handshakes.is_empty()
            || self.conns.values().any(|c| c.deadline().is_some());
        if !waiting && self.sweep_armed {
            let _ = self.sweep_timer.clear();
            self.sweep_armed = false;
        }
    }

    /// Consumes the sweep timer's expirations; call only when its fd polled readable (the
    /// read blocks otherwise).
    pub fn consume_sweep_timer(&mut self) {
        let _ = self.sweep_timer.wait();
    }

    fn arm_sweep(&mut self) {
        if !self.sweep_armed
            && self
                .sweep_timer
                .reset(SWEEP_PERIOD, Some(SWEEP_PERIOD))
                .is_ok()
        {
            self.sweep_armed = true;
        }
    }
}

/// Connects to the Unix socket at `path` without ever blocking: a listener whose backlog is
/// full fails with `WouldBlock` at once instead of stalling the device thread (which serves
/// every device of the VM).
fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Reads the rest of a client's `CONNECT <port>\n` line, one byte at a time so that nothing
/// after the newline (early stream data) is taken out of the socket.
fn read_connect_line(hs: &mut Handshake) -> HandshakeStep {
    let mut byte = [0u8; 1];
    loop {
        match hs.stream.read(&mut byte) {
            Ok(0) => return HandshakeStep::Refuse,
            Ok(_) if byte[0] == b'\n' => {
                return match parse_connect_line(&hs.line) {
                    Some(port) => HandshakeStep::Connect(port),
                    None => {
                        // Tell a human at the other end why, best effort.
                        let _ = hs.stream.write(b"ERROR expected CONNECT <port>\n");
                        HandshakeStep::Refuse
                    }
                };
            }
            Ok(_) => {
                if hs.line.len() >= MAX_CONNECT_LINE {
                    return HandshakeStep::Refuse;
                }
                hs.line.push(byte[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HandshakeStep::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return HandshakeStep::Refuse,
        }
    }
}

/// Parses `CONNECT <port>` (without the newline): a decimal port, nothing else.
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn write_packet(buf: &mut dyn WritePacket, hdr: &PacketHeader, payload: &[u8]) -> RxFill {
    let len = HEADER_LEN + payload.len();
    let mut hdr = *hdr;
    hdr.len = payload.len() as u32;
    if buf.write_all(&hdr.to_bytes()).is_err() || buf.write_all(payload).is_err() {
        return RxFill::Used(0);
    }
    RxFill::Used(len as u32)
}

/// A guest tx buffer: its readable bytes.
pub trait ReadPacket: Read {
    /// Bytes left to read.
    fn available(&self) -> usize;
    /// As a plain reader.
    fn as_read(&mut self) -> &mut dyn Read;
}

/// A guest rx buffer: its writable bytes.
pub trait WritePacket: Write {
    /// Bytes left to write.
    fn available(&self) -> usize;
}

impl<B: vm_memory::bitmap::BitmapSlice> ReadPacket for virtio_queue::Reader<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
    fn as_read(&mut self) -> &mut dyn Read {
        self
    }
}

impl<B: vm_memory::bitmap::BitmapSlice> WritePacket for virtio_queue::Writer<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

#[cfg(test)]
mod tests;
