//! The byte pattern and checksum of the vsock end-to-end tests, shared with the guest tool
//! `guest-images/tools/kiln-vsock.c`: both sides must produce and check the very same bytes.
//!
//! Pattern: the stream for seed `s` is xorshift32 started at `s ^ 0x9E3779B9` (1 if that is 0);
//! each byte is `x ^= x << 13; x ^= x >> 17; x ^= x << 5; byte = x & 0xff`.
//!
//! Checksum: FNV-1a 64 over the bytes, written as 16 lowercase hex digits ([`fnv_hex`]), as in
//! the guest's `SINK` reply `<nbytes> <fnv64hex>\n` and its `ok` lines.
//!
//! Also the host's client side of Firecracker's hybrid vsock: [`connect_guest`] and
//! [`read_line`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Mixed into the seed so that small seeds (0, 1, 2: connection indices) start far apart.
const SEED_MIX: u32 = 0x9E37_79B9;

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The endless byte stream for one seed (xorshift32, low byte of each step).
///
/// An [`Iterator`] that never ends; [`Pattern::fill`] is the fast way to take many bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    x: u32,
}

impl Pattern {
    /// The stream for `seed`, positioned at its first byte.
    #[must_use]
    pub fn new(seed: u32) -> Self {
        let x = seed ^ SEED_MIX;
        // xorshift32 never leaves 0, so that one seed starts from 1 instead.
        Pattern {
            x: if x == 0 { 1 } else { x },
        }
    }

    /// The next byte of the stream.
    #[inline]
    pub fn next_byte(&mut self) -> u8 {
        let mut x = self.x;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.x = x;
        x.to_le_bytes()[0]
    }

    /// Fill `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_byte();
        }
    }

    /// Compare `buf` with the next `buf.len()` bytes of the stream: `None` if they all match,
    /// else `Some((index, expected byte))` for the first that differs (the stream is then just
    /// past that byte).
    #[must_use = "the mismatch is the result"]
    pub fn check(&mut self, buf: &[u8]) -> Option<(usize, u8)> {
        for (i, &b) in buf.iter().enumerate() {
            let want = self.next_byte();
            if b != want {
                return Some((i, want));
            }
        }
        None
    }
}

impl Iterator for Pattern {
    type Item = u8;

    #[inline]
    fn next(&mut self) -> Option<u8> {
        Some(self.next_byte())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

/// The first `len` bytes of the stream for `seed`.
#[must_use]
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Pattern::new(seed).fill(&mut v);
    v
}

/// Incremental FNV-1a 64: feed bytes with [`Fnv64::update`] in any pieces, read the hash with
/// [`Fnv64::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv64 {
    h: u64,
}

impl Fnv64 {
    /// The hash of no bytes yet (the offset basis).
    #[must_use]
    pub fn new() -> Self {
        Fnv64 { h: FNV_OFFSET }
    }

    /// Hash `bytes` after everything fed so far.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.h;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.h = h;
    }

    /// The hash of everything fed so far (more can still be fed afterwards).
    #[must_use]
    pub fn finish(&self) -> u64 {
        self.h
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a 64 of `bytes`.
#[must_use]
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut f = Fnv64::new();
    f.update(bytes);
    f.finish()
}

