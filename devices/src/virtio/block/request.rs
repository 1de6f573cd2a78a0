//! Parsing a virtio-blk request (virtio 1.x, 5.2.6) from a descriptor chain into a [`Request`].
//!
//! After [`Request::parse`] succeeds, every guest address in the request has been checked to lie
//! inside guest memory with the direction the request needs (data the device reads is in
//! driver-readable descriptors, data it writes is in device-writable ones), lengths are bounded,
//! and the request type is an enum. Nothing downstream handles raw guest numbers.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

use super::SECTOR_SIZE;
use crate::virtio::Chain;

/// Request type codes (virtio 1.x, 5.2.6).
mod code {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Size of the request header: type (u32), reserved (u32), sector (u64).
pub const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes segment: sector (u64), num_sectors (u32), flags (u32).
pub const SEGMENT_SIZE: u32 = 16;
/// The only flag a write-zeroes segment may carry: the device may unmap the range.
pub const SEGMENT_FLAG_UNMAP: u32 = 1;
/// Most discard / write-zeroes segments in one request (advertised in the config space).
pub const MAX_SEGMENTS: u32 = 32;
/// Bytes a GET_ID answer holds.
pub const ID_BYTES: usize = 20;
/// Most data descriptors a read or write may have (`seg_max` in the config space: a chain of the
/// queue's 256 descriptors less the header and the status).
pub const MAX_DATA_SEGMENTS: u32 = 254;
/// Largest data descriptor the driver may use (`size_max` in the config space).
pub const MAX_SEGMENT_BYTES: u32 = 64 << 10;
/// Largest read or write: what a driver that keeps to `seg_max` and `size_max` can send (just
/// under 16 MiB). A bigger one is refused, so no request holds the device thread for long.
pub const MAX_DATA_BYTES: u64 = MAX_DATA_SEGMENTS as u64 * MAX_SEGMENT_BYTES as u64;

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk into guest memory.
    In,
    /// Write guest memory to the disk.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the device's id string.
    GetId,
    /// The guest no longer needs these sectors.
    Discard,
    /// Make these sectors read as zeroes.
    WriteZeroes,
    /// A type Kiln does not implement (answered VIRTIO_BLK_S_UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            code::IN => Self::In,
            code::OUT => Self::Out,
            code::FLUSH => Self::Flush,
            code::GET_ID => Self::GetId,
            code::DISCARD => Self::Discard,
            code::WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

impl RequestType {
    /// True when the device writes the data buffers (they must be device-writable).
    fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }
}

/// A guest buffer, known to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataBuffer {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One discard / write-zeroes range, checked to be whole sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// The guest allows unmapping (write-zeroes only).
    pub unmap: bool,
}

/// Why a chain is not a well-formed request. The request fails; the device carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain has no descriptors.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The first descriptor is too short for the header or is device-writable.
    #[error("bad header descriptor (length {len}, device-writable {writable})")]
    BadHeader {
        /// Length of the first descriptor, in bytes.
        len: u32,
        /// Whether the first descriptor is device-writable.
        writable: bool,
    },
    /// A descriptor points (partly) outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest physical address of the descriptor's buffer.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// The chain has no device-writable status byte at its end.
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    /// A data descriptor has the wrong direction for the request type.
    #[error("{request_type:?} request with a data descriptor of the wrong direction")]
    WrongDirection {
        /// The request's type.
        request_type: RequestType,
    },
    /// The data length is not what the request type allows.
    #[error("{request_type:?} request with {len} data bytes")]
    BadDataLength {
        /// The request's type.
        request_type: RequestType,
        /// Total length of the data descriptors, in bytes.
        len: u64,
    },
    /// A read or write larger than the device advertised (`seg_max` × `size_max`).
    #[error("{request_type:?} request with {len} data bytes, more than the {max} allowed")]
    TooLarge {
        /// The request's type.
        request_type: RequestType,
        /// Total length of the data descriptors, in bytes.
        len: u64,
        /// The most a request may carry.
        max: u64,
    },
    /// A discard / write-zeroes segment carries flags that are not allowed.
    #[error("{request_type:?} segment with flags {flags:#x}")]
    BadSegmentFlags {
        /// The request's type (discard or write-zeroes).
        request_type: RequestType,
        /// The segment's `flags` field.
        flags: u32,
    },
    /// Reading the header or a segment from guest memory failed.
    #[error("reading the request from guest memory: {0}")]
    Memory(String),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// First sector (IN / OUT only).
    pub sector: u64,
    /// Data buffers, in order (IN / OUT / GET_ID).
    pub data: Vec<DataBuffer>,
    /// Total bytes in `data`, at most `u32::MAX`.
    pub data_len: u32,
    /// Ranges for DISCARD / WRITE_ZEROES.
    pub segments: Vec<Segment>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// The part of a request that can be salvaged from a malformed chain: where to put the status
