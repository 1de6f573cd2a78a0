//! The JSON bodies of Kiln's API, in Firecracker's exact shape.
//!
//! Every type here mirrors one definition of Firecracker's OpenAPI document (`api/openapi.yaml` is
//! Kiln's copy): the same field names, the same required and optional fields, the same defaults and
//! the same enum strings. All of them deserialize with `deny_unknown_fields`, so a misspelt field is
//! an error naming it rather than a silently ignored setting.
//!
//! Parsing is two steps, both done once at the API edge by [`crate::routes::parse_request`]:
//! 1. serde turns the body into one of these types (wrong types, unknown fields, unknown enum
//!    strings and out-of-range integers fail here, with serde_json's message);
//! 2. the type's `validate()` checks what serde cannot: ID syntax, ranges, and the Firecracker
//!    features Kiln accepts in the schema but does not implement (SMT, CPU templates, huge pages,
//!    vhost-user drives). Those fail with a [`ValidationError`].

mod balloon;
mod boot;
mod drive;
mod entropy;
mod fs;
mod instance;
mod logging;
mod machine;
mod mmds;
mod net;
mod serial;
mod snapshot;
mod vm_config;
mod vsock;

use std::path::Path;

pub use ::devices::rate_limiter::{RateLimiterConfig, RateLimiterError, TokenBucketConfig};

pub use balloon::{
    Balloon, BalloonStartCmd, BalloonStats, BalloonStatsUpdate, BalloonUpdate, HintingStatus,
    MAX_BALLOON_MIB,
};
pub use boot::BootSource;
pub use drive::{is_partuuid, CacheType, Drive, IoEngine, PartialDrive};
pub use entropy::EntropyDevice;
pub use fs::FsDevice;
pub use instance::{
    ActionType, ApiError, FirecrackerVersion, InstanceActionInfo, InstanceInfo, InstanceState, Vm,
    VmState,
};
pub use logging::{LogLevel, Logger, Metrics};
pub use machine::{
    CpuTemplate, HugePages, MachineConfiguration, MachineConfigurationPatch, DEFAULT_MEM_SIZE_MIB,
    MAX_VCPUS,
};
pub use mmds::{MmdsConfig, MmdsVersion, DEFAULT_MMDS_IPV4};
pub use net::{is_tap_name, MacAddr, NetworkInterface, PartialNetworkInterface, IFNAMSIZ};
pub use serial::SerialDevice;
pub use snapshot::{
    DriveOverride, MemoryBackend, MemoryBackendType, MemorySource, NetworkOverride,
    SnapshotCreateParams, SnapshotHugePages, SnapshotLoadParams, SnapshotType, VsockOverride,
};
pub use vm_config::FullVmConfiguration;
pub use vsock::Vsock;

/// Longest resource ID (`drive_id`, `iface_id`) Kiln accepts.
pub const MAX_ID_LEN: usize = 64;

