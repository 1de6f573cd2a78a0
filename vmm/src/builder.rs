//! Assembles a microVM, top to bottom: memory → kernel and initrd → VM → device backends →
//! console → devices (each registered in the device registry, which hands out its slot) → the
//! command line announcing the registry's devices and the boot tables → vCPUs.
//!
//! Everything the user can get wrong (images, command line, disk files, TAPs) is checked before
//! the console file is created, so bad input leaves nothing behind: the command line's room for
//! the devices' announcements is checked before they exist.

use devices::legacy::BootTimer;
use kvm_ioctls::Kvm;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::boot_params::{self, ZeroPageInputs};
use crate::arch::x86_64::layout::low_ram_end;
use crate::arch::x86_64::mptable;
use crate::arch::x86_64::pvh;
use crate::arch::x86_64::regs::EntryPoint;
use crate::config::{ConsoleConfig, VmConfig};
use crate::device_manager::{self, DeviceError, DeviceManager, VirtioSlot};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::host_quirks::HostQuirks;
use crate::loader::{self, LoadedKernel, LoaderError};
use crate::machine::MicroVm;
use crate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors in building a microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot tables in guest memory.
    #[error("writing boot structures: {0}")]
    BootParams(#[from] boot_params::BootParamsError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// PVH start info.
    #[error("writing the PVH start info: {0}")]
    Pvh(#[source] vm_memory::GuestMemoryError),
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
}

impl BuildError {
    /// True when the error is about what the user gave (exit status 2), not about the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Memory(MemoryError::Layout(_)) | Self::Loader(_) | Self::Console { .. }
        ) || matches!(self, Self::Devices(e) if e.is_bad_input())
    }
}

/// Picks the entry protocol: PVH when the kernel has it and the host allows it, else 64-bit Linux.
pub fn choose_entry(kernel: &LoadedKernel, quirks: &HostQuirks) -> EntryPoint {
    match kernel.pvh_entry {
        Some(pvh) if quirks.allows_pvh() => EntryPoint::Pvh(pvh),
        _ => EntryPoint::Linux64(kernel.linux64_entry),
    }
}

/// The root drive's command line parameter, if there is a root drive (always the first, vda).
fn root_param(config: &VmConfig) -> Option<String> {
    config
        .drives
        .first()
        .filter(|d| d.root)
        .map(|d| format!("root=/dev/vda {}", if d.read_only { "ro" } else { "rw" }))
}

/// The user's command line with the host's quirks and the root drive; then `devices`, the
/// parameters that announce the virtio devices.
fn full_cmdline<'a>(
    config: &'a VmConfig,
    quirks: &'a HostQuirks,
    root: Option<&'a str>,
    devices: &'a [String],
) -> Result<linux_loader::cmdline::Cmdline, LoaderError> {
    loader::build_cmdline(
        std::iter::once(config.cmdline.as_str())
            .chain(quirks.guest_cmdline())
            .chain(root)
            .chain(devices.iter().map(String::as_str)),
    )
}

/// Checks, before anything is created, that the command line will fit once the registry adds
/// the devices' announcements, by keeping the room the longest of them would take.
fn check_cmdline_room(config: &VmConfig, quirks: &HostQuirks) -> Result<(), LoaderError> {
    let room = vec![VirtioSlot::longest_cmdline_param(); config.virtio_device_count()];
    full_cmdline(config, quirks, root_param(config).as_deref(), &room).map(|_| ())
}

