//! Who Kiln is, by the name it was started under: `kiln`, or a drop-in for Firecracker's
//! `firecracker` or `jailer` binary (a symlink or a copy under that name).
//!
//! Firecracker's ecosystem finds its binaries by name and checks them by what they print and how
//! they name their threads: Kata's runtime runs `firecracker --version` and wants its first line
//! to be `Firecracker vX.Y.Z`, finds vCPU threads by the prefix `fc_vcpu` to pin them, and
//! expects the API socket at `/run/firecracker.socket` inside a jail. Invoked under Firecracker's
//! names, Kiln behaves that way; invoked as `kiln`, nothing changes.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::OnceLock;

/// The Firecracker release whose process, jailer and API Kiln stands in for.
pub const FIRECRACKER_VERSION: &str = "1.17.0";

/// The name Kiln answers to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Personality {
    /// `kiln`: Kiln's own names.
    #[default]
    Kiln,
    /// `firecracker...`: Firecracker's process (`firecracker`, `firecracker-v1.17.0-x86_64`).
    Firecracker,
    /// `jailer...`: Firecracker's jailer, that is `kiln jail` with its command line.
    Jailer,
}

/// Set once by `main` before any thread starts; read where threads are named.
static CURRENT: OnceLock<Personality> = OnceLock::new();

impl Personality {
    /// The personality for a program started as `arg0`: its file name's prefix decides, so a
    /// release-style name (`firecracker-v1.17.0-x86_64`) counts as well.
    pub fn from_program_name(arg0: &OsStr) -> Self {
        let name = Path::new(arg0)
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or_default();
        if name.starts_with("firecracker") {
            Self::Firecracker
        } else if name.starts_with("jailer") {
            Self::Jailer
        } else {
            Self::Kiln
        }
    }

    /// Makes `self` the process's personality; only the first call counts.
    pub fn install(self) {
        let _ = CURRENT.set(self);
    }

    /// The process's personality ([`Personality::Kiln`] until one is installed).
    pub fn current() -> Self {
        CURRENT.get().copied().unwrap_or_default()
    }

    /// The API socket used when `--api-sock` is not given.
    pub fn default_api_sock(self) -> &'static str {
        match self {
            Self::Firecracker => "/run/firecracker.socket",
            Self::Kiln | Self::Jailer => "/run/kiln.socket",
        }
    }

    /// The name of vCPU thread `index` (Firecracker's `fc_vcpu N`, which Kata pins by).
    pub fn vcpu_thread_name(self, index: u8) -> String {
        match self {
            Self::Firecracker => format!("fc_vcpu {index}"),
            Self::Kiln | Self::Jailer => format!("kiln_vcpu {index}"),
        }
    }

    /// What `--version` prints under a Firecracker name: Firecracker's first line (the one
    /// Kata parses), then Kiln's own version; `None` for `kiln`, whose `--version` is clap's.
    pub fn version_text(self) -> Option<String> {
        let kiln = concat!("kiln ", env!("CARGO_PKG_VERSION"));
        match self {
            Self::Firecracker => Some(format!("Firecracker v{FIRECRACKER_VERSION}\n{kiln}\n")),
            Self::Jailer => Some(format!("Jailer v{FIRECRACKER_VERSION}\n{kiln}\n")),
            Self::Kiln => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_decide() {
        for (name, want) in [
            ("kiln", Personality::Kiln),
            ("/usr/bin/kiln", Personality::Kiln),
            ("/opt/kata/bin/firecracker", Personality::Firecracker),
            ("firecracker-v1.17.0-x86_64", Personality::Firecracker),
            ("/firecracker", Personality::Firecracker),
            ("jailer", Personality::Jailer),
            ("/usr/local/bin/jailer-v1.17.0-x86_64", Personality::Jailer),
            ("", Personality::Kiln),
        ] {
            assert_eq!(
                Personality::from_program_name(OsStr::new(name)),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn firecracker_names_and_version_line() {
        let fc = Personality::Firecracker;
        assert_eq!(fc.default_api_sock(), "/run/firecracker.socket");
        assert_eq!(fc.vcpu_thread_name(3), "fc_vcpu 3");
        assert_eq!(Personality::Kiln.vcpu_thread_name(0), "kiln_vcpu 0");
        let text = fc.version_text().unwrap();
        // Kata's parse: the first line's second field, without its "v".
        let first = text.lines().next().unwrap();
        let fields: Vec<&str> = first.split(' ').collect();
        assert_eq!(fields[0], "Firecracker");
        assert_eq!(fields[1].trim_start_matches('v'), FIRECRACKER_VERSION);
        assert!(text.lines().nth(1).unwrap().starts_with("kiln "));
        assert_eq!(Personality::Kiln.version_text(), None);
    }
}
