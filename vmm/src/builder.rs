//! Assembles a microVM, booted from a kernel or restored from a snapshot, top to bottom.
//!
//! A boot: the resources checked into a [`VmConfig`] → memory → kernel and initrd → VM (its
//! memory slots, then its interrupt controller) → device backends → console → devices (each
//! registered in the device registry, which hands out its slot) → vCPUs → the rest of the
//! interrupt controller → the command line announcing the registry's devices and the boot
//! structures → the vCPUs' boot state. A restore: the same VM and devices on the snapshot's
//! memory, with the saved interrupt controllers restored before any device exists, then each
//! device's and vCPU's saved state instead of boot structures. Every architecture-specific step
//! is a call into [`crate::arch`].
//!
//! Everything the user can get wrong (images, command line, disk files, TAPs) is checked before
//! the console file is created, so bad input leaves nothing behind: the command line's room for
//! the devices' announcements is checked before they exist.

use devices::legacy::BootTimer;
use devices::mmds::{MmdsStack, MmdsStackConfig, SharedMmds};
use devices::GuestMemoryMmap;
use kvm_ioctls::Kvm;

use std::sync::Arc;

use crate::arch::{self, BootError, EntryPoint, HostQuirks, LoadedKernel, LoaderError, StateCaps};
use crate::config::{ConfigError, ConsoleConfig, HostLimits, VmConfig};
use crate::device_config::NetConfig;
use crate::device_manager::{self, DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::machine::MicroVm;
use crate::memory::{self, MemoryError};
use crate::persist::{Restore, SnapshotError};
use crate::resources::VmResources;
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors in building a microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The resources do not make a VM this host can run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The boot structures in guest memory.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The console sink.
    #[error("console file {path}: {source}")]
    Console {
        /// The console file, or the console setting when it is not a file.
        path: String,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },
    /// KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The event loop that runs the devices.
    #[error("creating the device event loop: {0}")]
    EventLoop(#[from] EventLoopError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A snapshot's state.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl BuildError {
    /// True when the error is about what the user gave (exit status 2), not about the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::Memory(MemoryError::Layout(_))
                | Self::Loader(_)
                | Self::Console { .. }
                | Self::Snapshot(
                    SnapshotError::StateFile { .. }
                        | SnapshotError::Memory(_)
                        | SnapshotError::Inconsistent(_)
                        | SnapshotError::NoSuchDevice { .. }
                )
        ) || matches!(self, Self::Devices(e) if e.is_bad_input())
    }
}

/// The root drive's command line parameters, if there is a root drive (always the first, vda):
/// the partition by its UUID when it is named (Firecracker's `partuuid`), else the whole disk.
fn root_param(config: &VmConfig) -> Option<String> {
    config.drives.first().filter(|d| d.root).map(|d| {
        let mode = if d.read_only { "ro" } else { "rw" };
        match &d.partuuid {
            Some(uuid) => format!("root=PARTUUID={uuid} {mode}"),
            None => format!("root=/dev/vda {mode}"),
        }
    })
}

/// The user's command line with the host's quirks and the root drive; then `devices`, the
/// parameters that announce the virtio devices.
fn full_cmdline<'a>(
    config: &'a VmConfig,
    quirks: &'a HostQuirks,
    root: Option<&'a str>,
    devices: &'a [String],
) -> Result<linux_loader::cmdline::Cmdline, LoaderError> {
    arch::build_cmdline(
        std::iter::once(config.cmdline.as_str())
            .chain(quirks.guest_cmdline())
            .chain(root)
            .chain(devices.iter().map(String::as_str)),
    )
}

/// Checks, before anything is created, that the command line will fit once the registry adds
/// the devices' announcements, by keeping the room the longest of them would take.
fn check_cmdline_room(config: &VmConfig, quirks: &HostQuirks) -> Result<(), LoaderError> {
    let room = arch::announcement_room(config.virtio_device_count());
    full_cmdline(config, quirks, root_param(config).as_deref(), &room).map(|_| ())
}