/// byte, if there is a usable one.
pub fn status_address(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
    let last = chain.last()?;
    (last.is_write_only() && last.len() >= 1 && mem.check_range(last.addr(), 1))
        .then(|| last.addr())
}

impl Request {
    /// Parses and checks a chain. Uses at most `queue size` descriptors (the chain iterator's own
    /// bound), so a looping chain ends.
    pub fn parse(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Result<Self, ParseError> {
        let mut descs = chain.peekable();
        let header = descs.next().ok_or(ParseError::EmptyChain)?;
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Err(ParseError::BadHeader {
                len: header.len(),
                writable: header.is_write_only(),
            });
        }
        check_in_memory(mem, header.addr(), header.len())?;
        let request_type = RequestType::from(read_obj::<u32>(mem, header.addr())?);
        let sector = read_obj::<u64>(mem, header.addr().unchecked_add(8))?;

        let mut data = Vec::new();
        let mut data_len: u64 = 0;
        let mut status_addr = None;
        while let Some(desc) = descs.next() {
            check_in_memory(mem, desc.addr(), desc.len())?;
            if descs.peek().is_none() {
                if !desc.is_write_only() || desc.len() < 1 {
                    return Err(ParseError::NoStatus);
                }
                status_addr = Some(desc.addr());
                break;
            }
            if desc.is_write_only() != request_type.device_writes_data() {
                return Err(ParseError::WrongDirection { request_type });
            }
            data_len += u64::from(desc.len());
            data.push(DataBuffer {
                addr: desc.addr(),
                len: desc.len(),
            });
        }
        let status_addr = status_addr.ok_or(ParseError::NoStatus)?;
        let bad_len = || ParseError::BadDataLength {
            request_type,
            len: data_len,
        };
        let data_len_u32 = u32::try_from(data_len).map_err(|_| bad_len())?;

        let mut request = Request {
            request_type,
            sector: 0,
            data: Vec::new(),
            data_len: 0,
            segments: Vec::new(),
            status_addr,
        };
        match request_type {
            RequestType::In | RequestType::Out => {
                if data_len == 0 || !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(bad_len());
                }
                if data_len > MAX_DATA_BYTES {
                    return Err(ParseError::TooLarge {
                        request_type,
                        len: data_len,
                        max: MAX_DATA_BYTES,
                    });
                }
                request.sector = sector;
                request.data = data;
                request.data_len = data_len_u32;
            }
            RequestType::GetId => {
                if data_len == 0 {
                    return Err(bad_len());
                }
                request.data = data;
                request.data_len = data_len_u32;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let count = data_len / u64::from(SEGMENT_SIZE);
                if data_len == 0
                    || !data_len.is_multiple_of(u64::from(SEGMENT_SIZE))
                    || count > u64::from(MAX_SEGMENTS)
                {
                    return Err(bad_len());
                }
                request.segments = read_segments(mem, &data, request_type)?;
            }
            // FLUSH carries no data; any buffers given are ignored, as Linux and QEMU do.
            RequestType::Flush | RequestType::Unsupported(_) => {}
        }
        Ok(request)
    }
}

fn check_in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Result<(), ParseError> {
    if mem.check_range(addr, len as usize) {
        Ok(())
    } else {
        Err(ParseError::OutsideMemory { addr: addr.0, len })
    }
}

fn read_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
) -> Result<T, ParseError> {
    mem.read_obj(addr)
        .map_err(|e| ParseError::Memory(e.to_string()))
}

