//! Shared by the vsock unit tests: a scratch directory for sockets and guest packet headers.

use std::path::PathBuf;

use super::packet::{Op, PacketHeader, HOST_CID, TYPE_STREAM};

/// The guest CID every test uses.
pub const GUEST_CID: u64 = 3;

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for test `name` and the socket path `v.sock` inside it.
pub fn socket_dir(name: &str) -> (PathBuf, TempDir) {
    let dir = std::env::temp_dir().join(format!("kiln-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("v.sock"), TempDir(dir))
}

/// A stream packet from the guest to the host, advertising 256 KiB of buffer.
pub fn guest_header(op: Op, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}
