//! One vsock stream between a guest socket and a host Unix stream: its state machine and its
//! credit accounting (virtio 1.x, 5.10.6.3).
//!
//! Credit, in both directions:
//! - Guest → host: the device advertises [`BUF_ALLOC`] bytes of buffer and its `fwd_cnt` (bytes
//!   passed on to the host stream). Bytes the host stream cannot take yet wait in `tx_buf`;
//!   since the guest may only have `BUF_ALLOC - (its tx_cnt - fwd_cnt)` bytes in flight,
//!   `tx_buf` never holds more than [`BUF_ALLOC`] bytes, and a guest that sends past its credit
//!   has the connection reset.
//! - Host → guest: the device reads from the host stream only as many bytes as the guest
//!   advertised room for (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`), so nothing waits in the
//!   device: a guest that stops reading stops the host stream's reads, and the host's writes
//!   block in its own socket buffer.
//!
//! So a connection's memory is bounded by [`BUF_ALLOC`] whatever either peer does.
//!
//! Closing: a SHUTDOWN(SEND) from the guest becomes `shutdown(Write)` on the host stream once
//! `tx_buf` is flushed, and EOF from the host becomes a SHUTDOWN(SEND) to the guest. When both
//! directions are done, or the guest shuts down both, the connection ends with an RST to the
//! guest (after flushing, within [`CLOSE_TIMEOUT`]) and the host stream is closed.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{Op, PacketHeader, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer the device advertises per connection: the most guest → host bytes it ever
/// holds for one connection.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// After forwarding this many bytes to the host without telling the guest, the device sends a
/// CREDIT_UPDATE, so the guest never stalls on a stale view of the buffer.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// How long a host-initiated connection waits for the guest's RESPONSE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection the guest closed may take to flush its buffered bytes to the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent or queued, waiting for the guest's RESPONSE until the deadline.
    LocalInit { deadline: Instant },
    /// Data flows.
    Established,
    /// The guest shut both directions; flushing `tx_buf` to the host until the deadline.
    Closing { deadline: Instant },
}

/// What the owner must do with the connection after an event.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// End it: send the guest an RST and close the host stream.
    Reset,
    /// End it without telling the guest (it sent the RST).
    Drop,
}

/// What the connection has to send to the guest next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxWork {
    /// A packet without payload.
    Control { op: Op, flags: u32 },
    /// Stream data: at most this many bytes (the guest's free credit).
    Data { max: u32 },
}

/// The outcome of reading host data for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRead {
    /// This many bytes are in the buffer.
    Bytes(usize),
    /// Nothing to send after all (the stream would block, or it ended and a SHUTDOWN is queued).
    Nothing,
    /// The stream failed, or the connection is over: reset it.
    Reset,
}

/// Control packets waiting for a guest rx buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    /// SHUTDOWN flags to send (0: none).
    shutdown: u32,
    credit_update: bool,
    credit_request: bool,
}

/// A stream between guest port `peer_port` and the host side's `local_port`.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// The host stream may have bytes to read (an edge was seen and no read has hit
    /// `WouldBlock` since).
    host_readable: bool,
    /// The host stream returned EOF.
    host_eof: bool,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    /// `shutdown(Write)` was done on the host stream.
    host_write_shut: bool,
    /// Guest bytes the host stream has not taken yet; at most [`BUF_ALLOC`].
    tx_buf: VecDeque<u8>,
    /// Guest bytes passed to the host stream, ever (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// Host bytes sent to the guest, ever (wrapping).
    rx_cnt: u32,
    /// The guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed, ever (wrapping).
    peer_fwd_cnt: u32,
    pending: Pending,
    /// A CREDIT_REQUEST went out since the guest's credit last changed.
    credit_requested: bool,
    /// Queued on the owner's ready list (so it is queued at most once).
    pub in_ready: bool,
}

