//! Firecracker's compiled seccomp filters (what its `seccompiler-bin` writes and its
//! `--seccomp-filter` reads), so a deployment's existing filter files work with Kiln.
//!
//! The format (Firecracker 1.17: bincode 2, fixed-width integers, little-endian) is a map from
//! thread kind to BPF program: a `u64` entry count, then per entry the kind's name as a `u64`
//! length and UTF-8 bytes, and the program as a `u64` instruction count and that many 8-byte
//! instructions, each a `sock_filter` (`u16` code, `u8` jt, `u8` jf, `u32` k) as it lies in
//! memory. Names are compared in lower case, as Firecracker does; an empty program means no
//! filter for that kind.
//!
//! Every count is checked against what is left of the input before anything is allocated, the
//! whole input is at most [`MAX_BYTES`] (Firecracker's limit), and trailing bytes are refused.

use seccompiler::{sock_filter, BpfProgram};

/// The largest compiled file read (Firecracker's deserialization limit).
pub const MAX_BYTES: usize = 100_000;
/// The longest program the kernel takes.
pub const MAX_INSTRUCTIONS: u64 = 4096;
/// The longest thread-kind name read.
const MAX_NAME: u64 = 64;

/// Why bytes are not a compiled filter file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Over [`MAX_BYTES`].
    #[error("{0} bytes, more than the {MAX_BYTES} a compiled filter file may have")]
    TooLarge(usize),
    /// The input ends inside a field.
    #[error("it ends early, at byte {0}")]
    Truncated(usize),
    /// A name longer than [`MAX_NAME`] or not UTF-8.
    #[error("thread kind name at byte {0} is not a short UTF-8 string")]
    BadName(usize),
    /// A program longer than the kernel allows.
    #[error(
        "the {kind} program has {len} instructions; the kernel takes at most {MAX_INSTRUCTIONS}"
    )]
    ProgramTooLong {
        /// The thread kind.
        kind: String,
        /// Its instruction count.
        len: u64,
    },
    /// Bytes after the last entry.
    #[error("{0} bytes follow the last entry")]
    Trailing(usize),
    /// The same kind twice.
    #[error("thread kind {0:?} appears twice")]
    Duplicate(String),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(DecodeError::Truncated(self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Each thread kind's name (lower case) and program, in file order.
pub fn decode(bytes: &[u8]) -> Result<Vec<(String, BpfProgram)>, DecodeError> {
    if bytes.len() > MAX_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let mut r = Reader { bytes, at: 0 };
    let entries = r.u64()?;
    // Each entry takes at least 16 bytes (two lengths).
    if entries > (r.left() / 16) as u64 {
        return Err(DecodeError::Truncated(r.at));
    }
    let mut out: Vec<(String, BpfProgram)> = Vec::new();
    for _ in 0..entries {
        let name_at = r.at;
        let name_len = r.u64()?;
        if name_len > MAX_NAME {
            return Err(DecodeError::BadName(name_at));
        }
        // name_len <= 64, so the cast cannot truncate.
        let name = std::str::from_utf8(r.take(name_len as usize)?)
            .map_err(|_| DecodeError::BadName(name_at))?
            .to_lowercase();
        let len = r.u64()?;
        if len > MAX_INSTRUCTIONS {
            return Err(DecodeError::ProgramTooLong { kind: name, len });
        }
        // len <= 4096: the multiplication cannot overflow.
        let code = r.take(len as usize * 8)?;
        let program = code
            .chunks_exact(8)
            .map(|i| sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect();
        if out.iter().any(|(existing, _)| *existing == name) {
            return Err(DecodeError::Duplicate(name));
        }
        out.push((name, program));
    }
    if r.left() != 0 {
        return Err(DecodeError::Trailing(r.left()));
    }
    Ok(out)
}

/// Writes programs in the compiled format (what `seccompiler-bin` would write for them).
pub fn encode(programs: &[(&str, &BpfProgram)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(programs.len() as u64).to_le_bytes());
    for (name, program) in programs {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for i in program.iter() {
            out.extend_from_slice(&i.code.to_le_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend_from_slice(&i.k.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(n: u16) -> BpfProgram {
        (0..n)
            .map(|i| sock_filter {
                code: 0x06 + i,
                jt: i as u8,
                jf: 2,
                k: 0x7fff_0000 + u32::from(i),
            })
            .collect()
    }

    #[test]
    fn round_trip_and_lower_case_names() {
        let (api, vmm) = (program(3), program(0));
        let bytes = encode(&[("API", &api), ("vmm", &vmm)]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].0, "api");
        assert_eq!(decoded[0].1.len(), 3);
        assert_eq!(decoded[0].1[2].k, 0x7fff_0002);
        assert_eq!(decoded[0].1[1].jt, 1);
        assert!(decoded[1].1.is_empty());
        // The layout: a count, then a length-prefixed name and program.
        assert_eq!(&bytes[..8], &2u64.to_le_bytes());
        assert_eq!(&bytes[8..16], &3u64.to_le_bytes());
        assert_eq!(&bytes[16..19], b"API");
    }

    #[test]
    fn hostile_files_are_refused_without_allocating() {
        let api = program(2);
        let good = encode(&[("api", &api)]);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError::Trailing(1)));
        let mut huge_count = good.clone();
        huge_count[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge_count),
            Err(DecodeError::Truncated(_))
        ));
        let mut huge_program = good.clone();
        huge_program[19..27].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge_program),
            Err(DecodeError::ProgramTooLong { .. })
        ));
        let mut long_name = good.clone();
        long_name[8..16].copy_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(decode(&long_name), Err(DecodeError::BadName(8))));
        let twice = encode(&[("api", &api), ("API", &api)]);
        assert_eq!(decode(&twice), Err(DecodeError::Duplicate("api".into())));
        assert!(matches!(
            decode(&vec![0; MAX_BYTES + 1]),
            Err(DecodeError::TooLarge(_))
        ));
    }
}
