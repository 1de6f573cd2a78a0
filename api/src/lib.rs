//! Kiln's API front end: Firecracker's REST API on a Unix socket (issue 4).
//!
//! Its requests will reach the VMM as one request enum over a channel; this crate never touches a
//! VM. Until then it holds no code: `kiln run` is driven from the command line alone.
