//! Kiln's VMM: builds a KVM microVM from a configuration and runs it.
//!
//! Reading order: [`config`] (what a VM is) → [`builder`] (how one is assembled) → [`machine`]
//! (how it runs) → [`vstate`] (KVM VM and vCPUs) → [`arch`] (x86_64 boot structures).

#![cfg(target_arch = "x86_64")]

pub mod api_controller;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_config;
pub mod device_manager;
pub mod event_loop;
pub mod guest_images;
pub mod host_quirks;
pub mod jail;
pub mod loader;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod resources;
pub mod seccomp;
pub mod vstate;

#[cfg(any(test, feature = "test-support"))]
pub mod test_elf;