/// Writes the command line (announcing the devices in `devices`' registry), the zero page or
/// PVH start info, and the MP table; returns the entry point.
fn write_boot_tables(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    quirks: &HostQuirks,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
    devices: &DeviceManager,
) -> Result<EntryPoint, BuildError> {
    let announced = devices.registry.virtio_cmdline_params();
    let cmdline = full_cmdline(config, quirks, root_param(config).as_deref(), &announced)?;
    let (cmdline_addr, cmdline_len) = loader::load_cmdline(mem, &cmdline)?;
    let entry = choose_entry(kernel, quirks);
    match entry {
        EntryPoint::Linux64(_) => {
            let params = boot_params::build_zero_page(&ZeroPageInputs {
                setup_header: kernel.setup_header,
                cmdline_addr,
                cmdline_len,
                initrd,
                mem_size: config.mem_bytes(),
            })?;
            boot_params::write_zero_page(mem, &params)?;
        }
        EntryPoint::Pvh(_) => {
            pvh::write_start_info(mem, cmdline_addr, initrd, config.mem_bytes())
                .map_err(BuildError::Pvh)?;
        }
    }
    mptable::write_mptable(mem, config.vcpus)?;
    Ok(entry)
}

/// Builds a ready-to-start microVM from `config`.
pub fn build_microvm(
    kvm: &Kvm,
    config: &VmConfig,
    quirks: &HostQuirks,
) -> Result<MicroVm, BuildError> {
    // Firecracker's boot time counts from the start of the build (InstanceStart being served).
    let boot_timer = config.boot_timer.then(BootTimer::new);
    let mem = memory::create_guest_memory(config.mem_bytes())?;
    let kernel = loader::load_kernel(&mem, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| loader::load_initrd(&mem, path, low_ram_end(config.mem_bytes()), kernel.end))
        .transpose()?;
    check_cmdline_room(config, quirks)?;

    let vm = Vm::new(kvm)?;
    vm.register_memory(&mem)?;

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
        .map(device_manager::create_net)
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
    let mut devices = DeviceManager::new(&vm, console_out, config.console_limits())?;
    // The root drive is first in `config.drives`, so it gets the first slot and the name vda.
    for (drive, block) in config.drives.iter().zip(drives) {
        let id = drive.id.clone().unwrap_or_default();
        devices.attach_virtio(&vm, &mem, id, block)?;
    }
    for (net_config, net) in config.nets.iter().zip(nets) {
        let id = net_config.id.clone().unwrap_or_default();
        devices.attach_virtio(&vm, &mem, id, net)?;
    }
    if let Some(rng) = rng {
        devices.attach_virtio(&vm, &mem, "rng".to_string(), rng)?;
    }
    if let Some((vsock, socket)) = vsock {
        devices.attach_virtio(&vm, &mem, "vsock".to_string(), vsock)?;
        devices.vsock_socket = Some(socket);
    }
    if let Some(timer) = boot_timer {
        devices.attach_boot_timer(timer)?;
    }
    let entry = write_boot_tables(&mem, config, quirks, &kernel, initrd, &devices)?;
    let registry = devices.registry.clone();
    let event_loop = EventLoop::new(
        &devices.subscribers,
        Box::new(move || registry.metric_groups()),
    )?;

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(
            &vm,
            index,
            devices.io_bus.clone(),
            devices.mmio_bus.clone(),
            mem.clone(),
        )?;
        let refused = vcpu.configure(kvm, config.vcpus, entry)?;
        if index == 0 && !refused.is_empty() {
            let list: Vec<String> = refused.iter().map(|m| format!("{m:#x}")).collect();
            log::warn!(
                "KVM refused boot MSRs {} (left at reset values)",
                list.join(", ")
            );
        }
        vcpus.push(vcpu);
    }
    Ok(MicroVm::new(vm, mem, devices, event_loop, vcpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(pvh: Option<u64>) -> LoadedKernel {
        LoadedKernel {
            linux64_entry: 0x100_0000,
            pvh_entry: pvh,
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn entry_choice() {
        let plain = HostQuirks::default();
        let pvm = HostQuirks { nested_pvm: true };
        assert_eq!(
            choose_entry(&kernel(None), &plain),
            EntryPoint::Linux64(0x100_0000)
        );
        assert_eq!(
            choose_entry(&kernel(Some(0x100_0400)), &plain),
            EntryPoint::Pvh(0x100_0400)
        );
        assert_eq!(
            choose_entry(&kernel(Some(0x100_0400)), &pvm),
            EntryPoint::Linux64(0x100_0000)
        );
    }
}
