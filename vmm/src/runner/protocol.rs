//! What `kiln run -- CMD` and the guest's run init (`guest-images/run/init.c`) say to each other
//! over vsock. The guest connects to the host (CID 2), in this order:
//!
//! 1. [`CONTROL_PORT`]: the host sends the [`RunSpec`] (`KILNRUN1`, a little-endian u32 length,
//!    then NUL-terminated `key=value` entries); at the end the guest answers one status line
//!    ([`Outcome`]): `EXIT <code>`, `SIGNAL <n>` or `ERROR <message>`.
//! 2. [`STDIN_PORT`]: the host's stdin, closed by the host at its end.
//! 3. [`STDOUT_PORT`] and [`STDERR_PORT`]: the command's output, closed by the guest once the
//!    command has ended (before it sends the status), so the host has every byte when the
//!    status arrives.
//!
//! Invariants: no spec value holds a NUL; share entries' fields hold no tab or newline.

/// The control connection's port.
pub const CONTROL_PORT: u32 = 10000;
/// The command's stdin.
pub const STDIN_PORT: u32 = 10001;
/// The command's stdout.
pub const STDOUT_PORT: u32 = 10002;
/// The command's stderr.
pub const STDERR_PORT: u32 = 10003;

/// The spec's first bytes.
pub const MAGIC: &[u8; 8] = b"KILNRUN1";
/// The largest spec the guest accepts.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Errors in the run protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A value cannot be carried (a NUL, or a tab or newline in a share's path).
    #[error("{what} {value:?} cannot be passed to the guest: {why}")]
    Unrepresentable {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: String,
        /// Why.
        why: &'static str,
    },
    /// The spec is larger than the guest takes.
    #[error("the command and its environment take {0} bytes; the most is {MAX_SPEC_BYTES}")]
    TooLarge(usize),
    /// The guest's status line is not one of the three forms.
    #[error("the guest's status line {0:?} makes no sense")]
    BadStatus(String),
}

/// What the guest's root file system is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The default guest's root file system on the first drive (`/dev/vda`), read-only, with
    /// a tmpfs overlay.
    Disk,
    /// The host's `/` over virtio-fs (tag [`HOST_ROOT_TAG`]), read-only, with a tmpfs overlay.
    Host,
}

/// The virtio-fs tag of the host's root.
pub const HOST_ROOT_TAG: &str = "kiln-root";

/// A share as the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    /// Its virtio-fs tag.
    pub tag: String,
    /// Where it is mounted.
    pub guest_dir: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Everything the guest needs to run the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// The root file system.
    pub root: Root,
    /// Shares, mounted in order.
    pub shares: Vec<GuestShare>,
    /// The command's working directory.
    pub cwd: String,
    /// The command's environment.
    pub env: Vec<(String, String)>,
    /// The command and its arguments (at least one).
    pub args: Vec<String>,
    /// The guest's host name.
    pub hostname: String,
}

fn checked<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ProtocolError> {
    if value.contains('\0') {
        return Err(ProtocolError::Unrepresentable {
            what,
            value: value.to_string(),
            why: "it holds a NUL",
        });
    }
    Ok(value)
}

fn field<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ProtocolError> {
    if value.contains(['\t', '\n']) {
        return Err(ProtocolError::Unrepresentable {
            what,
            value: value.to_string(),
            why: "it holds a tab or newline",
        });
    }
    checked(what, value)
}

impl RunSpec {
    /// The spec as the control connection carries it.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut entries: Vec<String> = Vec::new();
        entries.push(
            match self.root {
                Root::Disk => "root=disk",
                Root::Host => "root=host",
            }
            .to_string(),
        );
        for share in &self.shares {
            entries.push(format!(
                "share={}\t{}\t{}",
                field("a share tag", &share.tag)?,
                field("a share's guest directory", &share.guest_dir)?,
                if share.read_only { "ro" } else { "rw" }
            ));
        }
        entries.push(format!(
            "cwd={}",
            checked("the working directory", &self.cwd)?
        ));
        entries.push(format!(
            "hostname={}",
            field("the host name", &self.hostname)?
        ));
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') {
                return Err(ProtocolError::Unrepresentable {
                    what: "an environment variable's name",
                    value: name.clone(),
                    why: "it is empty or holds '='",
                });
            }
            entries.push(format!(
                "env={}={}",
                checked("an environment variable", name)?,
                checked("an environment value", value)?
            ));
        }
        for arg in &self.args {
            entries.push(format!("arg={}", checked("an argument", arg)?));
        }
        let body: Vec<u8> = entries
            .iter()
            .flat_map(|e| e.bytes().chain(std::iter::once(0)))
            .collect();
        if body.len() > MAX_SPEC_BYTES {
            return Err(ProtocolError::TooLarge(body.len()));
        }
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// How the command ended, as the guest reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this status (127: not found, 126: not executable).
    Exited(u8),
    /// A signal ended it.
    Signaled(u8),
    /// The guest could not run it (a mount failed, say).
    Error(String),
}

