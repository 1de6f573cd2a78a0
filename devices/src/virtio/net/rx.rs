//! Receive path: placing one frame from the backend into the guest's receive chains.
//!
//! Without MRG_RXBUF a frame goes into exactly one chain, which must hold all of it. With it, a
//! frame fills as many chains as it needs, and the header's `num_buffers` says how many; those
//! chains are returned consecutively in the used ring, as the guest driver reads them.

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::super::guest_errors::GuestErrorLog;
use super::super::{pop_chain, Chain};
use super::{NUM_BUFFERS_OFFSET, VNET_HDR_LEN};

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxOutcome {
    /// Written into the guest's chains and returned to the guest.
    Delivered,
    /// The guest has not posted enough buffers yet: keep the frame and retry when it adds some.
    /// Every good chain looked at is back in the available ring.
    NoBuffers,
    /// The frame can never fit (without MRG_RXBUF the next chain is too small; with it, the
    /// whole ring is): drop it. The chains looked at stay available for later frames.
    DoesNotFit,
}

/// A receive chain the device cannot use; it is returned to the guest with nothing written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum RxChainError {
    #[error("receive chain {head} has a read-only buffer at {addr:#x}")]
    ReadOnly { head: u16, addr: u64 },
    #[error("receive chain {head}: buffer at {addr:#x} (+{len}) is not in guest memory")]
    OutsideMemory { head: u16, addr: u64, len: u32 },
    #[error("receive chain {head} does not end (it loops or names a missing descriptor)")]
    Unterminated { head: u16 },
    #[error("receive chain {head} holds {capacity} bytes, less than a {VNET_HDR_LEN}-byte header")]
    TooSmall { head: u16, capacity: u64 },
}

/// Writes `frame` (vnet header first, at least [`VNET_HDR_LEN`] bytes) into the guest's receive
/// chains and returns them to it, setting the header's `num_buffers` (in `frame` too).
///
/// Broken chains met on the way are returned with used length 0 and logged. Errors mean the
/// guest broke the ring itself.
pub(super) fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    errors: &mut GuestErrorLog,
    log_name: &str,
) -> Result<RxOutcome, virtio_queue::Error> {
    let frame_len = frame.len() as u64;
    let ring_size = usize::from(queue.size());
    // The chains picked for the frame, and broken chains met after the first of them; the latter
    // are returned only once the frame's chains are settled, so they never land between them in
    // the used ring.
    let mut picked: Vec<Chain<'_>> = Vec::new();
    let mut deferred_broken: Vec<(u16, RxChainError)> = Vec::new();
    let mut capacity = 0u64;
    // A guest that keeps posting chains while the device pops them cannot keep it here forever.
    let mut popped = 0usize;
    while capacity < frame_len {
        let held = picked.len() + deferred_broken.len();
        if held >= ring_size {
            // Every ring slot holds one of ours and the frame still does not fit.
            rewind(queue, held);
            return Ok(RxOutcome::DoesNotFit);
        }
        if popped >= 2 * ring_size {
            rewind(queue, held);
            return Ok(RxOutcome::NoBuffers);
        }
        let Some(chain) = pop_chain(queue, mem)? else {
            if queue.enable_notification(mem)? {
                // Buffers arrived while notifications were off.
                continue;
            }
            rewind(queue, held);
            return Ok(RxOutcome::NoBuffers);
        };
        popped += 1;
        match check_chain(&chain, mem) {
            Err(e) if picked.is_empty() => {
                errors.record(log_name, &e);
                queue.add_used(mem, chain.head_index(), 0)?;
            }
            Err(e) => deferred_broken.push((chain.head_index(), e)),
            Ok(chain_capacity) if !mergeable && chain_capacity < frame_len => {
                rewind(queue, 1);
                return Ok(RxOutcome::DoesNotFit);
            }
            Ok(chain_capacity) => {
                capacity += chain_capacity;
                picked.push(chain);
            }
        }
    }

    let num_buffers = u16::try_from(picked.len()).unwrap_or(u16::MAX);
    if let Some(field) = frame.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
        field.copy_from_slice(&num_buffers.to_le_bytes());
    }
    for (head, e) in deferred_broken {
        errors.record(log_name, &e);
        queue.add_used(mem, head, 0)?;
    }
    let mut rest: &[u8] = frame;
    for chain in picked {
        let head = chain.head_index();
        let written = write_into_chain(chain, mem, &mut rest);
        queue.add_used(mem, head, written)?;
    }
    Ok(RxOutcome::Delivered)
}

/// Puts the last `count` popped chains back in the available ring.
fn rewind(queue: &mut Queue, count: usize) {
    for _ in 0..count {
        queue.go_to_previous_position();
    }
}

/// Checks that every buffer of `chain` is writable and in guest memory, that the chain ends, and
/// that it holds at least a header; returns how many bytes it holds.
fn check_chain(chain: &Chain<'_>, mem: &GuestMemoryMmap) -> Result<u64, RxChainError> {
    let head = chain.head_index();
    let mut capacity = 0u64;
    let mut ended = true;
    for desc in chain.clone() {
        let (addr, len) = (desc.addr(), desc.len());
        if !desc.is_write_only() {
            return Err(RxChainError::ReadOnly { head, addr: addr.0 });
        }
        if !mem.check_range(addr, len as usize, Permissions::Write) {
            return Err(RxChainError::OutsideMemory {
                head,
                addr: addr.0,
                len,
            });
        }
        capacity += u64::from(len);
        ended = !desc.has_next();
    }
    if !ended {
        return Err(RxChainError::Unterminated { head });
    }
    if capacity < VNET_HDR_LEN as u64 {
        return Err(RxChainError::TooSmall { head, capacity });
    }
    Ok(capacity)
}

/// Copies the start of `rest` into the chain's buffers and advances `rest` past it; returns how
/// many bytes were written. Each descriptor is checked again (the guest may have rewritten it
/// since [`check_chain`]): writing stops at the first one that is not writable guest memory.
fn write_into_chain(chain: Chain<'_>, mem: &GuestMemoryMmap, rest: &mut &[u8]) -> u32 {
    let mut written = 0u32;
    for desc in chain {
        if rest.is_empty() || !desc.is_write_only() {
            break;
        }
        let n = rest.len().min(desc.len() as usize);
        if mem.write_slice(&rest[..n], desc.addr()).is_err() {
            break;
        }
        *rest = &rest[n..];
        // n <= desc.len(), a u32.
        written = written.saturating_add(n as u32);
    }
    written
}
