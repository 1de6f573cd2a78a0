//! Snapshots: a paused microVM saved to a state file and a memory file, and a new microVM built
//! from them.
//!
//! The state ([`MicrovmState`]) is plain data: the VM's description in `GET /vm/config`'s shape
//! (so a restore opens the same drives, TAPs and sockets, or the overrides the load names), the
//! memory layout, the KVM state of the VM and each vCPU, the legacy devices' registers, and each
//! virtio device's transport, queue positions and own state, in registry order. [`format`] says
//! how it is stored and checked; [`memory`] how guest RAM is.
//!
//! A snapshot is taken with the vCPUs paused and every virtio device locked, so neither the guest
//! nor a device's data path changes memory or queue state while it is saved: the memory file and
//! the queue positions describe one instant.

pub mod format;
pub mod memory;
pub mod uffd;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use api::models::{FullVmConfiguration, SnapshotLoadParams};
use devices::virtio::mmio::TransportState;
use serde::{Deserialize, Serialize};

use crate::arch::{self, LegacyState, VcpuState, VmState};
use crate::resources::VmResources;
use memory::MemoryRegionState;

/// How long a paused vCPU may take to save its state.
const VCPU_SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One virtio device's saved state, with the registry id it was attached under.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device's id (a drive's or interface's id, `rng`, `vsock`, `balloon`).
    pub id: String,
    /// Its transport's registers, queue positions and own state.
    pub transport: TransportState,
}

/// Everything a snapshot saves besides guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// What the VM was built from, in `GET /vm/config`'s shape, with its runtime changes.
    pub vm_config: FullVmConfiguration,
    /// Guest RAM's regions and their place in the memory file.
    pub memory: Vec<MemoryRegionState>,
    /// The VM's in-kernel devices and clock.
    pub vm: VmState,
    /// Each vCPU's state, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The legacy devices (serial console, reset device, clock).
    pub legacy: LegacyState,
    /// The virtio devices in registry (slot) order.
    pub virtio: Vec<VirtioDeviceState>,
}

/// A snapshot to restore, and how.
#[derive(Debug, Clone, Copy)]
pub struct Restore<'a> {
    /// The saved state.
    pub state: &'a MicrovmState,
    /// Move the guest's clock on by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
}

