//! The snapshot state file: a fixed header, the state as JSON, and a CRC-64 over both.
//!
//! ```text
//! offset  size  field
//! 0       8     magic: "KILNSNAP" for x86_64, "KILNSNPA" for aarch64
//! 8       2     format major version (little-endian)
//! 10      2     format minor version
//! 12      4     reserved, zero
//! 16      8     length N of the state in bytes
//! 24      N     the state, JSON (`MicrovmState`)
//! 24+N    8     CRC-64/XZ of bytes 0 .. 24+N
//! ```
//!
//! Compatibility rule: a Kiln reads a state file whose major version equals its own and whose
//! minor version is at most its own. A minor version adds optional fields only (older files
//! lack them and get their defaults); anything else is a new major version. Files of another
//! architecture, a newer version, a wrong length, a bad checksum, more than
//! [`MAX_STATE_BYTES`] of state, or state that is not a `MicrovmState`, are refused with an
//! error saying which; nothing is trusted before the checksum matched.

use std::io::Read;

use serde::{de::DeserializeOwned, Serialize};

/// The state file's magic number on this architecture.
#[cfg(target_arch = "x86_64")]
pub const MAGIC: [u8; 8] = *b"KILNSNAP";
/// The state file's magic number on this architecture.
#[cfg(target_arch = "aarch64")]
pub const MAGIC: [u8; 8] = *b"KILNSNPA";

/// Magic numbers of every architecture, to name a foreign file's.
const KNOWN_MAGICS: [(&[u8; 8], &str); 2] = [(b"KILNSNAP", "x86_64"), (b"KILNSNPA", "aarch64")];

/// The format version this Kiln writes (and the newest it reads).
pub const VERSION: (u16, u16) = (1, 0);

/// The most state a file may hold (a microVM's is tens of KiB per vCPU).
pub const MAX_STATE_BYTES: u64 = 16 << 20;

const HEADER_LEN: usize = 24;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is shorter than its header says.
    #[error("the snapshot file is truncated ({0} bytes)")]
    Truncated(u64),
    /// Not a Kiln snapshot at all.
    #[error("not a Kiln snapshot file (magic {0:02x?})")]
    NotASnapshot([u8; 8]),
    /// A snapshot of another architecture.
    #[error("the snapshot is of an {0} microVM; this Kiln runs {arch} microVMs", arch = std::env::consts::ARCH)]
    ForeignArch(&'static str),
    /// A format this Kiln does not read.
    #[error("the snapshot's format version is {}.{}; this Kiln reads {}.0 to {}.{}", .0.0, .0.1, VERSION.0, VERSION.0, VERSION.1)]
    Version((u16, u16)),
    /// More state than any microVM has.
    #[error("the snapshot's state is {0} bytes, more than the {MAX_STATE_BYTES} allowed")]
    TooLarge(u64),
    /// Bytes after the checksum.
    #[error("the snapshot file has {0} bytes after its end")]
    TrailingBytes(u64),
    /// The checksum does not match: the file was damaged.
    #[error("the snapshot file is corrupted (CRC-64 {found:#018x}, expected {expected:#018x})")]
    Checksum {
        /// The checksum in the file.
        found: u64,
        /// The checksum of its contents.
        expected: u64,
    },
    /// The state is not what this Kiln saves.
    #[error("the snapshot's state cannot be read: {0}")]
    State(#[from] serde_json::Error),
}

/// Serializes `state` into a state file's bytes.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    Ok(frame(&serde_json::to_vec(state)?))
}

/// A state file around `json`: header, the bytes as given, checksum (what [`encode`] writes;
/// the fuzz target frames arbitrary bytes with it to reach the state's parser).
pub fn frame(json: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + json.len() + 8);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.0.to_le_bytes());
    bytes.extend_from_slice(&VERSION.1.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(json);
    let crc = CRC.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The header's version, if `header` is a header of this architecture.
fn check_header(header: &[u8; HEADER_LEN]) -> Result<((u16, u16), u64), FormatError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&header[..8]);
    if magic != MAGIC {
        return Err(match KNOWN_MAGICS.iter().find(|(m, _)| **m == magic) {
            Some((_, arch)) => FormatError::ForeignArch(arch),
            None => FormatError::NotASnapshot(magic),
        });
    }
    let version = (
        u16::from_le_bytes([header[8], header[9]]),
        u16::from_le_bytes([header[10], header[11]]),
    );
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    Ok((version, u64::from_le_bytes(len)))
}

