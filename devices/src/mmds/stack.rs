//! MMDS's end of a virtio-net interface: an Ethernet endpoint at the MMDS address.
//!
//! The net device asks [`MmdsStack::is_for_mmds`] about every frame the guest sends; those that
//! are (ARP about the MMDS address, IPv4 to it) go to [`MmdsStack::take_frame`] instead of the
//! TAP, and whatever the stack answers comes back through [`MmdsStack::next_frame`] for the
//! guest's receive queue. Behind the frames is a smoltcp interface (its own MAC, the MMDS
//! address, every other address on-link so it answers any guest address) with a few TCP sockets
//! listening on port 80; each connection carries one HTTP request and its answer, then closes.
//!
//! Bounds, since every byte here is the guest's: [`MAX_QUEUED_FRAMES`] frames each way, one
//! request head and body per connection ([`super::http`]'s limits), [`SOCKETS`] connections at
//! once (a SYN past them is reset). A frame that is not valid Ethernet/ARP/IPv4/TCP is dropped
//! by smoltcp and counted.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use super::http::{self, Parsed, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::store::SharedMmds;

/// Firecracker's MMDS MAC address, which the guest learns from ARP.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Frames held in each direction; past it, the newest is dropped.
pub const MAX_QUEUED_FRAMES: usize = 512;
/// Connections served at once.
pub const SOCKETS: usize = 8;
/// The HTTP port.
const PORT: u16 = 80;
/// Each connection's receive buffer: a whole request.
const RX_BUFFER: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES;
/// Each connection's send buffer; longer answers are fed in as it drains.
const TX_BUFFER: usize = 16 * 1024;
/// The Ethernet MTU the stack assumes (the frame, header included).
const FRAME_MTU: usize = 1514;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

/// What a stack is made with.
#[derive(Debug, Clone)]
pub struct MmdsStackConfig {
    /// The MMDS address (169.254.169.254 by default).
    pub ipv4: Ipv4Addr,
    /// The document it serves.
    pub store: SharedMmds,
}

/// Counters, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MmdsCounters {
    /// Guest frames taken instead of going to the TAP.
    pub frames_taken: u64,
    /// Frames handed to the guest.
    pub frames_sent: u64,
    /// Bytes in them (Ethernet headers included).
    pub bytes_sent: u64,
    /// Frames dropped because a queue was full.
    pub frames_dropped: u64,
    /// HTTP requests answered (any status).
    pub requests: u64,
    /// Requests that were not HTTP (answered 400).
    pub bad_requests: u64,
    /// Connections accepted.
    pub connections: u64,
}

/// The frames between the net device and smoltcp.
#[derive(Default)]
struct FrameQueues {
    /// From the guest, for smoltcp.
    inbound: VecDeque<Vec<u8>>,
    /// From smoltcp, for the guest.
    outbound: VecDeque<Vec<u8>>,
    dropped: u64,
}

struct InboundToken(Vec<u8>);
struct OutboundToken<'a>(&'a mut FrameQueues);

impl phy::RxToken for InboundToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for OutboundToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        if self.0.outbound.len() < MAX_QUEUED_FRAMES {
            self.0.outbound.push_back(frame);
        } else {
            self.0.dropped += 1;
        }
        result
    }
}

impl phy::Device for FrameQueues {
    type RxToken<'a> = InboundToken;
    type TxToken<'a> = OutboundToken<'a>;

    fn receive(&mut self, _: NetInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.inbound.pop_front()?;
        Some((InboundToken(frame), OutboundToken(self)))
    }

