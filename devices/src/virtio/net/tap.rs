//! A Linux TAP interface opened through /dev/net/tun: the host end of a virtio-net device.
//!
//! The interface is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header
//! (`virtio_net_hdr_v1`, with `num_buffers`), so every frame read or written carries exactly the
//! header the guest's virtio 1.x driver uses, and the kernel does the checksum and segmentation
//! work the header asks for.
//!
//! Invariant: a [`Tap`] is always attached to an interface, non-blocking, close-on-exec, and has
//! its vnet header size set to [`super::VNET_HDR_LEN`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_short, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{
    ioctl_expr, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val, _IOC_WRITE,
};

use super::{feature, NetBackend, VNET_HDR_LEN};

/// The clone device every TAP interface is created or attached through.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Longest interface name plus its terminating NUL (`IFNAMSIZ` in `<linux/if.h>`).
pub const IFNAMSIZ: usize = 16;

/// The ioctl type byte of the TUN/TAP driver (`<linux/if_tun.h>`).
const TUN_IOCTL_TYPE: c_uint = b'T' as c_uint;
/// `TUNSETIFF`: creates (or attaches to) the interface named in a `struct ifreq`, with the
/// `IFF_*` flags given there; the kernel writes the interface's final name back.
const TUNSETIFF: c_ulong = ioctl_expr(_IOC_WRITE, TUN_IOCTL_TYPE, 202, INT_SIZE);
/// `TUNSETOFFLOAD`: the offloads (`TUN_F_*`) this reader can take in frames it reads: partial
/// checksums and GSO frames the kernel would otherwise finish or segment before handing them over.
const TUNSETOFFLOAD: c_ulong = ioctl_expr(_IOC_WRITE, TUN_IOCTL_TYPE, 208, INT_SIZE);
/// `TUNSETVNETHDRSZ`: the size of the vnet header that prefixes every frame (an `int` pointer).
const TUNSETVNETHDRSZ: c_ulong = ioctl_expr(_IOC_WRITE, TUN_IOCTL_TYPE, 216, INT_SIZE);
/// The argument size every TUN ioctl above is declared with (`_IOW('T', n, int)`).
const INT_SIZE: c_uint = std::mem::size_of::<c_int>() as c_uint;

/// `IFF_TAP`: an Ethernet (layer 2) interface, not a layer 3 TUN.
const IFF_TAP: c_short = 0x0002;
/// `IFF_NO_PI`: no 4-byte packet-information prefix on frames.
const IFF_NO_PI: c_short = 0x1000;
/// `IFF_VNET_HDR`: every frame starts with a virtio-net header.
const IFF_VNET_HDR: c_short = 0x4000;

/// `TUN_F_CSUM`: the reader takes frames whose checksum is left partial (`NEEDS_CSUM`).
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: the reader takes TCPv4 GSO frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: the reader takes TCPv6 GSO frames.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_UFO`: the reader takes UDP fragmentation-offload frames.
pub const TUN_F_UFO: u32 = 0x10;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union. The padding
/// makes it at least as large as the kernel's `struct ifreq`, which the kernel copies whole.
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: c_short,
    padding: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<IfReqFlags>() >= std::mem::size_of::<libc::ifreq>());

/// Errors in opening or configuring a TAP interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name cannot name a Linux network interface.
    #[error("tap name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// /dev/net/tun could not be opened.
    #[error("opening {TUN_DEVICE}: {0} (is the tun module loaded, and may this user open it?)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error(
        "creating or attaching tap {name}: {source} (needs CAP_NET_ADMIN, or a persistent tap \
         owned by this user, not in use with other flags)"
    )]
    Attach {
        /// The interface name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("setting the vnet header size of tap {name}: {source}")]
    VnetHeaderSize {
        /// The interface name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// An open TAP interface (see the module documentation for its invariants).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the TAP interface `name`, or attaches to it if it exists (e.g. made persistent by
    /// `ip tuntap add`), and sets it up for virtio-net frames.
    ///
    /// ```no_run
    /// use devices::virtio::net::Tap;
    /// let tap = Tap::open_named("kiln0")?;
    /// assert_eq!(tap.name(), "kiln0");
    /// # Ok::<(), devices::virtio::net::TapError>(())
    /// ```
    pub fn open_named(name: &str) -> Result<Self, TapError> {
        let mut request = IfReqFlags {
            name: validate_name(name)?,
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            padding: [0; 24],
        };
        // std always adds O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;
        // SAFETY: `file` is an open fd; TUNSETIFF reads and writes a `struct ifreq`, and `request`
        // is a live, exclusively borrowed buffer at least that large.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel wrote back the final name (NUL-terminated); keep ours if it is unreadable.
        let name = request
            .name
            .split(|&b| b == 0)
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .filter(|n| !n.is_empty())
            .unwrap_or(name)
            .to_owned();
        let header_size = VNET_HDR_LEN as c_int;
        // SAFETY: `file` is an open fd; TUNSETVNETHDRSZ reads one `int` through the pointer, and
        // `header_size` is a live `c_int`.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ, &header_size) };
        if ret < 0 {
            return Err(TapError::VnetHeaderSize {
                name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { file, name })
    }

    /// The interface's name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Checks `name` the way the kernel will (`dev_valid_name`) and encodes it for `struct ifreq`.
fn validate_name(name: &str) -> Result<[u8; IFNAMSIZ], TapError> {
    let invalid = |reason| TapError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("not a valid interface name"));
    }
    if name.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    if name.contains('/') {
        return Err(invalid("contains '/'"));
    }
    if name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(invalid("contains ':' or whitespace"));
    }
    let mut encoded = [0u8; IFNAMSIZ];
    encoded[..name.len()].copy_from_slice(name.as_bytes());
    Ok(encoded)
}

