//! Kiln's API front end: Firecracker's REST API on a Unix socket.
//!
//! - [`http`]: HTTP/1.1 on a Unix socket, bounded in every dimension (head size, payload size,
//!   connections, time per request), served on one `kiln_api` thread.
//! - [`models`]: the JSON bodies, in Firecracker's exact shape, parsed with `deny_unknown_fields`
//!   and validated once.
//! - [`routes`]: method and path to one [`routes::ApiRequest`], or a 400 with Firecracker's fault
//!   message; `api/openapi.yaml` lists exactly the routes served (a test keeps them equal).
//!
//! - [`outcome`]: what the VMM answers a request with ([`outcome::VmmData`] or
//!   [`outcome::VmmActionError`]), turned into HTTP here and nowhere else.
//!
//! This crate never touches a VM: the VMM receives each [`routes::ApiRequest`] and answers it
//! with a [`outcome::VmmOutcome`].

pub mod http;
pub mod models;
pub mod outcome;
pub mod routes;