impl Connection {
    /// A host-initiated connection to guest port `peer_port`: sends a REQUEST first.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32, now: Instant) -> Self {
        let mut conn = Self::new(stream, local_port, peer_port);
        conn.state = State::LocalInit {
            deadline: now + CONNECT_TIMEOUT,
        };
        conn.pending.request = true;
        conn
    }

    /// A guest-initiated connection, accepted: sends a RESPONSE first. `request` is the guest's
    /// REQUEST, which carries its credit.
    pub fn new_peer(stream: UnixStream, request: &PacketHeader) -> Self {
        let mut conn = Self::new(stream, request.dst_port, request.src_port);
        conn.update_peer_credit(request);
        conn.pending.response = true;
        conn.host_readable = true;
        conn
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state: State::Established,
            host_readable: false,
            host_eof: false,
            peer_shutdown: 0,
            host_write_shut: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            pending: Pending::default(),
            credit_requested: false,
            in_ready: false,
        }
    }

    /// The host stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Guest bytes waiting for the host stream.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// When the connection must be given up on, if it is waiting for something.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::LocalInit { deadline } | State::Closing { deadline } => Some(deadline),
            State::Established => None,
        }
    }

    /// How many more bytes the guest has room for.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A guest claiming to have consumed more than was sent gets no extra credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// False while the guest has not been sent this connection's REQUEST: it has nothing to
    /// reset.
    pub fn guest_knows(&self) -> bool {
        !self.pending.request
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        if (hdr.buf_alloc, hdr.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            // Fresh credit answers any request still queued.
            self.credit_requested = false;
            self.pending.credit_request = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Handles a packet from the guest for this connection. `payload` yields the packet's
    /// payload (`hdr.len` bytes, already checked to fit `scratch`).
    pub fn on_guest_packet(
        &mut self,
        hdr: &PacketHeader,
        payload: &mut dyn Read,
        scratch: &mut [u8],
        now: Instant,
    ) -> Verdict {
        self.update_peer_credit(hdr);
        match hdr.op {
            Op::Response => match self.state {
                State::LocalInit { .. } => {
                    let ack = format!("OK {}\n", self.local_port);
                    // The stream is fresh: its send buffer is empty and takes a short line in
                    // one write. Anything else means the host client is gone.
                    match self.stream.write(ack.as_bytes()) {
                        Ok(n) if n == ack.len() => {
                            self.state = State::Established;
                            // Bytes the client sent after its CONNECT line are already waiting.
                            self.host_readable = true;
                            Verdict::Keep
                        }
                        _ => Verdict::Reset,
                    }
                }
                _ => Verdict::Reset,
            },
            Op::Rw => {
                if self.state != State::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return Verdict::Reset;
                }
                let len = hdr.len as usize;
                if self.tx_buf.len() + len > BUF_ALLOC as usize {
                    // The guest sent past the credit it was given.
                    return Verdict::Reset;
                }
                let Some(data) = scratch.get_mut(..len) else {
                    return Verdict::Reset;
                };
                if payload.read_exact(data).is_err() {
                    return Verdict::Reset;
                }
                self.send_to_host(len, scratch)
            }
            Op::Shutdown => {
                self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                self.after_shutdown(now)
            }
            Op::Rst => Verdict::Drop,
            Op::CreditUpdate => Verdict::Keep,
            Op::CreditRequest => {
                self.pending.credit_update = true;
                Verdict::Keep
            }
            // A REQUEST for a connection that exists, or an op nobody knows.
            Op::Request | Op::Unknown(_) => Verdict::Reset,
        }
    }

    /// Passes `scratch[..len]` on to the host stream, keeping what it cannot take now.
    fn send_to_host(&mut self, len: usize, scratch: &[u8]) -> Verdict {
        let data = &scratch[..len];
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match write_some(&mut self.stream, data) {
                Ok(n) => written = n,
                Err(_) => return Verdict::Reset,
            }
        }
        self.tx_buf.extend(&data[written..]);
        self.forwarded(written);
        Verdict::Keep
    }

    fn forwarded(&mut self, n: usize) {
        // fwd_cnt wraps by design (the spec's counters are free-running u32s).
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// The host stream can take bytes again: flushes `tx_buf`.
    pub fn on_host_writable(&mut self, now: Instant) -> Verdict {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.forwarded(n);
                }
                Err(_) => return Verdict::Reset,
            }
        }
        self.after_shutdown(now)
    }

    /// The host stream may have bytes (or EOF) to read.
    pub fn on_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host peer hung up. Before the guest accepted, nothing more can happen; otherwise the
    /// reads and writes that follow find out what is left.
    pub fn on_host_hangup(&mut self) -> Verdict {
        if let State::LocalInit { .. } = self.state {
            return Verdict::Reset;
        }
        self.host_readable = true;
        Verdict::Keep
    }

    /// Applies the SHUTDOWN flags received so far once the buffered bytes are flushed.
    fn after_shutdown(&mut self, now: Instant) -> Verdict {
        if self.peer_shutdown & SHUTDOWN_SEND == 0 {
            return Verdict::Keep;
        }
        if !self.tx_buf.is_empty() {
            if self.peer_shutdown == SHUTDOWN_BOTH && self.state == State::Established {
                self.state = State::Closing {
                    deadline: now + CLOSE_TIMEOUT,
                };
            }
            return Verdict::Keep;
        }
        if !self.host_write_shut {
            // The host may already have closed its end; nothing is lost either way.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.peer_shutdown == SHUTDOWN_BOTH || self.host_eof {
            // Both directions are done: the RST tells the guest the connection is gone.
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// True if the connection has a packet for the guest.
    pub fn wants_rx(&mut self) -> bool {
        self.next_rx().is_some()
    }

    /// What to send the guest next, if anything.
    pub fn next_rx(&mut self) -> Option<RxWork> {
        let control = |op, flags| Some(RxWork::Control { op, flags });
        if self.pending.request {
            return control(Op::Request, 0);
        }
        if self.pending.response {
            return control(Op::Response, 0);
        }
        if self.pending.shutdown != 0 {
            return control(Op::Shutdown, self.pending.shutdown);
        }
        // Credit only matters to a guest that still sends.
        let guest_sends = self.peer_shutdown & SHUTDOWN_SEND == 0;
        if self.pending.credit_update && guest_sends {
            return control(Op::CreditUpdate, 0);
        }
        let host_has_data = self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0;
        if host_has_data {
            let free = self.peer_free();
            if free > 0 {
                return Some(RxWork::Data { max: free });
            }
            if !self.credit_requested {
                self.pending.credit_request = true;
            }
        }
        if self.pending.credit_request {
            return control(Op::CreditRequest, 0);
        }
        None
    }

    /// The header for a packet to the guest, marking the control it carries as sent. Every
    /// packet carries the device's current credit, so no CREDIT_UPDATE is due after it.
    pub fn header(
        &mut self,
        guest_cid: u64,
        host_cid: u64,
        op: Op,
        flags: u32,
        len: u32,
    ) -> PacketHeader {
        match op {
            Op::Request => self.pending.request = false,
            Op::Response => self.pending.response = false,
            Op::Shutdown => self.pending.shutdown = 0,
            Op::CreditRequest => {
                self.pending.credit_request = false;
                self.credit_requested = true;
            }
            _ => {}
        }
        self.pending.credit_update = false;
        self.fwd_cnt_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: host_cid,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Reads host bytes for the guest into `buf` (sized by the caller to the guest's free credit
    /// and buffer room). The caller sends what was read as an RW packet.
    pub fn read_host(&mut self, buf: &mut [u8]) -> DataRead {
        loop {
            return match self.stream.read(buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.host_readable = false;
                    if self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() {
                        return DataRead::Reset;
                    }
                    self.pending.shutdown |= SHUTDOWN_SEND;
                    DataRead::Nothing
                }
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    DataRead::Bytes(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    DataRead::Nothing
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => DataRead::Reset,
            };
        }
    }

    /// True once the deadline of a waiting connection has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

/// Writes what the non-blocking `stream` takes now: `Ok(0)` when it would block.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        return match stream.write(data) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::HOST_CID;

    const GUEST_CID: u64 = 3;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn guest_hdr(op: Op, len: u32, flags: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn rw(conn: &mut Connection, data: &[u8]) -> Verdict {
        let mut scratch = vec![0u8; 64 * 1024];
        let hdr = guest_hdr(Op::Rw, data.len() as u32, 0);
        conn.on_guest_packet(&hdr, &mut &data[..], &mut scratch, Instant::now())
    }

    fn control(conn: &mut Connection, op: Op, flags: u32) -> Verdict {
        conn.on_guest_packet(
            &guest_hdr(op, 0, flags),
            &mut &[][..],
            &mut [],
            Instant::now(),
        )
    }

    fn established() -> (Connection, UnixStream) {
        let (ours, host) = pair();
        let mut conn = Connection::new_peer(ours, &guest_hdr(Op::Request, 0, 0));
        assert_eq!(
            conn.next_rx(),
            Some(RxWork::Control {
                op: Op::Response,
                flags: 0
            })
        );
        let hdr = conn.header(GUEST_CID, HOST_CID, Op::Response, 0, 0);
        assert_eq!((hdr.src_port, hdr.dst_port), (52, 1000));
        (conn, host)
    }

    #[test]
    fn host_initiated_handshake_acks_with_the_local_port() {
        let (ours, mut host) = pair();
        let now = Instant::now();
        let mut conn = Connection::new_local(ours, 1 << 30, 52, now);
        assert_eq!(
            conn.next_rx(),
            Some(RxWork::Control {
                op: Op::Request,
                flags: 0
            })
        );
        let hdr = conn.header(GUEST_CID, HOST_CID, Op::Request, 0, 0);
        assert_eq!(
            (hdr.src_port, hdr.dst_port, hdr.buf_alloc),
            (1 << 30, 52, BUF_ALLOC)
        );
        assert_eq!(conn.next_rx(), None);
        assert_eq!(conn.deadline(), Some(now + CONNECT_TIMEOUT));
        assert!(conn.expired(now + CONNECT_TIMEOUT));

        assert_eq!(control(&mut conn, Op::Response, 0), Verdict::Keep);
        assert_eq!(conn.state(), State::Established);
        let mut line = [0u8; 32];
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {}\n", 1u32 << 30).as_bytes());
        assert_eq!(conn.deadline(), None);
    }

    #[test]
    fn guest_refusal_and_out_of_state_packets() {
        let (ours, _host) = pair();
        let mut conn = Connection::new_local(ours, 7, 52, Instant::now());
        assert_eq!(control(&mut conn, Op::Rst, 0), Verdict::Drop);

        let (ours, _host) = pair();
        let mut conn = Connection::new_local(ours, 7, 52, Instant::now());
        // Data before the connection is accepted.
        assert_eq!(rw(&mut conn, b"early"), Verdict::Reset);

        let (mut conn, _host) = established();
        assert_eq!(control(&mut conn, Op::Response, 0), Verdict::Reset);
        let (mut conn, _host) = established();
        assert_eq!(control(&mut conn, Op::Request, 0), Verdict::Reset);
        let (mut conn, _host) = established();
        assert_eq!(control(&mut conn, Op::Unknown(42), 0), Verdict::Reset);
    }

    #[test]
    fn guest_data_reaches_the_host_and_is_credited() {
        let (mut conn, mut host) = established();
        assert_eq!(rw(&mut conn, b"hello"), Verdict::Keep);
        let mut buf = [0u8; 16];
        assert_eq!(host.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        let hdr = conn.header(GUEST_CID, HOST_CID, Op::CreditUpdate, 0, 0);
        assert_eq!(hdr.fwd_cnt, 5);
    }

    #[test]
    fn a_slow_host_buffers_at_most_buf_alloc_then_the_guest_is_reset() {
        let (mut conn, host) = established();
        let chunk = vec![0xabu8; 64 * 1024];
        let mut sent = 0usize;
        // Fill the host socket and then the connection's buffer, within credit.
        while sent + chunk.len() <= BUF_ALLOC as usize + 512 * 1024 {
            if conn.buffered() + chunk.len() > BUF_ALLOC as usize {
                break;
            }
            assert_eq!(rw(&mut conn, &chunk), Verdict::Keep);
            sent += chunk.len();
        }
        assert!(conn.buffered() > 0, "the host socket should have filled up");
        assert!(conn.buffered() <= BUF_ALLOC as usize);
        // One more chunk is past the advertised credit.
        assert_eq!(rw(&mut conn, &chunk), Verdict::Reset);

        // Had the guest waited: draining the host lets the buffer flush.
        let (mut conn, mut host2) = established();
        let mut total = 0usize;
        while conn.buffered() + chunk.len() <= BUF_ALLOC as usize {
            assert_eq!(rw(&mut conn, &chunk), Verdict::Keep);
            total += chunk.len();
        }
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        host2.set_nonblocking(true).unwrap();
        while got < total {
            match host2.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert_eq!(conn.on_host_writable(Instant::now()), Verdict::Keep);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, total);
        assert_eq!(conn.buffered(), 0);
        // Lots was forwarded: a credit update is due.
        assert_eq!(
            conn.next_rx(),
            Some(RxWork::Control {
                op: Op::CreditUpdate,
                flags: 0
            })
        );
        drop(host);
    }

    #[test]
    fn host_data_is_limited_by_guest_credit() {
        let (mut conn, mut host) = established();
        host.write_all(&[7u8; 100]).unwrap();
        conn.on_host_readable();
        // The guest advertised 64 KiB and has consumed nothing.
        assert_eq!(conn.next_rx(), Some(RxWork::Data { max: 64 * 1024 }));
        let mut buf = [0u8; 64];
        assert_eq!(conn.read_host(&mut buf), DataRead::Bytes(64));
        assert_eq!(conn.peer_free(), 64 * 1024 - 64);

        // The guest's buffer is full: no data, one CREDIT_REQUEST.
        let mut hdr = guest_hdr(Op::CreditUpdate, 0, 0);
        hdr.buf_alloc = 64;
        let _ = conn.on_guest_packet(&hdr, &mut &[][..], &mut [], Instant::now());
        assert_eq!(conn.peer_free(), 0);
        assert_eq!(
            conn.next_rx(),
            Some(RxWork::Control {
                op: Op::CreditRequest,
                flags: 0
            })
        );
        let _ = conn.header(GUEST_CID, HOST_CID, Op::CreditRequest, 0, 0);
        assert_eq!(conn.next_rx(), None);

        // A bogus fwd_cnt beyond what was sent gives no credit at all.
        hdr.fwd_cnt = 1_000_000;
        let _ = conn.on_guest_packet(&hdr, &mut &[][..], &mut [], Instant::now());
        assert_eq!(conn.peer_free(), 0);
        hdr.fwd_cnt = 64;
        let _ = conn.on_guest_packet(&hdr, &mut &[][..], &mut [], Instant::now());
        assert_eq!(conn.next_rx(), Some(RxWork::Data { max: 64 }));

        // Read until it would block: no more work.
        let mut big = [0u8; 64];
        assert_eq!(conn.read_host(&mut big), DataRead::Bytes(36));
        assert_eq!(conn.read_host(&mut big), DataRead::Nothing);
        assert_eq!(conn.next_rx(), None);
    }

    #[test]
    fn host_eof_becomes_shutdown_send_then_rst_when_both_done() {
        let (mut conn, host) = established();
        host.shutdown(Shutdown::Write).unwrap();
        conn.on_host_readable();
        let mut buf = [0u8; 16];
        assert_eq!(conn.read_host(&mut buf), DataRead::Nothing);
        assert_eq!(
            conn.next_rx(),
            Some(RxWork::Control {
                op: Op::Shutdown,
                flags: SHUTDOWN_SEND
            })
        );
        let _ = conn.header(GUEST_CID, HOST_CID, Op::Shutdown, SHUTDOWN_SEND, 0);
        // The guest can still send after the host's half-close.
        assert_eq!(rw(&mut conn, b"reply"), Verdict::Keep);
        // Its own SHUTDOWN(SEND) ends the connection.
        assert_eq!(
            control(&mut conn, Op::Shutdown, SHUTDOWN_SEND),
            Verdict::Reset
        );
    }

    #[test]
    fn guest_shutdown_send_half_closes_the_host_stream() {
        let (mut conn, mut host) = established();
        assert_eq!(rw(&mut conn, b"abc"), Verdict::Keep);
        assert_eq!(
            control(&mut conn, Op::Shutdown, SHUTDOWN_SEND),
            Verdict::Keep
        );
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abc");
        // Host → guest still works.
        host.write_all(b"back").unwrap();
        conn.on_host_readable();
        assert!(matches!(conn.next_rx(), Some(RxWork::Data { .. })));
        // Further data from the guest breaks its own shutdown.
        assert_eq!(rw(&mut conn, b"more"), Verdict::Reset);
    }

    #[test]
    fn guest_close_flushes_then_resets() {
        let (mut conn, mut host) = established();
        let chunk = vec![1u8; 64 * 1024];
        while conn.buffered() == 0 {
            assert_eq!(rw(&mut conn, &chunk), Verdict::Keep);
        }
        let now = Instant::now();
        assert_eq!(
            conn.on_guest_packet(
                &guest_hdr(Op::Shutdown, 0, SHUTDOWN_BOTH),
                &mut &[][..],
                &mut [],
                now
            ),
            Verdict::Keep
        );
        assert_eq!(
            conn.state(),
            State::Closing {
                deadline: now + CLOSE_TIMEOUT
            }
        );
        // No data goes to a guest that shut its receive side.
        host.write_all(b"ignored").unwrap();
        conn.on_host_readable();
        assert_eq!(conn.next_rx(), None);
        // Drain the host side; the flush then completes and the connection ends.
        host.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let verdict = loop {
            while host.read(&mut buf).is_ok() {}
            match conn.on_host_writable(now) {
                Verdict::Keep => continue,
                other => break other,
            }
        };
        assert_eq!(verdict, Verdict::Reset);
        assert_eq!(conn.buffered(), 0);
    }

    #[test]
    fn host_hangup_before_acceptance_resets() {
        let (ours, host) = pair();
        let mut conn = Connection::new_local(ours, 7, 52, Instant::now());
        drop(host);
        assert_eq!(conn.on_host_hangup(), Verdict::Reset);
        let (mut conn, host) = established();
        drop(host);
        assert_eq!(conn.on_host_hangup(), Verdict::Keep);
        // Writing to a closed host stream resets.
        assert_eq!(rw(&mut conn, b"x"), Verdict::Reset);
    }

    #[test]
    fn shutdown_flags_outside_the_spec_are_ignored() {
        let (mut conn, _host) = established();
        assert_eq!(control(&mut conn, Op::Shutdown, 0xfff0), Verdict::Keep);
        assert_eq!(conn.state(), State::Established);
    }
}