/// A hash as the guest tool prints it: 16 lowercase hex digits, zero-padded.
#[must_use]
pub fn fnv_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// Reads one `\n`-terminated line (without it), byte by byte so nothing after it is consumed;
/// stops at EOF or after 128 bytes.
pub fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() <= 128 {
        if stream.read(&mut byte)? == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Connects to guest `port` through the hybrid socket `uds` (`CONNECT port` / `OK ...`),
/// retrying every half second until `deadline` while the guest is not listening yet (it
/// answers RST and the client is closed without `OK`). Panics at the deadline.
pub fn connect_guest(uds: &Path, port: u32, deadline: Instant) -> UnixStream {
    loop {
        assert!(
            Instant::now() < deadline,
            "guest port {port} never accepted"
        );
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(60))).ok();
            if s.write_all(format!("CONNECT {port}\n").as_bytes()).is_ok() {
                if let Ok(line) = read_line(&mut s) {
                    if line.starts_with("OK ") {
                        s.set_read_timeout(Some(Duration::from_secs(300))).ok();
                        return s;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Cross-check vectors, computed with the C code of guest-images/tools/kiln-vsock.c.

    #[test]
    fn first_bytes_match_the_guest_tool() {
        assert_eq!(
            pattern(0, 8),
            [0x19, 0x3e, 0x3a, 0xb5, 0x1f, 0x37, 0xd0, 0xbf]
        );
        assert_eq!(
            pattern(1, 8),
            [0x38, 0x3f, 0xff, 0xfa, 0xce, 0xe7, 0xca, 0x0d]
        );
        assert_eq!(
            pattern(0xffff_ffff, 8),
            [0x06, 0xc1, 0x79, 0x6f, 0x8e, 0xdb, 0x60, 0x44]
        );
    }

    #[test]
    fn seed_that_mixes_to_zero_starts_from_one() {
        // 0x9E3779B9 ^ 0x9E3779B9 == 0, which xorshift32 would never leave.
        assert_eq!(Pattern::new(SEED_MIX), Pattern { x: 1 });
        assert_eq!(
            pattern(SEED_MIX, 8),
            [0x21, 0x01, 0xc5, 0x4f, 0xd1, 0xd0, 0x1a, 0xb2]
        );
    }

    #[test]
    fn one_mib_checksums_match_the_guest_tool() {
        let zero = pattern(0, 1 << 20);
        assert_eq!(fnv64(&zero), 0x1846_d325_7d44_728c);
        assert_eq!(fnv_hex(fnv64(&zero)), "1846d3257d44728c");
        assert_eq!(fnv64(&pattern(1, 1 << 20)), 0x44eb_66da_a349_0a11);
        assert_eq!(fnv64(&pattern(0, 1000)), 0x8218_fa0a_5568_cd33);
    }

    #[test]
    fn fnv_known_vectors() {
        // The FNV-1a 64 test vectors of the reference implementation.
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv_hex(fnv64(b"")), "cbf29ce484222325");
        // What `kiln-vsock send CID PORT 1 1` printed: one pattern byte of seed 1 (0x38).
        assert_eq!(fnv_hex(fnv64(&pattern(1, 1))), "af63b54c8601aa47");
    }

    #[test]
    fn fnv_hex_pads_to_16_digits() {
        assert_eq!(fnv_hex(0), "0000000000000000");
        assert_eq!(fnv_hex(0xab), "00000000000000ab");
        assert_eq!(fnv_hex(u64::MAX), "ffffffffffffffff");
    }

    #[test]
    fn fill_iterator_and_pattern_agree_across_pieces() {
        let whole = pattern(7, 100_000);
        let mut p = Pattern::new(7);
        let mut pieces = vec![0u8; whole.len()];
        let mut at = 0;
        for (k, len) in [1usize, 0, 7, 4096, 65536, 3].iter().cycle().enumerate() {
            if at == whole.len() {
                break;
            }
            let len = (*len + k % 3).min(whole.len() - at);
            p.fill(&mut pieces[at..at + len]);
            at += len;
        }
        assert_eq!(pieces, whole);
        let iterated: Vec<u8> = Pattern::new(7).take(whole.len()).collect();
        assert_eq!(iterated, whole);
    }

    #[test]
    fn incremental_fnv_matches_one_shot() {
        let data = pattern(3, 200_000);
        let mut f = Fnv64::default();
        for chunk in data.chunks(65_531) {
            f.update(chunk);
        }
        f.update(&[]);
        assert_eq!(f.finish(), fnv64(&data));
    }

    #[test]
    fn check_finds_the_first_wrong_byte() {
        let mut data = pattern(5, 5000);
        assert_eq!(Pattern::new(5).check(&data), None);
        let want = data[1234];
        data[1234] ^= 0x80;
        data[4000] ^= 1;
        let mut p = Pattern::new(5);
        assert_eq!(p.check(&data), Some((1234, want)));
        // Checking goes on right after the bad byte.
        assert_eq!(p.check(&data[1235..4000]), None);
        // Pieces are checked as one stream.
        let data = pattern(5, 5000);
        let mut p = Pattern::new(5);
        assert_eq!(p.check(&data[..10]), None);
        assert_eq!(p.check(&data[10..]), None);
        assert_ne!(Pattern::new(6).check(&data), None);
    }

    #[test]
    fn seeds_give_different_streams() {
        let streams: Vec<Vec<u8>> = (0..256).map(|s| pattern(s, 16)).collect();
        for i in 0..streams.len() {
            for j in i + 1..streams.len() {
                assert_ne!(streams[i], streams[j], "seeds {i} and {j}");
            }
        }
    }
}
