//! MMDS against a hostile guest: Ethernet frames of any shape sent to the MMDS address (ARP,
//! IPv4, TCP segments in any order, truncated headers, bad lengths) through the stack, and HTTP
//! requests of any bytes through the parser and both versions' answers. Nothing may panic, and
//! the stack's queues stay within their bounds.
//!
//! Input: a first byte (bit 0: version 2, bit 1: IMDS compat, bit 2: feed the rest to the HTTP
//! parser instead), then frames as `[len_lo, len_hi, bytes...]`; each frame's ethertype and
//! destination address are set to MMDS's when it is long enough and the frame's first byte is
//! odd, so most inputs reach smoltcp rather than stopping at the address check.

#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use devices::mmds::http::{self, Parsed};
use devices::mmds::stack::MAX_QUEUED_FRAMES;
use devices::mmds::{MmdsStack, MmdsStackConfig, MmdsStore, MmdsVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let store = MmdsStore::shared(4096);
    {
        let mut s = store.lock().unwrap();
        let version = if mode & 1 != 0 {
            MmdsVersion::V2
        } else {
            MmdsVersion::V1
        };
        s.configure(version, mode & 2 != 0);
        s.put(serde_json::json!({"latest": {"meta-data": {"id": "i-1", "n": 1, "l": [1, "a"]}}}))
            .unwrap();
    }
    if mode & 4 != 0 {
        if let Parsed::Complete(request, len) = http::parse(rest) {
            assert!(len <= rest.len());
            let mut s = store.lock().unwrap();
            let response = http::respond(&mut s, &request, Instant::now());
            let bytes = response.to_bytes();
            assert!(bytes.starts_with(b"HTTP/1.1 "));
        }
        return;
    }
    let mmds_ip = Ipv4Addr::new(169, 254, 169, 254);
    let mut stack = MmdsStack::new(MmdsStackConfig {
        ipv4: mmds_ip,
        store,
    });
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let mut frame = rest[2..2 + len].to_vec();
        rest = &rest[2 + len..];
        if frame.first().is_some_and(|b| b & 1 == 1) && frame.len() >= 42 {
            if frame[13] & 1 == 0 {
                frame[12..14].copy_from_slice(&[0x08, 0x00]);
                frame[30..34].copy_from_slice(&mmds_ip.octets());
            } else {
                frame[12..14].copy_from_slice(&[0x08, 0x06]);
                frame[38..42].copy_from_slice(&mmds_ip.octets());
            }
        }
        if stack.is_for_mmds(&frame) {
            stack.take_frame(&frame);
        }
        let mut out = 0;
        while let Some(answer) = stack.next_frame() {
            assert!(answer.len() <= 1514, "{} bytes", answer.len());
            out += 1;
            assert!(out <= MAX_QUEUED_FRAMES);
        }
    }
});