    fn transmit(&mut self, _: NetInstant) -> Option<Self::TxToken<'_>> {
        Some(OutboundToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MTU;
        // The guest may leave its TCP checksums to the device (VIRTIO_NET_F_CSUM): check none
        // on the way in, write them all on the way out.
        let mut checksum = ChecksumCapabilities::default();
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// One connection's request and answer.
#[derive(Default)]
struct Connection {
    request: Vec<u8>,
    answer: Option<(Vec<u8>, usize)>,
    counted: bool,
}

/// MMDS on one interface.
pub struct MmdsStack {
    ipv4: [u8; 4],
    store: SharedMmds,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<(SocketHandle, Connection)>,
    queues: FrameQueues,
    epoch: std::time::Instant,
    counters: MmdsCounters,
}

impl std::fmt::Debug for MmdsStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsStack")
            .field("ipv4", &Ipv4Addr::from(self.ipv4))
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl MmdsStack {
    /// A stack answering at `config.ipv4`.
    pub fn new(config: MmdsStackConfig) -> Self {
        let mut queues = FrameQueues::default();
        let epoch = std::time::Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        iface_config.random_seed = u64::from(std::process::id());
        let mut iface = Interface::new(iface_config, &mut queues, NetInstant::from_micros(0));
        let address: Ipv4Address = config.ipv4;
        iface.update_ip_addrs(|addrs| {
            // Prefix 0: every guest address is on-link, so the stack answers ARP from and
            // replies to whatever address the guest uses.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(address), 0));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let connections = (0..SOCKETS)
            .map(|_| {
                let socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
                );
                (sockets.add(socket), Connection::default())
            })
            .collect();
        let mut stack = Self {
            ipv4: config.ipv4.octets(),
            store: config.store,
            iface,
            sockets,
            connections,
            queues,
            epoch,
            counters: MmdsCounters::default(),
        };
        for index in 0..SOCKETS {
            stack.relisten(index);
        }
        stack
    }

    /// The counters so far.
    pub fn counters(&self) -> MmdsCounters {
        MmdsCounters {
            frames_dropped: self.queues.dropped,
            ..self.counters
        }
    }

    /// Whether the guest's Ethernet `frame` (no vnet header) is for MMDS: ARP about the MMDS
    /// address, or IPv4 to it.
    pub fn is_for_mmds(&self, frame: &[u8]) -> bool {
        let Some(ethertype) = frame.get(12..14) else {
            return false;
        };
        // ARP's target protocol address is at 24 in an Ethernet/IPv4 ARP packet, IPv4's
        // destination at 16.
        let target = if ethertype == ETHERTYPE_ARP {
            frame.get(ETH_HEADER + 24..ETH_HEADER + 28)
        } else if ethertype == ETHERTYPE_IPV4 {
            frame.get(ETH_HEADER + 16..ETH_HEADER + 20)
        } else {
            None
        };
        target == Some(&self.ipv4[..])
    }

    /// Takes a frame [`Self::is_for_mmds`] picked, and answers what it completes.
    pub fn take_frame(&mut self, frame: &[u8]) {
        self.counters.frames_taken += 1;
        if self.queues.inbound.len() < MAX_QUEUED_FRAMES {
            self.queues.inbound.push_back(frame.to_vec());
        } else {
            self.queues.dropped += 1;
        }
        self.poll();
    }

    /// The next frame for the guest, if any.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        let frame = self.queues.outbound.pop_front()?;
        self.counters.frames_sent += 1;
        self.counters.bytes_sent += frame.len() as u64;
        Some(frame)
    }

    /// Whether frames wait for the guest.
    pub fn has_frames(&self) -> bool {
        !self.queues.outbound.is_empty()
    }

    fn now(&self) -> NetInstant {
        let micros = self.epoch.elapsed().as_micros();
        NetInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// Runs smoltcp and the connections until neither has more to do (bounded: each round
    /// either moves bytes or ends).
    pub fn poll(&mut self) {
        // Before smoltcp sees a new SYN.
        self.free_a_socket();
        for _ in 0..16 {
            let now = self.now();
            self.iface.poll(now, &mut self.queues, &mut self.sockets);
            if !self.serve_connections() {
                break;
            }
        }
    }

    /// With every socket taken, frees one whose answer is out and which is closing (one whose
    /// client acknowledged everything first), so clients that vanished mid-close cannot keep
    /// new ones out. Connections still sending their request are left to smoltcp's timeout.
    fn free_a_socket(&mut self) {
        let listening = self
            .connections
            .iter()
            .any(|(h, _)| self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen);
        if listening {
            return;
        }
        // Closing with everything acknowledged first; else closing with the answer handed over.
        let closing = |acked_only: bool| {
            self.connections.iter().position(|(h, conn)| {
                let socket = self.sockets.get::<tcp::Socket>(*h);
                let answered = conn
                    .answer
                    .as_ref()
                    .is_some_and(|(bytes, sent)| *sent == bytes.len());
                answered && !socket.may_send() && (!acked_only || socket.send_queue() == 0)
            })
        };
        if let Some(index) = closing(true).or_else(|| closing(false)) {
            self.relisten(index);
        }
    }

    /// Reads requests, writes answers, recycles closed sockets; true if anything moved.
    fn serve_connections(&mut self) -> bool {
        let mut moved = false;
        for index in 0..self.connections.len() {
            let (handle, _) = self.connections[index];
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            let state = socket.state();
            let conn = &mut self.connections[index].1;
            if state != tcp::State::Listen && !conn.counted {
                conn.counted = true;
                self.counters.connections += 1;
            }
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                if state == tcp::State::TimeWait || conn.counted {
                    self.relisten(index);
                    moved = true;
                }
                continue;
            }
            if conn.answer.is_none() && socket.can_recv() {
                let mut chunk = [0u8; 2048];
                while let Ok(n) = socket.recv_slice(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    moved = true;
                    conn.request.extend_from_slice(&chunk[..n]);
                    if conn.request.len() > RX_BUFFER {
                        break;
                    }
                }
                let response = match http::parse(&conn.request) {
                    Parsed::Incomplete if conn.request.len() <= RX_BUFFER => None,
                    Parsed::Incomplete => Some(Response::bad_request("Request too long.")),
                    Parsed::Invalid(reason) => {
                        self.counters.bad_requests += 1;
                        Some(Response::bad_request(reason))
                    }
                    Parsed::Complete(request, _) => {
                        let now = std::time::Instant::now();
                        match self.store.lock() {
                            Ok(mut store) => Some(http::respond(&mut store, &request, now)),
                            // A panic elsewhere while answering: say so rather than hang.
                            Err(_) => Some(Response::bad_request("MMDS is unavailable.")),
                        }
                    }
                };
                if let Some(response) = response {
                    self.counters.requests += 1;
                    conn.answer = Some((response.to_bytes(), 0));
                    conn.request = Vec::new();
                }
            }
            if let Some((bytes, sent)) = conn.answer.as_mut() {
                if *sent < bytes.len() && socket.can_send() {
                    if let Ok(n) = socket.send_slice(&bytes[*sent..]) {
                        *sent += n;
                        moved |= n > 0;
                    }
                }
                if *sent == bytes.len() && socket.may_send() {
                    socket.close();
                    moved = true;
                }
            } else if !socket.may_recv() && socket.may_send() {
                // The client closed before a whole request: close our side too.
                socket.close();
                moved = true;
            }
        }
        moved
    }

    fn relisten(&mut self, index: usize) {
        let (handle, conn) = &mut self.connections[index];
        *conn = Connection::default();
        let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
        socket.abort();
        // A closed socket listening on a fixed port cannot fail.
        let _ = socket.listen(PORT);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(30)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::store::{MmdsStore, MmdsVersion};
    use serde_json::json;

    /// The guest side, as a second smoltcp interface wired to the stack through its frames.
    struct Guest {
        iface: Interface,
        sockets: SocketSet<'static>,
        queues: FrameQueues,
        handle: SocketHandle,
    }

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];

    impl Guest {
        fn new(addr: [u8; 4]) -> Self {
            let mut queues = FrameQueues::default();
            let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
            let mut iface = Interface::new(config, &mut queues, NetInstant::from_micros(0));
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::from(addr)), 0));
            });
            let mut sockets = SocketSet::new(Vec::new());
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 65536]),
                tcp::SocketBuffer::new(vec![0; 4096]),
            );
            let handle = sockets.add(socket);
            Self {
                iface,
                sockets,
                queues,
                handle,
            }
        }

        /// Sends `request` to MMDS and returns everything that came back.
        fn fetch(&mut self, stack: &mut MmdsStack, request: &str, port: u16) -> String {
            self.fetch_and(stack, request, port, true)
        }

        /// [`Self::fetch`], vanishing after the answer without finishing the close unless
        /// `finish_close`.
        fn fetch_and(
            &mut self,
            stack: &mut MmdsStack,
            request: &str,
            port: u16,
            finish_close: bool,
        ) -> String {
            let mmds = IpAddress::Ipv4(Ipv4Address::new(169, 254, 169, 254));
            {
                let cx = self.iface.context();
                let socket = self.sockets.get_mut::<tcp::Socket>(self.handle);
                socket.abort();
                socket.connect(cx, (mmds, PORT), port).unwrap();
            }
            let mut sent = false;
            let mut answer = Vec::new();
            for step in 0..400 {
                let now = NetInstant::from_millis(step * 10);
                self.iface.poll(now, &mut self.queues, &mut self.sockets);
                while let Some(frame) = self.queues.outbound.pop_front() {
                    assert!(stack.is_for_mmds(&frame), "{frame:02x?}");
                    stack.take_frame(&frame);
                }
                while let Some(frame) = stack.next_frame() {
                    self.queues.inbound.push_back(frame);
                }
                let socket = self.sockets.get_mut::<tcp::Socket>(self.handle);
                if !sent && socket.can_send() {
                    socket.send_slice(request.as_bytes()).unwrap();
                    sent = true;
                }
                let mut chunk = [0u8; 4096];
                while let Ok(n) = socket.recv_slice(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&chunk[..n]);
                }
                if sent && !socket.may_recv() {
                    socket.close();
                    // Let the two finish the close, as a guest's kernel would.
                    for more in 0..if finish_close { 20 } else { 0 } {
                        let now = NetInstant::from_millis((step + more) * 10);
                        self.iface.poll(now, &mut self.queues, &mut self.sockets);
                        while let Some(frame) = self.queues.outbound.pop_front() {
                            stack.take_frame(&frame);
                        }
                        while let Some(frame) = stack.next_frame() {
                            self.queues.inbound.push_back(frame);
                        }
                    }
                    break;
                }
            }
            String::from_utf8(answer).unwrap()
        }
    }

    fn stack(version: MmdsVersion) -> MmdsStack {
        let store = MmdsStore::shared(51200);
        {
            let mut s = store.lock().unwrap();
            s.put(json!({"latest": {"meta-data": {"instance-id": "i-123", "big": "x".repeat(40000)}}}))
                .unwrap();
            s.configure(version, false);
        }
        MmdsStack::new(MmdsStackConfig {
            ipv4: Ipv4Addr::new(169, 254, 169, 254),
            store,
        })
    }

    #[test]
    fn a_guest_fetches_metadata_over_tcp() {
        let mut stack = stack(MmdsVersion::V1);
        let mut guest = Guest::new([10, 0, 0, 2]);
        let answer = guest.fetch(
            &mut stack,
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
            40000,
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(answer.ends_with("\r\n\r\ni-123"), "{answer:?}");
        // An answer bigger than a socket's send buffer arrives whole; sockets are reused.
        for port in 40001..40001 + 2 * SOCKETS as u16 {
            let answer = guest.fetch(
                &mut stack,
                "GET /latest/meta-data/big HTTP/1.1\r\n\r\n",
                port,
            );
            assert!(
                answer.ends_with(&"x".repeat(40000)),
                "{} bytes",
                answer.len()
            );
        }
        let answer = guest.fetch(&mut stack, "not http\r\n\r\n", 41000);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        let c = stack.counters();
        assert!(c.requests >= 2 + 2 * SOCKETS as u64, "{c:?}");
        assert_eq!(c.bad_requests, 1);
        assert_eq!(c.frames_dropped, 0);
    }

    #[test]
    fn clients_that_vanish_mid_close_do_not_keep_others_out() {
        let mut stack = stack(MmdsVersion::V1);
        let mut guest = Guest::new([10, 0, 0, 3]);
        let get = "GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n";
        for port in 0..3 * SOCKETS as u16 {
            let answer = guest.fetch_and(&mut stack, get, 42000 + port, false);
            assert!(answer.ends_with("i-123"), "fetch {port}: {answer:?}");
        }
    }

    #[test]
    fn version_2_needs_a_token_over_the_wire_too() {
        let mut stack = stack(MmdsVersion::V2);
        let mut guest = Guest::new([169, 254, 0, 2]);
        let get = "GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n";
        assert!(guest
            .fetch(&mut stack, get, 40000)
            .starts_with("HTTP/1.1 401"));
        let answer = guest.fetch(
            &mut stack,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
            40001,
        );
        let token = answer.rsplit("\r\n\r\n").next().unwrap();
        assert_eq!(token.len(), 64, "{answer:?}");
        let with_token = format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"
        );
        assert!(guest
            .fetch(&mut stack, &with_token, 40002)
            .ends_with("i-123"));
    }

    #[test]
    fn only_frames_for_the_mmds_address_are_taken() {
        let stack = stack(MmdsVersion::V1);
        let mut ipv4 = vec![0u8; 34];
        ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        ipv4[30..34].copy_from_slice(&[169, 254, 169, 254]);
        assert!(stack.is_for_mmds(&ipv4));
        ipv4[33] = 253;
        assert!(!stack.is_for_mmds(&ipv4));
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP);
        arp[38..42].copy_from_slice(&[169, 254, 169, 254]);
        assert!(stack.is_for_mmds(&arp));
        assert!(!stack.is_for_mmds(&arp[..40]), "truncated");
        assert!(!stack.is_for_mmds(&[]));
        let mut ipv6 = ipv4.clone();
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(!stack.is_for_mmds(&ipv6));
    }

    #[test]
    fn garbage_frames_are_dropped_without_harm() {
        let mut stack = stack(MmdsVersion::V1);
        let mut frame = vec![0xffu8; 60];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        frame[30..34].copy_from_slice(&[169, 254, 169, 254]);
        for len in [14, 20, 34, 60] {
            stack.take_frame(&frame[..len]);
        }
        for _ in 0..(MAX_QUEUED_FRAMES + 10) {
            stack.take_frame(&frame);
        }
        assert!(stack.next_frame().is_none());
    }
}
