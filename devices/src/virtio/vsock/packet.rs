//! The virtio-vsock packet header (virtio 1.x, 5.10.6), parsed once from guest memory into a
//! [`PacketHeader`] and written back the same way.
//!
//! Every packet on the rx and tx queues starts with this 44-byte little-endian header; a
//! stream's payload (op [`Op::Rw`]) follows it in the same chain.

use std::fmt;

/// Length of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;

/// The host's context id: the only peer a guest reaches through this device.
pub const HOST_CID: u64 = 2;

/// `type`: a connection-oriented byte stream (the only type the device offers).
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `op` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection refused or torn down.
    Rst,
    /// One or both directions are done (`flags`).
    Shutdown,
    /// Stream data.
    Rw,
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    CreditUpdate,
    /// Asks the peer for a CREDIT_UPDATE.
    CreditRequest,
    /// An op this device does not know; answered with RST.
    Unknown(u16),
}

impl Op {
    fn from_raw(raw: u16) -> Op {
        match raw {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            other => Op::Unknown(other),
        }
    }

    fn raw(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
            Op::Unknown(other) => other,
        }
    }
}

/// A packet header, as host-endian fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// What the packet does.
    pub op: Op,
    /// Op-specific flags (SHUTDOWN's [`SHUTDOWN_RCV`] / [`SHUTDOWN_SEND`]).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Parses the wire format.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> PacketHeader {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"));
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: Op::from_raw(u16_at(30)),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire format.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.raw().to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a reply to `self` with the addresses swapped: what the device sends back
    /// for a packet it refuses.
    pub fn reply(&self, op: Op) -> PacketHeader {
        PacketHeader {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

impl fmt::Display for PacketHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {}:{} -> {}:{} len {}",
            self.op, self.src_cid, self.src_port, self.dst_cid, self.dst_port, self.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_field() {
        let h = PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            len: 4096,
            type_: TYPE_STREAM,
            op: Op::Rw,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 256 * 1024,
            fwd_cnt: u32::MAX,
        };
        let bytes = h.to_bytes();
        assert_eq!(PacketHeader::from_bytes(&bytes), h);
        // Spot-check the layout against the spec's field offsets.
        assert_eq!(bytes[0], 3);
        assert_eq!(bytes[8], 2);
        assert_eq!(&bytes[24..28], &4096u32.to_le_bytes());
        assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
    }

    #[test]
    fn unknown_ops_survive_parsing() {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[30] = 0x99;
        let h = PacketHeader::from_bytes(&bytes);
        assert_eq!(h.op, Op::Unknown(0x99));
        assert_eq!(h.to_bytes()[30], 0x99);
    }

    #[test]
    fn reply_swaps_addresses() {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0] = 3;
        bytes[8] = 2;
        bytes[16] = 7;
        bytes[20] = 9;
        let h = PacketHeader::from_bytes(&bytes);
        let r = h.reply(Op::Rst);
        assert_eq!((r.src_cid, r.dst_cid, r.src_port, r.dst_port), (2, 3, 9, 7));
        assert_eq!(r.op, Op::Rst);
        assert_eq!(r.type_, TYPE_STREAM);
    }
}
