//! `kiln`: boot a Linux guest in a KVM microVM.
//!
//! Exit status: 0 when the guest reboots or powers off (a microVM's way to end), 2 for bad input
//! (flags, images, sizes), 1 when the VM or host fails, 128+N when stopped by signal N.

use std::process::ExitCode;

use clap::Parser;
use vmm::builder::build_microvm;
use vmm::cli::{Cli, Command, RunArgs};
use vmm::config::{ConsoleConfig, HostLimits, VmConfigRequest};
use vmm::guest_images::default_guest;
use vmm::host_quirks::HostQuirks;
use vmm::machine::ExitReason;
use vmm::vstate::vm;

const EXIT_FAILURE: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("kiln: {message}");
    ExitCode::from(code)
}

fn run(args: RunArgs) -> ExitCode {
    let kvm = match vm::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    let limits = HostLimits {
        max_vcpus: vm::max_vcpus(&kvm),
        mem_mib: HostLimits::host_mem_mib().unwrap_or(u64::MAX),
    };
    let has_root_drive = args.drives.iter().any(|d| d.root);
    let (kernel, initrd) = match args.kernel {
        Some(kernel) => (kernel, args.initrd),
        None => match default_guest() {
            // With a root drive the guest boots from it: no default initramfs.
            Ok(images) if has_root_drive => (images.vmlinux, args.initrd),
            Ok(images) => (images.vmlinux, args.initrd.or(Some(images.initramfs))),
            Err(e) => return fail(EXIT_FAILURE, e),
        },
    };
    let forward_stdin = args.console == ConsoleConfig::Stdout;
    let request = VmConfigRequest {
        kernel,
        initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        console: args.console,
        drives: args.drives,
        nets: args.nets,
        rng: args.rng,
    };
    let config = match request.validate(limits) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let quirks = HostQuirks::detect();
    let microvm = match build_microvm(&kvm, &config, &quirks) {
        Ok(microvm) => microvm,
        Err(e) if e.is_bad_input() => return fail(EXIT_BAD_INPUT, e),
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    if let Some(line) = quirks.describe() {
        eprintln!("{line}");
    }
    match microvm.run(forward_stdin) {
        Ok(ExitReason::GuestReset) => {
            eprintln!("kiln: the guest rebooted; exiting");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::GuestPowerOff) => {
            eprintln!("kiln: the guest powered off; exiting");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::Fatal(e)) => fail(EXIT_FAILURE, format!("guest failed: {e}")),
        Ok(ExitReason::Signal(signal)) => {
            eprintln!("kiln: stopped by signal {signal}");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Ok(ExitReason::EventLoopFailed(e)) => fail(EXIT_FAILURE, format!("device event loop: {e}")),
        Ok(ExitReason::EventSourcesGone) => fail(
            EXIT_FAILURE,
            "internal error: every thread reporting to the control loop ended",
        ),
        Err(e) => fail(EXIT_FAILURE, format!("starting the VM: {e}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
    }
}