/// Writes the command line (announcing the devices of `devices`' registry) and the
/// architecture's boot structures; returns where the boot vCPU enters the kernel.
fn write_boot_tables(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    quirks: &HostQuirks,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
    devices: &DeviceManager,
) -> Result<EntryPoint, BuildError> {
    let announced = arch::announce_devices(&devices.registry);
    let cmdline = full_cmdline(config, quirks, root_param(config).as_deref(), &announced)?;
    let cmdline = arch::load_cmdline(mem, &cmdline)?;
    let entry = arch::choose_entry(kernel, quirks.allows_pvh());
    arch::configure_system(
        mem,
        entry,
        kernel,
        cmdline,
        initrd,
        config.mem_bytes(),
        config.vcpus,
    )?;
    Ok(entry)
}

/// MMDS on interface `net`, if the MMDS config names it.
fn mmds_stack(config: &VmConfig, net: &NetConfig, store: &SharedMmds) -> Option<MmdsStack> {
    let mmds = config.mmds.as_ref()?;
    let id = net.id.as_deref()?;
    mmds.network_interfaces.iter().any(|i| i == id).then(|| {
        MmdsStack::new(MmdsStackConfig {
            ipv4: mmds.ipv4(),
            store: store.clone(),
        })
    })
}

/// What every microVM is made of, booted or restored: the VM with its memory slots and
/// interrupt controller, the devices on their buses, the event loop that runs them, the vCPUs.
struct Assembled {
    vm: Vm,
    devices: DeviceManager,
    event_loop: EventLoop,
    vcpus: Vec<Vcpu>,
}

impl Assembled {
    /// The microVM these parts make on `mem`, described by `resources`.
    fn into_microvm(self, mem: GuestMemoryMmap, resources: VmResources) -> MicroVm {
        MicroVm::new(
            self.vm,
            mem,
            self.devices,
            self.event_loop,
            self.vcpus,
            resources,
        )
    }
}

