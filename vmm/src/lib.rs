//! Kiln's VMM: builds a KVM microVM from a configuration and runs it.
//!
//! Reading order: [`config`] (what a VM is) → [`builder`] (how one is assembled) → [`machine`]
//! (how it runs) → [`vstate`] (KVM VM and vCPUs) → [`arch`] (what differs between
//! architectures: layout, interrupt controller, vCPU and boot set-up, legacy devices).

#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "the VMM's arch layer has an x86_64 implementation only so far (arch/aarch64 is next)"
);

pub mod api_controller;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_config;
pub mod device_manager;
pub mod event_loop;
pub mod guest_images;
pub mod jail;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod output_file;
pub mod persist;
pub mod personality;
pub mod resources;
pub mod runner;
pub mod seccomp;
pub mod startup_clock;
pub mod vmm_actions;
pub mod vstate;

#[cfg(any(test, feature = "test-support"))]
pub mod test_elf;
