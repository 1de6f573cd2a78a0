//! Host quirks: what Kiln changes about a guest because of the host it runs on.
//!
//! On a nested-KVM host served by the PVM module (`/sys/module/kvm_pvm`), guest kernel code runs
//! through KVM's instruction emulator, which does not know XSAVE/XRSTOR, SMAP's CLAC/STAC, POPCNT,
//! CMPXCHG16B and other instructions the kernel patches in, and loops on KVM hypercalls. The
//! command line below keeps a stock kernel (with Kiln's four small patches, see
//! `guest-images/README.md`) off those instructions, and the glibc tunables keep a static glibc
//! user space off AVX-512 and friends. Every item was seen to stop a boot without it.

use std::path::Path;

/// Where the PVM module shows itself.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Guest command line for nested-PVM hosts.
pub const PVM_GUEST_CMDLINE: &str = concat!(
    "nopv noxsave ",
    // Linux reads at most 127 characters of clearcpuid= (and only one occurrence), so the list
    // holds only what kernel code patches in or uses. AVX and its kin need no entry: noxsave
    // already turns them off; crypto instructions need none: the guest kernel builds no crypto
    // drivers that use them.
    "clearcpuid=smap,smep,popcnt,cx16,fsgsbase,rdpid,rdrand,erms,fsrm,clflushopt,clwb,pcid,",
    "invpcid,umip,rdtscp,movbe,abm,bmi1,bmi2 ",
    "8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp ",
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX2,-AVX,-ERMS,",
    "-FSRM,-AVX_Fast_Unaligned_Load,-BMI1,-BMI2,-POPCNT"
);

/// The quirks that apply to this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostQuirks {
    /// /dev/kvm is nested KVM through the PVM module.
    pub nested_pvm: bool,
}

impl HostQuirks {
    /// Looks at the running host.
    pub fn detect() -> Self {
        Self {
            nested_pvm: Path::new(PVM_MODULE).exists(),
        }
    }

    /// Extra guest command line this host needs, if any.
    pub fn guest_cmdline(&self) -> Option<&'static str> {
        self.nested_pvm.then_some(PVM_GUEST_CMDLINE)
    }

    /// The one log message that says what Kiln does about this host, if anything (the logger
    /// adds `kiln: `).
    pub fn describe(&self) -> Option<String> {
        self.nested_pvm.then(|| {
            format!(
                "nested PVM host ({PVM_MODULE} exists): adding the compat guest command line \
                 ({} options and glibc tunables) and booting through the 64-bit entry",
                PVM_GUEST_CMDLINE.split(' ').count() - 1
            )
        })
    }

    /// Whether a kernel's PVH entry may be used. PVH enters in 32-bit protected mode; on PVM
    /// hosts only the 64-bit entry has been seen to boot Linux, so Kiln stays with it there.
    pub fn allows_pvh(&self) -> bool {
        !self.nested_pvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_hosts_get_the_compat_line() {
        let pvm = HostQuirks { nested_pvm: true };
        let line = pvm.guest_cmdline().unwrap();
        for needed in [
            "nopv",
            "noxsave",
            "clearcpuid=smap,",
            "i8042.nopnp",
            "GLIBC_TUNABLES=",
        ] {
            assert!(line.contains(needed), "{needed} missing");
        }
        assert!(!line.contains("  "), "no doubled spaces");
        let clearcpuid = line
            .split(' ')
            .find_map(|w| w.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(
            clearcpuid.len() <= 127,
            "Linux truncates clearcpuid= at 127 characters"
        );
        assert!(!pvm.allows_pvh());
        assert!(pvm.describe().unwrap().contains("kvm_pvm"));
    }

    #[test]
    fn other_hosts_get_nothing() {
        let plain = HostQuirks::default();
        assert_eq!(plain.guest_cmdline(), None);
        assert_eq!(plain.describe(), None);
        assert!(plain.allows_pvh());
    }
}
