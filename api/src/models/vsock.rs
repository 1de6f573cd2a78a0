//! `PUT /vsock`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_path, ValidationError};

/// The body of `PUT /vsock`: a virtio-vsock device backed by Unix sockets on the host.
///
/// Host-initiated connections go through the socket at `uds_path` (`CONNECT <port>\n`);
/// guest-initiated connections to port P reach a listener at `<uds_path>_<P>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context ID, at least 3.
    pub guest_cid: u32,
    /// Path of the host-side Unix socket.
    pub uds_path: PathBuf,
}

impl Vsock {
    /// Checks that the CID is not reserved and the socket path is usable.
    pub fn validate(&self) -> Result<(), ValidationError> {
        // 0 hypervisor, 1 local, 2 host; u32::MAX is VMADDR_CID_ANY.
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(ValidationError::InvalidGuestCid(self.guest_cid));
        }
        check_path("uds_path", &self.uds_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_and_without_deprecated_id() {
        let v: Vsock = serde_json::from_str(r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#).unwrap();
        v.validate().unwrap();
        assert_eq!(v.vsock_id, None);
        let v: Vsock =
            serde_json::from_str(r#"{"vsock_id":"root","guest_cid":52,"uds_path":"/tmp/v.sock"}"#)
                .unwrap();
        v.validate().unwrap();
        assert_eq!(v.vsock_id.as_deref(), Some("root"));
    }

    #[test]
    fn rejects_reserved_cids_and_bad_types() {
        for cid in [0u32, 1, 2, u32::MAX] {
            let v = Vsock {
                vsock_id: None,
                guest_cid: cid,
                uds_path: "/v".into(),
            };
            assert!(matches!(v.validate(), Err(ValidationError::InvalidGuestCid(c)) if c == cid));
        }
        let err = serde_json::from_str::<Vsock>(r#"{"guest_cid":4294967296,"uds_path":"/v"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("expected u32"), "{err}");
        let err = serde_json::from_str::<Vsock>(r#"{"guest_cid":3}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `uds_path`"),
            "{err}"
        );
    }
}