impl Outcome {
    /// Parses the guest's status line (without its newline).
    pub fn parse(line: &str) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::BadStatus(line.to_string());
        let number = |s: &str| s.trim().parse::<u8>().map_err(|_| bad());
        match line.split_once(' ') {
            Some(("EXIT", code)) => Ok(Self::Exited(number(code)?)),
            Some(("SIGNAL", n)) => Ok(Self::Signaled(number(n)?)),
            Some(("ERROR", message)) => Ok(Self::Error(message.to_string())),
            _ => Err(bad()),
        }
    }

    /// The exit status Kiln ends with: a shell's (128+N for signal N); `error_status` when the
    /// guest could not run the command.
    pub fn exit_status(&self, error_status: u8) -> u8 {
        match self {
            Self::Exited(code) => *code,
            Self::Signaled(n) => 128u8.saturating_add(*n),
            Self::Error(_) => error_status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            root: Root::Disk,
            shares: vec![GuestShare {
                tag: "kiln-share-0".into(),
                guest_dir: "/work dir".into(),
                read_only: true,
            }],
            cwd: "/work dir".into(),
            env: vec![("PATH".into(), "/bin:/usr/bin".into())],
            args: vec!["sh".into(), "-c".into(), "echo 'a\nb'".into()],
            hostname: "kiln".into(),
        }
    }

    #[test]
    fn encodes_entries_in_order() {
        let bytes = spec().encode().unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 12);
        let entries: Vec<&[u8]> = bytes[12..].split(|b| *b == 0).collect();
        assert_eq!(
            entries.last(),
            Some(&&b""[..]),
            "every entry ends with a NUL"
        );
        let text: Vec<String> = entries[..entries.len() - 1]
            .iter()
            .map(|e| String::from_utf8(e.to_vec()).unwrap())
            .collect();
        assert_eq!(
            text,
            [
                "root=disk",
                "share=kiln-share-0\t/work dir\tro",
                "cwd=/work dir",
                "hostname=kiln",
                "env=PATH=/bin:/usr/bin",
                "arg=sh",
                "arg=-c",
                "arg=echo 'a\nb'",
            ]
        );
    }

    #[test]
    fn refuses_what_cannot_be_carried() {
        let mut s = spec();
        s.args.push("a\0b".into());
        assert!(matches!(
            s.encode(),
            Err(ProtocolError::Unrepresentable { .. })
        ));
        let mut s = spec();
        s.shares[0].guest_dir = "/a\tb".into();
        assert!(s.encode().is_err());
        let mut s = spec();
        s.env.push(("A=B".into(), "c".into()));
        assert!(s.encode().is_err());
        let mut s = spec();
        s.args = vec!["x".repeat(MAX_SPEC_BYTES)];
        assert!(matches!(s.encode(), Err(ProtocolError::TooLarge(_))));
    }

    #[test]
    fn status_lines() {
        assert_eq!(Outcome::parse("EXIT 7"), Ok(Outcome::Exited(7)));
        assert_eq!(Outcome::parse("SIGNAL 9").unwrap().exit_status(125), 137);
        assert_eq!(
            Outcome::parse("ERROR mount kiln-share-0: No such device"),
            Ok(Outcome::Error("mount kiln-share-0: No such device".into()))
        );
        assert_eq!(Outcome::parse("ERROR x").unwrap().exit_status(125), 125);
        for bad in ["", "EXIT", "EXIT 300", "EXIT -1", "DONE 0", "SIGNAL x"] {
            assert!(Outcome::parse(bad).is_err(), "{bad}");
        }
    }
}
