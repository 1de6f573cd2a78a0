//! Transmit path: gathering one guest frame into the device's bounded buffer.

use vm_memory::Bytes;

use crate::GuestMemoryMmap;

use super::super::Chain;
use super::VNET_HDR_LEN;

/// A transmit chain the device cannot send; it is returned to the guest and nothing is sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum TxChainError {
    #[error("transmit chain {head} has a writable buffer at {addr:#x}")]
    Writable { head: u16, addr: u64 },
    #[error("transmit chain {head} holds more than {max} bytes")]
    TooLong { head: u16, max: usize },
    #[error("transmit chain {head}: buffer at {addr:#x} (+{len}) is not in guest memory")]
    OutsideMemory { head: u16, addr: u64, len: u32 },
    #[error("transmit chain {head} does not end (it loops or names a missing descriptor)")]
    Unterminated { head: u16 },
    #[error("transmit chain {head} holds {len} bytes, less than a {VNET_HDR_LEN}-byte header")]
    TooShort { head: u16, len: usize },
}

/// Copies the chain's buffers, in order, into `buf`; returns the frame's length (vnet header
/// included): at least [`VNET_HDR_LEN`], at most `buf.len()`.
///
/// Every buffer must be read-only and in guest memory, and the chain must end; a chain longer
/// than `buf` is refused rather than truncated.
pub(super) fn gather_frame(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, TxChainError> {
    let head = chain.head_index();
    let mut len = 0usize;
    let mut ended = true;
    for desc in chain {
        let (addr, desc_len) = (desc.addr(), desc.len());
        if desc.is_write_only() {
            return Err(TxChainError::Writable { head, addr: addr.0 });
        }
        let Some(dest) = len
            .checked_add(desc_len as usize)
            .and_then(|end| buf.get_mut(len..end))
        else {
            return Err(TxChainError::TooLong {
                head,
                max: buf.len(),
            });
        };
        mem.read_slice(dest, addr)
            .map_err(|_| TxChainError::OutsideMemory {
                head,
                addr: addr.0,
                len: desc_len,
            })?;
        len += desc_len as usize;
        ended = !desc.has_next();
    }
    if !ended {
        return Err(TxChainError::Unterminated { head });
    }
    if len < VNET_HDR_LEN {
        return Err(TxChainError::TooShort { head, len });
    }
    Ok(len)
}