/// A body that deserialized but describes a configuration Kiln cannot or will not run.
///
/// Messages copy Firecracker's text where Firecracker has the same check.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// A resource ID is the empty string (Firecracker's text).
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// A resource ID has a character other than an ASCII letter, digit or `_`.
    #[error(
        "API Resource IDs can only contain alphanumeric characters and underscores; \
         {id:?} does not."
    )]
    InvalidIdCharacters {
        /// The rejected ID.
        id: String,
    },
    /// A resource ID is longer than [`MAX_ID_LEN`].
    #[error("API Resource IDs can be at most {MAX_ID_LEN} characters long; {id:?} has {len}.")]
    IdTooLong {
        /// The rejected ID.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A host path field is the empty string.
    #[error("{field} cannot be empty.")]
    EmptyPath {
        /// The JSON field name.
        field: &'static str,
    },
    /// A path or command line contains a NUL byte, which no Linux path or C string can.
    #[error("{field} cannot contain a NUL character.")]
    NulCharacter {
        /// The JSON field name.
        field: &'static str,
    },
    /// `vcpu_count` is outside 1..=32 (Firecracker's text).
    #[error(
        "The number of vCPUs must be greater than 0, less than {MAX_VCPUS} and must be 1 or an \
         even number if SMT is enabled."
    )]
    InvalidVcpuCount(u8),
    /// `mem_size_mib` is 0 (Firecracker's text).
    #[error("The memory size (MiB) is either 0, or not a multiple of the configured page size.")]
    InvalidMemorySize(u64),
    /// `mem_size_mib` does not fit in a 64-bit byte count.
    #[error("The memory size (MiB) {0} is too large: it must be at most {max} MiB.", max = u64::MAX >> 20)]
    MemorySizeTooLarge(u64),
    /// `smt: true`.
    #[error("Kiln does not support SMT: smt must be false.")]
    SmtNotSupported,
    /// A `cpu_template` other than `"None"`.
    #[error("Kiln does not support CPU templates: cpu_template must be \"None\", not \"{0}\".")]
    CpuTemplateNotSupported(CpuTemplate),
    /// A `huge_pages` value other than `"None"`.
    #[error("Kiln does not support huge pages: huge_pages must be \"None\", not \"{0}\".")]
    HugePagesNotSupported(HugePages),
    /// A virtio-fs device's field is out of range.
    #[error("fs: {0}")]
    FsDevice(String),
    /// A drive with `socket` (vhost-user-block).
    #[error(
        "Drive {drive_id:?}: vhost-user block devices (socket) are not supported by Kiln; \
         give path_on_host instead."
    )]
    VhostUserNotSupported {
        /// The drive's ID.
        drive_id: String,
    },
    /// A `partuuid` that is not a partition UUID (it goes on the guest's command line).
    #[error(
        "Drive {drive_id:?}: partuuid {partuuid:?} is not a partition UUID: it must be 1 to 36 \
         hex digits and dashes, such as \"0eaa91a0-01\"."
    )]
    InvalidPartuuid {
        /// The drive's ID.
        drive_id: String,
        /// The rejected value.
        partuuid: String,
    },
    /// A drive without `path_on_host` (optional in Firecracker only for vhost-user drives).
    #[error("Drive {drive_id:?}: path_on_host is required.")]
    MissingPathOnHost {
        /// The drive's ID.
        drive_id: String,
    },
    /// `host_dev_name` cannot name a Linux network interface.
    #[error(
        "host_dev_name {name:?} is not a valid tap device name: it must be 1 to {max} bytes \
         without '/', NUL or whitespace.",
        max = IFNAMSIZ - 1
    )]
    InvalidHostDevName {
        /// The rejected name.
        name: String,
    },
    /// `mtu` outside 68..=65535.
    #[error("Network interface {iface_id:?}: mtu {mtu} is out of range (68 to 65535).")]
    InvalidMtu {
        /// The interface's ID.
        iface_id: String,
        /// The rejected MTU.
        mtu: u16,
    },
    /// `guest_cid` is 0, 1, 2 (reserved for the hypervisor, local and host) or `u32::MAX` (any).
    #[error("Vsock guest_cid {0} is reserved: it must be between 3 and 4294967294.")]
    InvalidGuestCid(u32),
    /// A balloon size whose page count does not fit the device's 32-bit counter.
    #[error(
        "Amount of pages requested is too large: {0} MiB, the most a balloon holds is \
         {max} MiB.",
        max = balloon::MAX_BALLOON_MIB
    )]
    BalloonTooLarge(u32),
    /// A rate limiter's buckets contradict each other.
    #[error("{field}: {source}")]
    RateLimiter {
        /// The JSON field holding the rate limiter (`rate_limiter`, `rx_rate_limiter`, ...).
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: RateLimiterError,
    },
    /// The same ID appears twice in a list of the configuration file.
    #[error("{list}: the ID {id:?} appears more than once.")]
    DuplicateId {
        /// `drives` or `network-interfaces`.
        list: &'static str,
        /// The repeated ID.
        id: String,
    },
    /// `PUT /snapshot/load` with neither `mem_file_path` nor `mem_backend` (Firecracker's text).
    #[error("missing field: either `mem_backend` or `mem_file_path` is required")]
    SnapshotNoMemSource,
    /// `PUT /snapshot/load` with both (Firecracker's text).
    #[error("too many fields: either `mem_backend` or `mem_file_path` exclusively is required")]
    SnapshotTwoMemSources,
    /// `PUT /mmds/config` with no interface (Firecracker's text).
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    MmdsNoInterfaces,
    /// An MMDS address outside 169.254.0.0/16 (Firecracker's text).
    #[error("The MMDS IPv4 address is not link local: {0}.")]
    MmdsAddressNotLinkLocal(std::net::Ipv4Addr),
    /// More than one drive has `is_root_device: true` (Firecracker's text).
    #[error("A root block device already exists!")]
    SecondRootDevice,
}