/// Reads the 16-byte segments, which may be split across data buffers at any byte.
fn read_segments(
    mem: &GuestMemoryMmap,
    data: &[DataBuffer],
    request_type: RequestType,
) -> Result<Vec<Segment>, ParseError> {
    let mut raw = Vec::new();
    for buf in data {
        let start = raw.len();
        raw.resize(start + buf.len as usize, 0);
        mem.read_slice(&mut raw[start..], buf.addr)
            .map_err(|e| ParseError::Memory(e.to_string()))?;
    }
    let mut segments = Vec::with_capacity(raw.len() / SEGMENT_SIZE as usize);
    for bytes in raw.chunks_exact(SEGMENT_SIZE as usize) {
        // chunks_exact yields exactly SEGMENT_SIZE (16) bytes: the conversions cannot fail.
        let (sector, rest) = bytes.split_at(8);
        let (num_sectors, flags) = rest.split_at(4);
        let sector = u64::from_le_bytes(sector.try_into().unwrap_or_default());
        let num_sectors = u32::from_le_bytes(num_sectors.try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(flags.try_into().unwrap_or_default());
        let allowed = match request_type {
            RequestType::WriteZeroes => SEGMENT_FLAG_UNMAP,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(ParseError::BadSegmentFlags {
                request_type,
                flags,
            });
        }
        segments.push(Segment {
            sector,
            num_sectors,
            unmap: flags & SEGMENT_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    pub const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    pub const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    pub fn write_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        mem.write_obj(request_type, GuestAddress(addr)).unwrap();
        mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, ParseError> {
        parse_in_queue(mem, descs, 16)
    }

    fn parse_in_queue(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        queue_size: u16,
    ) -> Result<Request, ParseError> {
        let vq = MockSplitQueue::new(mem, queue_size);
        vq.build_desc_chain(descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        Request::parse(chain, mem)
    }

    #[test]
    fn read_request() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::IN, 7);
        let req = parse(
            &mem,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 512, WRITE),
                desc(0x30_0000, 1024, WRITE),
                desc(0x40_0000, 1, WRITE),
            ],
        )
        .unwrap();
        assert_eq!(req.request_type, RequestType::In);
        assert_eq!(req.sector, 7);
        assert_eq!(req.data_len, 1536);
        assert_eq!(req.data.len(), 2);
        assert_eq!(req.status_addr, GuestAddress(0x40_0000));
    }

    #[test]
    fn write_request_needs_readable_data() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::OUT, 0);
        let ok = [
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, 0),
            desc(0x40_0000, 1, WRITE),
        ];
        assert_eq!(parse(&mem, &ok).unwrap().request_type, RequestType::Out);
        let wrong = [
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, WRITE),
            desc(0x40_0000, 1, WRITE),
        ];
        assert_eq!(
            parse(&mem, &wrong),
            Err(ParseError::WrongDirection {
                request_type: RequestType::Out
            })
        );
    }

    #[test]
    fn read_into_a_read_only_buffer_is_refused() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::IN, 0);
        let descs = [
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, 0),
            desc(0x40_0000, 1, WRITE),
        ];
        assert!(matches!(
            parse(&mem, &descs),
            Err(ParseError::WrongDirection { .. })
        ));
    }

    #[test]
    fn malformed_headers_and_status() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::IN, 0);
        // Header too short.
        assert!(matches!(
            parse(&mem, &[desc(0x10_0000, 8, 0), desc(0x40_0000, 1, WRITE)]),
            Err(ParseError::BadHeader { len: 8, .. })
        ));
        // Header device-writable.
        assert!(matches!(
            parse(
                &mem,
                &[desc(0x10_0000, 16, WRITE), desc(0x40_0000, 1, WRITE)]
            ),
            Err(ParseError::BadHeader { writable: true, .. })
        ));
        // No status descriptor at all.
        assert_eq!(
            parse(&mem, &[desc(0x10_0000, 16, 0)]),
            Err(ParseError::NoStatus)
        );
        // Status not writable.
        assert_eq!(
            parse(
                &mem,
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, 512, WRITE),
                    desc(0x40_0000, 1, 0)
                ]
            ),
            Err(ParseError::NoStatus)
        );
    }

    #[test]
    fn descriptors_outside_memory() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::IN, 0);
        assert_eq!(
            parse(
                &mem,
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0xff_ff00, 512, WRITE),
                    desc(0x40_0000, 1, WRITE)
                ]
            ),
            Err(ParseError::OutsideMemory {
                addr: 0xff_ff00,
                len: 512
            })
        );
        assert!(matches!(
            parse(
                &mem,
                &[desc(u64::MAX - 4, 16, 0), desc(0x40_0000, 1, WRITE)]
            ),
            Err(ParseError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn data_lengths() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::IN, 0);
        // Not a whole sector.
        assert!(matches!(
            parse(
                &mem,
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, 100, WRITE),
                    desc(0x40_0000, 1, WRITE)
                ]
            ),
            Err(ParseError::BadDataLength { len: 100, .. })
        ));
        // No data.
        assert!(matches!(
            parse(&mem, &[desc(0x10_0000, 16, 0), desc(0x40_0000, 1, WRITE)]),
            Err(ParseError::BadDataLength { len: 0, .. })
        ));
        // Buffers may overlap (the guest controls them): each is checked on its own.
        let descs = [
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 0x8_0000, WRITE),
            desc(0x20_0000, 0x8_0000, WRITE),
            desc(0x40_0000, 1, WRITE),
        ];
        assert_eq!(parse(&mem, &descs).unwrap().data_len, 0x10_0000);
        // Up to seg_max × size_max bytes, and not one sector more.
        let mut descs = vec![desc(0x10_0000, 16, 0)];
        descs.extend((0..MAX_DATA_SEGMENTS).map(|_| desc(0x20_0000, MAX_SEGMENT_BYTES, WRITE)));
        descs.push(desc(0x40_0000, 1, WRITE));
        assert_eq!(
            u64::from(parse_in_queue(&mem, &descs, 512).unwrap().data_len),
            MAX_DATA_BYTES
        );
        let last = descs.len() - 2;
        descs.insert(last, desc(0x20_0000, 512, WRITE));
        assert!(matches!(
            parse_in_queue(&mem, &descs, 512),
            Err(ParseError::TooLarge { len, max: MAX_DATA_BYTES, .. }) if len == MAX_DATA_BYTES + 512
        ));
    }

    #[test]
    fn flush_getid_unsupported() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::FLUSH, 99);
        let req = parse(&mem, &[desc(0x10_0000, 16, 0), desc(0x40_0000, 1, WRITE)]).unwrap();
        assert_eq!(req.request_type, RequestType::Flush);
        write_header(&mem, 0x10_0000, code::GET_ID, 0);
        let req = parse(
            &mem,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 20, WRITE),
                desc(0x40_0000, 1, WRITE),
            ],
        )
        .unwrap();
        assert_eq!((req.request_type, req.data_len), (RequestType::GetId, 20));
        write_header(&mem, 0x10_0000, 0xdead, 0);
        let req = parse(&mem, &[desc(0x10_0000, 16, 0), desc(0x40_0000, 1, WRITE)]).unwrap();
        assert_eq!(req.request_type, RequestType::Unsupported(0xdead));
    }

    fn write_segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, n: u32, flags: u32) {
        mem.write_obj(sector, GuestAddress(addr)).unwrap();
        mem.write_obj(n, GuestAddress(addr + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(addr + 12)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mem = mem();
        write_header(&mem, 0x10_0000, code::WRITE_ZEROES, 0);
        write_segment(&mem, 0x20_0000, 8, 16, SEGMENT_FLAG_UNMAP);
        write_segment(&mem, 0x20_0010, 100, 1, 0);
        // The second segment is split across two buffers mid-field.
        let req = parse(
            &mem,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 20, 0),
                desc(0x20_0014, 12, 0),
                desc(0x40_0000, 1, WRITE),
            ],
        )
        .unwrap();
        assert_eq!(
            req.segments,
            vec![
                Segment {
                    sector: 8,
                    num_sectors: 16,
                    unmap: true
                },
                Segment {
                    sector: 100,
                    num_sectors: 1,
                    unmap: false
                }
            ]
        );
        // Discard may not carry the unmap flag.
        write_header(&mem, 0x10_0000, code::DISCARD, 0);
        assert!(matches!(
            parse(
                &mem,
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, 16, 0),
                    desc(0x40_0000, 1, WRITE)
                ]
            ),
            Err(ParseError::BadSegmentFlags { flags: 1, .. })
        ));
        // Not a whole number of segments.
        assert!(matches!(
            parse(
                &mem,
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, 10, 0),
                    desc(0x40_0000, 1, WRITE)
                ]
            ),
            Err(ParseError::BadDataLength { .. })
        ));
        // Too many segments.
        assert!(matches!(
            parse(
                &mem,
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, SEGMENT_SIZE * (MAX_SEGMENTS + 1), 0),
                    desc(0x40_0000, 1, WRITE)
                ]
            ),
            Err(ParseError::BadDataLength { .. })
        ));
    }

    #[test]
    fn status_is_salvaged_from_bad_chains() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x10_0000, 2, 0), desc(0x40_0000, 1, WRITE)])
            .unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(status_address(chain, &mem), Some(GuestAddress(0x40_0000)));
    }
}