/// Creates the VM on `mem`, the devices `config` names (the legacy ones in their reset state,
/// or `snapshot`'s), the event loop and the vCPUs, and finishes the interrupt controller. A
/// snapshot's interrupt controllers and clock are restored before any device exists, so an
/// interrupt a restored device raises at once (the UART's) lands on the restored controller.
fn assemble(
    kvm: &Kvm,
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    mmds: &SharedMmds,
    boot_timer: Option<BootTimer>,
    snapshot: Option<&Restore<'_>>,
) -> Result<Assembled, BuildError> {
    let mut vm = Vm::new(kvm)?;
    vm.register_memory(mem, config.track_dirty_pages)?;
    vm.create_irqchip()?;
    if let Some(restore) = snapshot {
        arch::restore_vm(vm.fd(), &restore.state.vm, restore.clock_realtime)
            .map_err(SnapshotError::from)?;
    }
    let legacy_state = snapshot.map(|restore| &restore.state.legacy);
    let state_caps = Arc::new(StateCaps::of(kvm).map_err(SnapshotError::from)?);

    // Device backends (images, TAPs) first: a bad one is reported before anything is created,
    // the console file included.
    let drives = config
        .drives
        .iter()
        .map(device_manager::create_drive)
        .collect::<Result<Vec<_>, _>>()?;
    let nets = config
        .nets
        .iter()
        .map(|net| device_manager::create_net(net, mmds_stack(config, net, mmds)))
        .collect::<Result<Vec<_>, _>>()?;
    let rng = config
        .rng
        .as_ref()
        .map(device_manager::create_rng)
        .transpose()?;
    let vsock = config
        .vsock
        .as_ref()
        .map(device_manager::create_vsock)
        .transpose()?;
    let balloon = config
        .balloon
        .as_ref()
        .map(device_manager::create_balloon)
        .transpose()?;
    let fs = config
        .fs
        .iter()
        .map(device_manager::create_fs)
        .collect::<Result<Vec<_>, _>>()?;

    let console_out = config
        .console
        .open()
        .map_err(|source| BuildError::Console {
            path: match &config.console {
                ConsoleConfig::File(path) => path.display().to_string(),
                other => format!("{other:?}"),
            },
            source,
        })?;
    let mut devices = DeviceManager::new(&vm, console_out, config.console_limits(), legacy_state)?;
    // The root drive is first in `config.drives`, so it gets the first slot and the name vda.
    for (drive, block) in config.drives.iter().zip(drives) {
        let id = drive.id.clone().unwrap_or_default();
        devices.attach_virtio(&vm, mem, id, block)?;
    }
    for (net_config, net) in config.nets.iter().zip(nets) {
        let id = net_config.id.clone().unwrap_or_default();
        devices.attach_virtio(&vm, mem, id, net)?;
    }
    if let Some(rng) = rng {
        devices.attach_virtio(&vm, mem, "rng".to_string(), rng)?;
    }
    if let Some((vsock, socket)) = vsock {
        devices.attach_virtio(&vm, mem, "vsock".to_string(), vsock)?;
        devices.vsock_socket = Some(socket);
    }
    if let Some(balloon) = balloon {
        devices.attach_virtio(&vm, mem, device_manager::BALLOON_ID.to_string(), balloon)?;
    }
    for (fs_config, fs) in config.fs.iter().zip(fs) {
        devices.attach_virtio(&vm, mem, fs_config.tag.clone(), fs)?;
    }
    if let Some(timer) = boot_timer {
        devices.attach_boot_timer(timer)?;
    }
    let registry = devices.registry.clone();
    let event_loop = EventLoop::new(
        &devices.subscribers,
        Box::new(move || registry.metric_groups()),
    )?;

    let vcpus = (0..config.vcpus)
        .map(|index| {
            Vcpu::new(
                &vm,
                index,
                devices.io_bus.clone(),
                devices.mmio_bus.clone(),
                mem.clone(),
                state_caps.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Some interrupt controllers (arm64's GIC) can only be created once the vCPUs exist.
    vm.finish_irqchip(config.vcpus)?;
    Ok(Assembled {
        vm,
        devices,
        event_loop,
        vcpus,
    })
}

/// Builds a ready-to-start microVM from `resources`, which it keeps as the description of
/// what it built.
pub fn build_microvm(
    kvm: &Kvm,
    resources: &VmResources,
    mmds: &SharedMmds,
    quirks: &HostQuirks,
) -> Result<MicroVm, BuildError> {
    let config = &resources.vm_config(HostLimits::of(kvm))?;
    // Firecracker's boot time counts from the start of the build (InstanceStart being served).
    let boot_timer = config.boot_timer.then(BootTimer::new);
    // A vhost-user backend maps guest memory itself: it must then be a shared file's.
    let mem = if config.fs.is_empty() {
        memory::create_guest_memory(config.mem_bytes())?
    } else {
        memory::create_shared_guest_memory(config.mem_bytes())?
    };
    let kernel = arch::load_kernel(&mem, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| arch::place_initrd(&mem, path, config.mem_bytes(), &kernel))
        .transpose()?;
    check_cmdline_room(config, quirks)?;

    let parts = assemble(kvm, config, &mem, mmds, boot_timer, None)?;
    let entry = write_boot_tables(&mem, config, quirks, &kernel, initrd, &parts.devices)?;
    for vcpu in &parts.vcpus {
        let refused = vcpu.configure(kvm, config.vcpus, entry)?;
        if vcpu.index() == 0 && !refused.is_empty() {
            let list: Vec<String> = refused.iter().map(|m| format!("{m:#x}")).collect();
            log::warn!(
                "KVM refused boot registers {} (left at reset values)",
                list.join(", ")
            );
        }
    }
    Ok(parts.into_microvm(mem, resources.clone()))
}

/// Builds a microVM in a snapshot's state (`restore`), on `mem` (the snapshot's memory,
/// mapped), with the devices `resources` describes (the snapshot's configuration, with the
/// load's overrides): the same VM, device for device and slot for slot, with its saved KVM,
/// device and vCPU state. Nothing is loaded or written into guest memory.
pub fn restore_microvm(
    kvm: &Kvm,
    resources: &VmResources,
    mmds: &SharedMmds,
    restore: &Restore<'_>,
    mem: GuestMemoryMmap,
) -> Result<MicroVm, BuildError> {
    let state = restore.state;
    let config = &resources.vm_config(HostLimits::of(kvm))?;
    if usize::from(config.vcpus) != state.vcpus.len() {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            config.vcpus
        ))
        .into());
    }
    let parts = assemble(kvm, config, &mem, mmds, None, Some(restore))?;
    parts.devices.restore_virtio(&state.virtio)?;
    for (vcpu, saved) in parts.vcpus.iter().zip(&state.vcpus) {
        vcpu.restore(saved)?;
    }
    Ok(parts.into_microvm(mem, resources.clone()))
}