/// Checks a resource ID the way Firecracker's `checked_id` does, but ASCII-only and with a length
/// limit: 1 to [`MAX_ID_LEN`] characters, each an ASCII letter, digit or `_`.
pub fn check_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::EmptyId);
    }
    if !id.bytes().all(|b| b == b'_' || b.is_ascii_alphanumeric()) {
        return Err(ValidationError::InvalidIdCharacters { id: id.to_string() });
    }
    if id.len() > MAX_ID_LEN {
        return Err(ValidationError::IdTooLong {
            id: id.to_string(),
            len: id.len(),
        });
    }
    Ok(())
}

/// Checks that a host path given in a body is usable: not empty, no NUL byte.
fn check_path(field: &'static str, path: &Path) -> Result<(), ValidationError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.is_empty() {
        return Err(ValidationError::EmptyPath { field });
    }
    if bytes.contains(&0) {
        return Err(ValidationError::NulCharacter { field });
    }
    Ok(())
}

/// Validates an optional rate limiter, naming the field it came from in the error.
fn check_rate_limiter(
    field: &'static str,
    limiter: Option<&RateLimiterConfig>,
) -> Result<(), ValidationError> {
    match limiter {
        Some(limiter) => limiter
            .validate()
            .map_err(|source| ValidationError::RateLimiter { field, source }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_firecracker_rules() {
        check_id("rootfs").unwrap();
        check_id("eth_0").unwrap();
        check_id("1").unwrap();
        check_id(&"a".repeat(MAX_ID_LEN)).unwrap();

        assert_eq!(
            check_id("").unwrap_err().to_string(),
            "The ID cannot be empty."
        );
        for bad in ["a-b", "a b", "a/b", "a.b", "é", "../x"] {
            let err = check_id(bad).unwrap_err();
            assert!(
                matches!(&err, ValidationError::InvalidIdCharacters { id } if id == bad),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().starts_with(
                "API Resource IDs can only contain alphanumeric characters and underscores"
            ));
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            check_id(&long),
            Err(ValidationError::IdTooLong { len, .. }) if len == MAX_ID_LEN + 1
        ));
    }

    #[test]
    fn paths_must_be_non_empty_without_nul() {
        check_path("path_on_host", Path::new("/x")).unwrap();
        assert_eq!(
            check_path("path_on_host", Path::new(""))
                .unwrap_err()
                .to_string(),
            "path_on_host cannot be empty."
        );
        assert!(matches!(
            check_path("uds_path", Path::new("/a\0b")),
            Err(ValidationError::NulCharacter { field: "uds_path" })
        ));
    }

    #[test]
    fn rate_limiter_errors_name_the_field() {
        let bad = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 100,
                one_time_burst: None,
                refill_time: 0,
            }),
            ops: None,
        };
        let err = check_rate_limiter("rx_rate_limiter", Some(&bad)).unwrap_err();
        assert!(err.to_string().starts_with("rx_rate_limiter: "), "{err}");
        check_rate_limiter("rate_limiter", None).unwrap();
        check_rate_limiter("rate_limiter", Some(&RateLimiterConfig::default())).unwrap();
    }
}