/// Why a snapshot could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshots are taken of paused VMs only (Firecracker's rule).
    #[error("the microVM must be paused before a snapshot is taken")]
    NotPaused,
    /// A VM with a vhost-user device: its backend's state (virtiofsd's open files, its rings'
    /// progress) lives outside Kiln and would not be in the snapshot.
    #[error(
        "the microVM has virtio-fs device {0}, whose vhost-user backend's state a snapshot \
         cannot hold"
    )]
    VhostUser(String),
    /// A Diff snapshot of a VM whose memory writes are not tracked.
    #[error(
        "Diff snapshots need dirty page tracking: set track_dirty_pages in the machine \
         configuration (or in the snapshot load)"
    )]
    DiffWithoutTracking,
    /// A vCPU could not save its state.
    #[error("vCPU {index}: {reason}")]
    Vcpu {
        /// The vCPU's index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The VM's in-kernel state could not be saved or restored.
    #[error(transparent)]
    KvmState(#[from] arch::StateError),
    /// KVM's dirty-page log could not be read.
    #[error(transparent)]
    DirtyLog(#[from] crate::vstate::vm::VmError),
    /// The state file could not be written, read or checked.
    #[error("snapshot file {path}: {source}")]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: format::FormatError,
    },
    /// Guest memory could not be saved or mapped.
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    /// An override names a device the snapshot does not have.
    #[error("the snapshot has no {what} {id}")]
    NoSuchDevice {
        /// The kind of device.
        what: &'static str,
        /// The id the override gave.
        id: String,
    },
    /// The saved state does not describe a VM this Kiln can build.
    #[error("the snapshot does not match its own description: {0}")]
    Inconsistent(String),
}

/// Writes `state` to a new file at `path` ([`create_owner_only`]).
pub fn write_state(state: &MicrovmState, path: &Path) -> Result<(), SnapshotError> {
    let fail = |source| SnapshotError::StateFile {
        path: path.to_path_buf(),
        source,
    };
    let bytes = format::encode(state).map_err(fail)?;
    let io = |e: std::io::Error| fail(format::FormatError::Io(e));
    let mut file = create_owner_only(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Creates (or truncates) the file at `path` for writing, mode 0600: snapshot files hold the
/// guest's state and memory, for their owner alone.
pub fn create_owner_only(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Reads and checks the state file at `path` (a regular file, opened without blocking).
pub fn read_state(path: &Path) -> Result<MicrovmState, SnapshotError> {
    let fail = |source| SnapshotError::StateFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = devices::host_file::open(path, false, devices::host_file::Accept::RegularFile)
        .map_err(|e| {
        fail(format::FormatError::Io(std::io::Error::other(
            e.to_string(),
        )))
    })?;
    parse_state(&mut file).map_err(|e| match e {
        SnapshotError::StateFile { source, .. } => fail(source),
        other => other,
    })
}

/// Reads a state file's bytes from `reader` and checks them: the format ([`format::decode`]),
/// then the state against itself. The `snapshot_state` fuzz target calls this.
pub fn parse_state(reader: &mut impl std::io::Read) -> Result<MicrovmState, SnapshotError> {
    let state: MicrovmState =
        format::decode(reader).map_err(|source| SnapshotError::StateFile {
            path: PathBuf::new(),
            source,
        })?;
    check_state(&state)?;
    Ok(state)
}

/// The checks a state passes before anything is built from it, beyond its format: one vCPU
/// state per configured vCPU, and the memory layout adds up to the configured memory.
fn check_state(state: &MicrovmState) -> Result<(), SnapshotError> {
    let machine = state.vm_config.machine_config.as_ref().ok_or_else(|| {
        SnapshotError::Inconsistent("the saved configuration has no machine-config".into())
    })?;
    if state.vcpus.len() != usize::from(machine.vcpu_count) {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            machine.vcpu_count
        )));
    }
    let total = memory::check_layout(&state.memory)?;
    if total != machine.mem_size_mib << 20 {
        return Err(SnapshotError::Inconsistent(format!(
            "{total} bytes of memory regions for {} MiB of memory",
            machine.mem_size_mib
        )));
    }
    Ok(())
}

/// The resources a snapshot's VM is rebuilt from: its saved configuration, with the load's
/// overrides (a TAP per interface, the vsock socket, Kiln's drive files) and the loading
/// process's own console, logger and metrics. An override naming a device the snapshot lacks
/// is an error.
pub fn restored_resources(
    saved: &FullVmConfiguration,
    load: &SnapshotLoadParams,
    loader: &VmResources,
) -> Result<VmResources, SnapshotError> {
    let mut resources = VmResources::from_full_config(saved.clone())
        .map_err(|e| SnapshotError::Inconsistent(e.to_string()))?;
    for net in &load.network_overrides {
        let config = resources
            .nets
            .iter_mut()
            .find(|n| n.id.as_deref() == Some(net.iface_id.as_str()))
            .ok_or_else(|| SnapshotError::NoSuchDevice {
                what: "network interface",
                id: net.iface_id.clone(),
            })?;
        config.tap.clone_from(&net.host_dev_name);
    }
    if let Some(vsock) = &load.vsock_override {
        let config = resources
            .vsock
            .as_mut()
            .ok_or_else(|| SnapshotError::NoSuchDevice {
                what: "vsock device",
                id: "vsock".into(),
            })?;
        config.uds_path.clone_from(&vsock.uds_path);
    }
    for drive in &load.drive_overrides {
        let config = resources
            .drives
            .iter_mut()
            .find(|d| d.id.as_deref() == Some(drive.drive_id.as_str()))
            .ok_or_else(|| SnapshotError::NoSuchDevice {
                what: "drive",
                id: drive.drive_id.clone(),
            })?;
        config.path.clone_from(&drive.path_on_host);
    }
    resources.machine_config.track_dirty_pages = load.tracks_dirty_pages();
    resources.serial = loader.serial.clone();
    resources.logger = loader.logger.clone();
    resources.metrics = loader.metrics.clone();
    resources.boot_timer = false;
    Ok(resources)
}

/// Saves every paused vCPU's state through its thread (`save` asks vCPU `index`).
pub fn save_vcpus(
    count: usize,
    mut save: impl FnMut(usize, std::time::Duration) -> Result<VcpuState, String>,
) -> Result<Vec<VcpuState>, SnapshotError> {
    (0..count)
        .map(|index| {
            save(index, VCPU_SAVE_TIMEOUT).map_err(|reason| SnapshotError::Vcpu { index, reason })
        })
        .collect()
}
