//! The default guest: the kernel and initramfs that `guest-images/build.sh` builds (and caches).
//!
//! `KILN_GUEST_IMAGES=DIR` points at an already built output directory; otherwise Kiln runs the
//! build script of the source tree it was built from, which prints its output directory on stdout
//! and its progress on stderr (passed through, so a first build is visibly alive).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The build script in the source tree Kiln was compiled from.
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-images/build.sh");

/// Errors in finding or building the default guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestImagesError {
    /// The build script could not be started.
    #[error("running {script}: {source}")]
    Spawn {
        /// The build script.
        script: PathBuf,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },
    /// The build script failed.
    #[error("{script} failed ({status}); its output above says why")]
    Failed {
        /// The build script.
        script: PathBuf,
        /// Its exit status, as text.
        status: String,
    },
    /// An expected image is missing from the output directory.
    #[error("default guest image {0} is missing (set KILN_GUEST_IMAGES to a built guest-images directory, or pass --kernel)")]
    Missing(PathBuf),
}

/// The default guest's boot images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// Uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// Uncompressed cpio initramfs.
    pub initramfs: PathBuf,
    /// ext4 root filesystem image.
    pub rootfs: PathBuf,
    /// The initramfs of `kiln run -- CMD`: only its init (`guest-images/run/init.c`).
    pub run_initramfs: PathBuf,
}

impl GuestImages {
    fn in_dir(dir: &Path) -> Result<Self, GuestImagesError> {
        let images = Self {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            rootfs: dir.join("rootfs.ext4"),
            run_initramfs: dir.join("run-initramfs.cpio"),
        };
        for path in [&images.vmlinux, &images.initramfs] {
            if !path.is_file() {
                return Err(GuestImagesError::Missing(path.clone()));
            }
        }
        Ok(images)
    }
}

/// Runs one of guest-images' scripts, which builds (or installs) and caches something and
/// prints its path as its last line of stdout; its progress goes to Kiln's stderr.
pub fn run_build_script(script: &Path) -> Result<PathBuf, GuestImagesError> {
    if !script.is_file() {
        return Err(GuestImagesError::Missing(script.to_path_buf()));
    }
    let output = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| GuestImagesError::Spawn {
            script: script.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(GuestImagesError::Failed {
            script: script.to_path_buf(),
            status: output.status.to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(PathBuf::from(stdout.lines().last().unwrap_or("").trim()))
}

/// Finds the default guest, building it first if needed.
pub fn default_guest() -> Result<GuestImages, GuestImagesError> {
    if let Some(dir) = std::env::var_os("KILN_GUEST_IMAGES") {
        return GuestImages::in_dir(Path::new(&dir));
    }
    let script = PathBuf::from(BUILD_SCRIPT);
    if !script.is_file() {
        return Err(GuestImagesError::Missing(script));
    }
    GuestImages::in_dir(&run_build_script(&script)?)
}