/// The format version of a state file, read from its header alone (`--describe-snapshot`).
pub fn read_version(reader: &mut impl Read) -> Result<(u16, u16), FormatError> {
    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| FormatError::Truncated(0))?;
    Ok(check_header(&header)?.0)
}

/// Reads and checks a state file from `reader` (at most [`MAX_STATE_BYTES`] of state are ever
/// read), then deserializes its state.
pub fn decode<T: DeserializeOwned>(reader: &mut impl Read) -> Result<T, FormatError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_up_to(reader, &mut header)?;
    if got < HEADER_LEN {
        return Err(FormatError::Truncated(got as u64));
    }
    let (version, len) = check_header(&header)?;
    if version.0 != VERSION.0 || version.1 > VERSION.1 {
        return Err(FormatError::Version(version));
    }
    if len > MAX_STATE_BYTES {
        return Err(FormatError::TooLarge(len));
    }
    let mut rest = vec![0u8; len as usize + 8];
    let got = read_up_to(reader, &mut rest)?;
    if got < rest.len() {
        return Err(FormatError::Truncated((HEADER_LEN + got) as u64));
    }
    let mut extra = [0u8; 1];
    if read_up_to(reader, &mut extra)? != 0 {
        return Err(FormatError::TrailingBytes(1));
    }
    let (json, crc) = rest.split_at(len as usize);
    let mut digest = CRC.digest();
    digest.update(&header);
    digest.update(json);
    let expected = digest.finalize();
    let mut found = [0u8; 8];
    found.copy_from_slice(crc);
    let found = u64::from_le_bytes(found);
    if found != expected {
        return Err(FormatError::Checksum { found, expected });
    }
    Ok(serde_json::from_slice(json)?)
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u32>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            values: vec![1, 2, 3],
        }
    }

    fn decode_bytes(bytes: &[u8]) -> Result<Sample, FormatError> {
        decode(&mut &bytes[..])
    }

    #[test]
    fn a_state_file_reads_back_as_written() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], &MAGIC);
        assert_eq!(decode_bytes(&bytes).unwrap(), sample());
        assert_eq!(read_version(&mut &bytes[..]).unwrap(), VERSION);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            let err = decode_bytes(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated(_)),
                "{len} bytes: {err}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_bytes(&longer),
            Err(FormatError::TrailingBytes(_))
        ));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(decode_bytes(&damaged).is_err(), "byte {at} bit {bit}");
            }
        }
    }

    #[test]
    fn foreign_newer_oversized_and_bogus_files_are_named() {
        let bytes = encode(&sample()).unwrap();
        let mut foreign = bytes.clone();
        let other = KNOWN_MAGICS.iter().find(|(m, _)| **m != MAGIC).unwrap();
        foreign[..8].copy_from_slice(other.0);
        let err = decode_bytes(&foreign).unwrap_err();
        assert!(matches!(err, FormatError::ForeignArch(_)), "{err}");
        assert!(err.to_string().contains(other.1), "{err}");

        let mut newer = bytes.clone();
        newer[10..12].copy_from_slice(&(VERSION.1 + 1).to_le_bytes());
        assert!(matches!(decode_bytes(&newer), Err(FormatError::Version(_))));
        let mut next_major = bytes.clone();
        next_major[8..10].copy_from_slice(&(VERSION.0 + 1).to_le_bytes());
        assert!(matches!(
            decode_bytes(&next_major),
            Err(FormatError::Version(_))
        ));

        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_bytes(&huge), Err(FormatError::TooLarge(_))));

        let err = decode_bytes(b"\x7fELF and the rest of a kernel..").unwrap_err();
        assert!(matches!(err, FormatError::NotASnapshot(_)), "{err}");
    }

    #[test]
    fn a_checksummed_file_of_the_wrong_shape_is_refused() {
        let bytes = encode(&vec!["not", "a", "sample"]).unwrap();
        assert!(matches!(decode_bytes(&bytes), Err(FormatError::State(_))));
    }
}
