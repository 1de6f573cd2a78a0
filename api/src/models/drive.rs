//! `PUT` and `PATCH /drives/{drive_id}`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_id, check_path, check_rate_limiter, RateLimiterConfig, ValidationError};

/// How the block device treats guest flushes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are acknowledged without syncing the backing file (Firecracker's default).
    #[default]
    Unsafe,
    /// Flush requests sync the backing file; `VIRTIO_BLK_F_FLUSH` is offered.
    Writeback,
}

/// The I/O engine Firecracker would use for the backing file.
///
/// Kiln accepts both values and serves them the same way, with synchronous I/O on the device's
/// thread; `"Async"` (io_uring in Firecracker) is accepted so that clients that set it work
/// unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous `pread`/`pwrite` (Firecracker's default).
    #[default]
    Sync,
    /// io_uring in Firecracker; synchronous I/O in Kiln.
    Async,
}

/// The body of `PUT /drives/{drive_id}`: one virtio-block device.
///
/// `path_on_host` and `is_read_only` are optional in Firecracker's schema only because
/// vhost-user drives (`socket`) omit them. Kiln has no vhost-user support, so validation requires
/// `path_on_host` and refuses `socket`; `is_read_only` defaults to `false` as in Firecracker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Drive ID; must equal the `{drive_id}` of the path.
    pub drive_id: String,
    /// Unique id of the boot partition, used only when `is_root_device` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Whether this drive holds the guest's root filesystem.
    pub is_root_device: bool,
    /// Flush handling; `"Unsafe"` when absent.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Open the backing file read-only; `false` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Host path of the backing file. Required by Kiln.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// I/O rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// I/O engine; `"Sync"` when absent. Both values are served with synchronous I/O.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user-block backend socket. Refused by validation: not supported by Kiln.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Drive {
    /// Checks the ID, requires `path_on_host`, refuses `socket` and checks the rate limiter.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id(&self.drive_id)?;
        if self.socket.is_some() {
            return Err(ValidationError::VhostUserNotSupported {
                drive_id: self.drive_id.clone(),
            });
        }
        let Some(path) = &self.path_on_host else {
            return Err(ValidationError::MissingPathOnHost {
                drive_id: self.drive_id.clone(),
            });
        };
        check_path("path_on_host", path)?;
        if let Some(partuuid) = &self.partuuid {
            if !is_partuuid(partuuid) {
                return Err(ValidationError::InvalidPartuuid {
                    drive_id: self.drive_id.clone(),
                    partuuid: partuuid.clone(),
                });
            }
        }
        check_rate_limiter("rate_limiter", self.rate_limiter.as_ref())
    }

    /// Whether the drive is read-only (`is_read_only`, `false` when absent).
    pub fn read_only(&self) -> bool {
        self.is_read_only.unwrap_or(false)
    }
}

