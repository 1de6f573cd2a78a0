//! `--share HOST_DIR[:GUEST_DIR][:ro]`: a host directory the command's VM sees over virtio-fs.

use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A host directory shared with the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The directory on the host, as given.
    pub host_dir: PathBuf,
    /// Where the guest mounts it; `None`: at the host directory's absolute path.
    pub guest_dir: Option<String>,
    /// The guest cannot write to it (virtiofsd refuses writes, and the guest mounts it `ro`).
    pub read_only: bool,
}

impl FromStr for Share {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts: Vec<&str> = s.split(':').collect();
        let mut read_only = false;
        if parts.len() > 1 {
            match parts[parts.len() - 1] {
                "ro" => {
                    read_only = true;
                    parts.pop();
                }
                "rw" => {
                    parts.pop();
                }
                _ => {}
            }
        }
        let (host, guest) = match parts[..] {
            [host] => (host, None),
            [host, guest] => (host, Some(guest)),
            _ => {
                return Err(format!(
                    "{s:?}: expected HOST_DIR[:GUEST_DIR][:ro] (paths with ':' cannot be shared)"
                ))
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host directory is empty"));
        }
        if let Some(guest) = guest {
            if !guest.starts_with('/') {
                return Err(format!(
                    "{s:?}: the guest directory {guest:?} must be an absolute path"
                ));
            }
            if guest == "/" {
                return Err(format!(
                    "{s:?}: a share cannot be mounted on the guest's / (use --host-root)"
                ));
            }
        }
        Ok(Self {
            host_dir: PathBuf::from(host),
            guest_dir: guest.map(str::to_string),
            read_only,
        })
    }
}

impl Share {
    /// The current directory, read-write at its own path (the default share).
    pub fn current_dir(dir: &Path) -> Self {
        Self {
            host_dir: dir.to_path_buf(),
            guest_dir: None,
            read_only: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let s: Share = "src".parse().unwrap();
        assert_eq!(
            (s.host_dir, s.guest_dir, s.read_only),
            ("src".into(), None, false)
        );
        let s: Share = "/data:/mnt/data:ro".parse().unwrap();
        assert_eq!(s.guest_dir.as_deref(), Some("/mnt/data"));
        assert!(s.read_only);
        let s: Share = "/data:ro".parse().unwrap();
        assert_eq!((s.guest_dir, s.read_only), (None, true));
        let s: Share = "/data:/d:rw".parse().unwrap();
        assert!(!s.read_only);
        for bad in ["", ":/x", "/a:b", "/a:/", "/a:/b:/c", "/a:/b:ro:ro"] {
            assert!(bad.parse::<Share>().is_err(), "{bad}");
        }
    }
}