/// The TAP offloads to enable for the guest features `acked`: a partial checksum if the guest
/// takes them (GUEST_CSUM), and each GSO kind it takes. GSO needs checksum offload (virtio and
/// the kernel both require it), so without GUEST_CSUM nothing is enabled.
pub fn tap_offload_flags(acked: u64) -> u32 {
    if acked & feature::GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    for (guest_feature, tun_flag) in [
        (feature::GUEST_TSO4, TUN_F_TSO4),
        (feature::GUEST_TSO6, TUN_F_TSO6),
        (feature::GUEST_UFO, TUN_F_UFO),
    ] {
        if acked & guest_feature != 0 {
            flags |= tun_flag;
        }
    }
    flags
}

impl NetBackend for Tap {
    /// TUNSETOFFLOAD with `flags` (`TUN_F_*`, e.g. from [`tap_offload_flags`]).
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: `self.file` is an open TAP fd; TUNSETOFFLOAD takes its argument by value and
        // touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD, c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Reads one frame (vnet header first); `WouldBlock` when none is queued.
impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

/// Writes one frame (vnet header first) in a single write(2).
impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_libc() {
        assert_eq!(i128::from(TUNSETIFF), i128::from(libc::TUNSETIFF));
        assert_eq!(i128::from(TUNSETOFFLOAD), i128::from(libc::TUNSETOFFLOAD));
        assert_eq!(
            i128::from(TUNSETVNETHDRSZ),
            i128::from(libc::TUNSETVNETHDRSZ)
        );
        assert_eq!(c_int::from(IFF_TAP), libc::IFF_TAP);
        assert_eq!(c_int::from(IFF_NO_PI), libc::IFF_NO_PI);
        assert_eq!(c_int::from(IFF_VNET_HDR), libc::IFF_VNET_HDR);
        assert_eq!(
            [TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO],
            [
                libc::TUN_F_CSUM,
                libc::TUN_F_TSO4,
                libc::TUN_F_TSO6,
                libc::TUN_F_UFO
            ]
        );
        assert_eq!(IFNAMSIZ, libc::IFNAMSIZ);
    }

    #[test]
    fn names_are_validated() {
        for bad in [
            "",
            "a/b",
            "x\0y",
            "0123456789abcdef",
            ".",
            "..",
            "a b",
            "a:1",
        ] {
            assert!(
                matches!(validate_name(bad), Err(TapError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        let ok = validate_name("0123456789abcde").unwrap();
        assert_eq!(&ok[..15], b"0123456789abcde");
        assert_eq!(ok[15], 0);
        let err = Tap::open_named("bad/name").unwrap_err().to_string();
        assert!(err.contains("bad/name") && err.contains('/'), "{err}");
    }

    #[test]
    fn offload_flags_follow_guest_features() {
        assert_eq!(tap_offload_flags(0), 0);
        assert_eq!(tap_offload_flags(feature::GUEST_TSO4), 0, "GSO needs CSUM");
        assert_eq!(tap_offload_flags(feature::GUEST_CSUM), TUN_F_CSUM);
        let all = feature::GUEST_CSUM | feature::GUEST_TSO4 | feature::GUEST_TSO6;
        assert_eq!(
            tap_offload_flags(all | feature::GUEST_UFO),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO
        );
    }

    /// Opens a real TAP inside a fresh network namespace (so the host's interfaces are never
    /// touched). Skipped where the test cannot unshare or has no /dev/net/tun.
    #[test]
    fn real_tap_in_a_private_netns() {
        let result = std::thread::spawn(|| {
            // SAFETY: unshare(2) only changes this thread's namespace membership; the thread
            // exists for this test alone and touches no shared network state.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                println!("skipping real_tap_in_a_private_netns: unshare(CLONE_NEWNET): {e}");
                return;
            }
            let tap = match Tap::open_named("kilntest0") {
                Ok(tap) => tap,
                Err(TapError::OpenTun(e)) => {
                    println!("skipping real_tap_in_a_private_netns: {TUN_DEVICE}: {e}");
                    return;
                }
                Err(e) => panic!("opening a tap in a private netns: {e}"),
            };
            assert_eq!(tap.name(), "kilntest0");
            assert!(tap.as_raw_fd() >= 0);
            tap.set_offload(0).unwrap();
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                .unwrap();
            // Nothing has been sent on a down interface: a read would block.
            let mut tap = tap;
            let mut buf = [0u8; 64];
            let err = tap.read(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            // A non-persistent tap goes away with its fd; opening the name again recreates it.
            drop(tap);
            let again = Tap::open_named("kilntest0").unwrap();
            assert_eq!(again.name(), "kilntest0");
        })
        .join();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