/// Whether `s` can follow `root=PARTUUID=` on a kernel command line: a GPT UUID, or an MBR disk
/// signature and partition number (`0eaa91a0-01`): hex digits and dashes, at most 36.
pub fn is_partuuid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// The body of `PATCH /drives/{drive_id}`: a new backing file and/or rate limiter for an
/// attached drive. Only the given fields change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Drive ID; must equal the `{drive_id}` of the path.
    pub drive_id: String,
    /// New host path of the backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// New I/O rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl PartialDrive {
    /// Checks the ID, the path if given, and the rate limiter if given.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id(&self.drive_id)?;
        if let Some(path) = &self.path_on_host {
            check_path("path_on_host", path)?;
        }
        check_rate_limiter("rate_limiter", self.rate_limiter.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::TokenBucketConfig;

    fn drive(json: &str) -> Drive {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn kata_style_body_takes_firecracker_defaults() {
        let d = drive(
            r#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true,"is_read_only":false}"#,
        );
        d.validate().unwrap();
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(d.io_engine, IoEngine::Sync);
        assert!(!d.read_only());
        assert_eq!(d.path_on_host, Some(PathBuf::from("/x")));

        let d = drive(r#"{"drive_id":"d1","path_on_host":"/x","is_root_device":false}"#);
        d.validate().unwrap();
        assert_eq!(d.is_read_only, None);
        assert!(!d.read_only());
    }

    #[test]
    fn partuuid_must_be_hex_and_dashes() {
        for good in ["0eaa91a0-01", "6c9e2ad4-3d56-4a7c-8a31-8f2f3c1c9b0e"] {
            let body = format!(
                r#"{{"drive_id":"r","path_on_host":"/x","is_root_device":true,"partuuid":"{good}"}}"#
            );
            drive(&body).validate().unwrap();
        }
        for bad in ["", "0eaa91a0-01 init=/bin/sh", "zz", &"a".repeat(37)] {
            let body = format!(
                r#"{{"drive_id":"r","path_on_host":"/x","is_root_device":true,"partuuid":"{bad}"}}"#
            );
            let err = drive(&body).validate().unwrap_err();
            assert!(
                matches!(err, ValidationError::InvalidPartuuid { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn full_body_parses() {
        let d = drive(
            r#"{"drive_id":"1000","path_on_host":"dummy","is_root_device":true,
                "partuuid":"0eaa91a0-01","is_read_only":true,"cache_type":"Writeback",
                "io_engine":"Async","rate_limiter":{"bandwidth":{"size":5000,"refill_time":100},
                "ops":{"size":500,"one_time_burst":10,"refill_time":100}}}"#,
        );
        d.validate().unwrap();
        assert!(d.read_only());
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert_eq!(d.io_engine, IoEngine::Async);
        assert_eq!(d.partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!(
            d.rate_limiter.and_then(|r| r.ops),
            Some(TokenBucketConfig {
                size: 500,
                one_time_burst: Some(10),
                refill_time: 100
            })
        );
    }

    #[test]
    fn vhost_user_and_missing_path_are_refused() {
        let d = drive(r#"{"drive_id":"v","is_root_device":false,"socket":"/run/vhost.sock"}"#);
        let err = d.validate().unwrap_err();
        assert!(matches!(err, ValidationError::VhostUserNotSupported { .. }));
        assert!(err.to_string().contains("not supported"), "{err}");

        let d = drive(r#"{"drive_id":"v","is_root_device":false}"#);
        assert!(matches!(
            d.validate(),
            Err(ValidationError::MissingPathOnHost { .. })
        ));
    }

    #[test]
    fn bad_enum_strings_types_and_fields_fail_in_serde() {
        for (json, needle) in [
            (
                r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"cache_type":"unsafe"}"#,
                "unknown variant `unsafe`",
            ),
            (
                r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"io_engine":"Uring"}"#,
                "unknown variant `Uring`",
            ),
            (
                r#"{"drive_id":"a","path_on_host":"/x","is_root_device":"yes"}"#,
                "invalid type: string",
            ),
            (
                r#"{"drive_id":1,"path_on_host":"/x","is_root_device":true}"#,
                "invalid type: integer",
            ),
            (
                r#"{"drive_id":"a","path_on_host":"/x"}"#,
                "missing field `is_root_device`",
            ),
            (
                r#"{"drive_id":"a","path_on_host":"/x","is_root_device":true,"direct":true}"#,
                "unknown field `direct`",
            ),
        ] {
            let err = serde_json::from_str::<Drive>(json).unwrap_err();
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn bad_ids_and_rate_limiters_fail_validation() {
        let d = drive(r#"{"drive_id":"a-b","path_on_host":"/x","is_root_device":false}"#);
        assert!(matches!(
            d.validate(),
            Err(ValidationError::InvalidIdCharacters { .. })
        ));
        let d = drive(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,
                "rate_limiter":{"ops":{"size":100,"refill_time":0}}}"#,
        );
        assert!(matches!(
            d.validate(),
            Err(ValidationError::RateLimiter {
                field: "rate_limiter",
                ..
            })
        ));
    }

    #[test]
    fn partial_drive() {
        let p: PartialDrive =
            serde_json::from_str(r#"{"drive_id":"foo","path_on_host":"/there"}"#).unwrap();
        p.validate().unwrap();
        let p: PartialDrive = serde_json::from_str(r#"{"drive_id":"foo"}"#).unwrap();
        p.validate().unwrap();
        let err = serde_json::from_str::<PartialDrive>(
            r#"{"drive_id":"foo","path_on_host":"/x","is_read_only":false}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `is_read_only`"),
            "{err}"
        );
        let p: PartialDrive = serde_json::from_str(
            r#"{"drive_id":"foo","rate_limiter":{"ops":{"size":100,"refill_time":0}}}"#,
        )
        .unwrap();
        assert!(p.validate().is_err());
    }
}
