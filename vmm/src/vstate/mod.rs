//! KVM state: the VM (memory slots, irqchip, PIT) and its vCPUs (boot state, run loop, threads).

pub mod vcpu;
pub mod vm;
