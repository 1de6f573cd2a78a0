//! `PUT /snapshot/create` and `PUT /snapshot/load`, with Kiln's one extension to the load body:
//! `drive_overrides`, so each clone of a snapshot can have its own writable drive.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_path, is_tap_name, ValidationError};

/// Full or Diff snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the memory dirtied since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// The body of `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest memory goes.
    pub mem_file_path: PathBuf,
    /// Where the microVM's state goes.
    pub snapshot_path: PathBuf,
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

impl SnapshotCreateParams {
    /// Checks the paths.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_path("mem_file_path", &self.mem_file_path)?;
        check_path("snapshot_path", &self.snapshot_path)
    }
}

/// How guest memory is brought back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Mapped from the memory file.
    #[default]
    File,
    /// Served by a page-fault handler over userfaultfd.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file (File) or the handler's Unix socket (Uffd).
    pub backend_path: PathBuf,
}

/// A network interface's new TAP on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// The vsock device's new host socket on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new socket path.
    pub uds_path: PathBuf,
}

/// Kiln's extension: a drive's new backing file on restore (a clone's own writable disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive.
    pub drive_id: String,
    /// Its new backing file.
    pub path_on_host: PathBuf,
}

/// `huge_pages` of `PUT /snapshot/load`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotHugePages {
    /// As the snapshot says (Kiln's snapshots never use huge pages).
    #[default]
    Snapshot,
    /// The host's default mapping.
    None,
    /// Transparent huge pages.
    Transparent,
    /// Explicit 2 MiB pages (Firecracker requires a Uffd backend for them).
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// The body of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Deprecated: the memory file (only without `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    /// How guest memory is brought back (only without `mem_file_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Track dirtied pages, for Diff snapshots of the restored VM.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Resume the VM once it is loaded (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// New TAPs for network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// A new host socket for the vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's kvmclock by the wall-clock time since the snapshot (x86_64).
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages for the restored memory.
    #[serde(default)]
    pub huge_pages: SnapshotHugePages,
    /// Kiln's extension: new backing files for drives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
}

/// A load's memory source, once `mem_file_path` and `mem_backend` are reconciled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemorySource {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file or the handler's socket.
    pub path: PathBuf,
}

impl SnapshotLoadParams {
    /// Checks what serde cannot: exactly one memory source, usable paths, valid override ids and
    /// TAP names, and huge pages Kiln can give.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_path("snapshot_path", &self.snapshot_path)?;
        let source = match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => return Err(ValidationError::SnapshotTwoMemSources),
            (None, None) => return Err(ValidationError::SnapshotNoMemSource),
            (Some(path), None) => ("mem_file_path", path),
            (None, Some(backend)) => ("mem_backend.backend_path", &backend.backend_path),
        };
        check_path(source.0, source.1)?;
        for net in &self.network_overrides {
            super::check_id(&net.iface_id)?;
            if !is_tap_name(&net.host_dev_name) {
                return Err(ValidationError::InvalidHostDevName {
                    name: net.host_dev_name.clone(),
                });
            }
        }
        if let Some(vsock) = &self.vsock_override {
            check_path("vsock_override.uds_path", &vsock.uds_path)?;
        }
        for drive in &self.drive_overrides {
            super::check_id(&drive.drive_id)?;
            check_path("drive_overrides.path_on_host", &drive.path_on_host)?;
        }
        match self.huge_pages {
            SnapshotHugePages::Snapshot | SnapshotHugePages::None => Ok(()),
            SnapshotHugePages::Transparent => Err(ValidationError::HugePagesNotSupported(
                super::HugePages::Transparent,
            )),
            SnapshotHugePages::Hugetlbfs2M => Err(ValidationError::HugePagesNotSupported(
                super::HugePages::Hugetlbfs2M,
            )),
        }
    }

    /// Where guest memory comes from (after [`Self::validate`]).
    pub fn memory_source(&self) -> Option<MemorySource> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(path), None) => Some(MemorySource {
                backend_type: MemoryBackendType::File,
                path: path.clone(),
            }),
            (None, Some(backend)) => Some(MemorySource {
                backend_type: backend.backend_type,
                path: backend.backend_path.clone(),
            }),
            _ => None,
        }
    }

    /// Whether dirty pages are tracked (either name of the flag).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(body: &str) -> Result<SnapshotLoadParams, String> {
        let params: SnapshotLoadParams = serde_json::from_str(body).map_err(|e| e.to_string())?;
        params.validate().map_err(|e| e.to_string())?;
        Ok(params)
    }

    #[test]
    fn create_defaults_to_full() {
        let p: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#).unwrap();
        p.validate().unwrap();
        assert_eq!(p.snapshot_type, SnapshotType::Full);
        let empty: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path":"","mem_file_path":"/m"}"#).unwrap();
        assert!(empty.validate().is_err());
    }

    #[test]
    fn load_takes_exactly_one_memory_source() {
        let old = load(r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#).unwrap();
        assert_eq!(
            old.memory_source().unwrap(),
            MemorySource {
                backend_type: MemoryBackendType::File,
                path: "/m".into()
            }
        );
        let uffd = load(
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"},
                "resume_vm":true,"enable_diff_snapshots":true}"#,
        )
        .unwrap();
        assert_eq!(
            uffd.memory_source().unwrap().backend_type,
            MemoryBackendType::Uffd
        );
        assert!(uffd.resume_vm && uffd.tracks_dirty_pages());
        for bad in [
            r#"{"snapshot_path":"/s"}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#,
        ] {
            let err = load(bad).unwrap_err();
            assert!(err.contains("mem_backend"), "{err}");
        }
    }

    #[test]
    fn overrides_are_checked() {
        let ok = load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m",
                "network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],
                "vsock_override":{"uds_path":"/v.sock"},
                "drive_overrides":[{"drive_id":"scratch","path_on_host":"/d.img"}]}"#,
        )
        .unwrap();
        assert_eq!(ok.network_overrides[0].host_dev_name, "tap1");
        assert_eq!(ok.drive_overrides[0].drive_id, "scratch");
        for bad in [
            r#"{"snapshot_path":"/s","mem_file_path":"/m","network_overrides":[{"iface_id":"eth0","host_dev_name":"a/b"}]}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","network_overrides":[{"iface_id":"e-0","host_dev_name":"tap"}]}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","vsock_override":{"uds_path":""}}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","huge_pages":"2M"}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","unknown":1}"#,
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }
}
