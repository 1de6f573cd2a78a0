//! `PUT /boot-source`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_path, ValidationError};

/// Boot source descriptor: the kernel, its command line and an optional initrd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host level path to the kernel image used to boot the guest.
    pub kernel_image_path: PathBuf,
    /// Kernel boot arguments. Absent means Kiln's default command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host level path to the initrd image used to boot the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

impl BootSource {
    /// Checks that the paths are usable and the command line has no NUL byte.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_path("kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_path("initrd_path", initrd)?;
        }
        if self
            .boot_args
            .as_deref()
            .is_some_and(|args| args.contains('\0'))
        {
            return Err(ValidationError::NulCharacter { field: "boot_args" });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_bodies() {
        let b: BootSource = serde_json::from_str(
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0 reboot=k panic=1"}"#,
        )
        .unwrap();
        assert_eq!(b.kernel_image_path, PathBuf::from("/k"));
        assert_eq!(
            b.boot_args.as_deref(),
            Some("console=ttyS0 reboot=k panic=1")
        );
        assert_eq!(b.initrd_path, None);
        b.validate().unwrap();

        let b: BootSource =
            serde_json::from_str(r#"{"kernel_image_path":"/k","initrd_path":"/i"}"#).unwrap();
        assert_eq!(b.initrd_path, Some(PathBuf::from("/i")));
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"kernel_image_path":"/k","initrd_path":"/i"}"#
        );
    }

    #[test]
    fn rejects_missing_unknown_and_empty() {
        let err = serde_json::from_str::<BootSource>(r#"{"boot_args":"x"}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("missing field `kernel_image_path`"),
            "{err}"
        );
        let err = serde_json::from_str::<BootSource>(r#"{"kernel_image_path":"/k","kernel":"x"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `kernel`"), "{err}");

        let b: BootSource = serde_json::from_str(r#"{"kernel_image_path":""}"#).unwrap();
        assert!(matches!(
            b.validate(),
            Err(ValidationError::EmptyPath {
                field: "kernel_image_path"
            })
        ));
        let b: BootSource =
            serde_json::from_str(r#"{"kernel_image_path":"/k","boot_args":"a\u0000b"}"#).unwrap();
        assert!(b.validate().is_err());
    }
}
