//! MMDS, the microVM metadata service, as Firecracker serves it: a JSON document the host sets
//! through the API (`PUT`/`PATCH`/`GET /mmds`) and the guest reads over HTTP at a link-local
//! address (169.254.169.254 by default) through the virtio-net interfaces named in
//! `PUT /mmds/config`.
//!
//! - [`store`]: the document, its size limit, JSON merge patches, and how a path of it is
//!   answered (JSON, or EC2's IMDS plain text);
//! - [`token`]: version 2's session tokens (`PUT /latest/api/token`, then requests that carry
//!   the token);
//! - [`http`]: the guest's HTTP requests, parsed with every length bounded, and the answers;
//! - [`stack`]: the network endpoint: a net device hands it every guest frame addressed to the
//!   MMDS address (ARP, IPv4), which never reaches the TAP, and takes its answer frames back for
//!   the guest. TCP is smoltcp's.
//!
//! One [`store::MmdsStore`] serves the API and every interface, behind a mutex that is held only
//! to answer one request.

pub mod http;
pub mod stack;
pub mod store;
pub mod token;

pub use stack::{MmdsStack, MmdsStackConfig};
pub use store::{MmdsStore, MmdsVersion, SharedMmds, StoreError};
