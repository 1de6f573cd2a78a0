//! `GET`, `PUT` and `PATCH /machine-config`.

use serde::{Deserialize, Serialize};

use super::ValidationError;

/// Firecracker's (and Kiln's) limit on vCPUs.
pub const MAX_VCPUS: u8 = 32;
/// Guest memory before any `PUT /machine-config`, as in Firecracker.
pub const DEFAULT_MEM_SIZE_MIB: u64 = 128;

/// Firecracker's static CPU templates. Kiln accepts only [`CpuTemplate::None`]; the others
/// deserialize (so the error says "not supported" rather than "unknown variant") and fail
/// validation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Intel C3 instance features.
    C3,
    /// Intel T2 instance features.
    T2,
    /// T2 with extra features for snapshot portability.
    T2S,
    /// T2 for Intel Cascade Lake portability.
    T2CL,
    /// T2 for AMD.
    T2A,
    /// ARM Neoverse V1 as N1.
    V1N1,
    /// No template: the host CPU's features as KVM reports them.
    #[default]
    None,
}

/// Backing pages for guest memory. Kiln accepts only [`HugePages::None`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Regular 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages via `madvise(MADV_HUGEPAGE)`.
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl CpuTemplate {
    /// The JSON string for this template.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::C3 => "C3",
            Self::T2 => "T2",
            Self::T2S => "T2S",
            Self::T2CL => "T2CL",
            Self::T2A => "T2A",
            Self::V1N1 => "V1N1",
            Self::None => "None",
        }
    }
}

impl std::fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl HugePages {
    /// The JSON string for this setting.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Transparent => "Transparent",
            Self::Hugetlbfs2M => "2M",
        }
    }
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of `PUT /machine-config` and the answer to `GET /machine-config`.
///
/// Optional fields take Firecracker's defaults when absent: `smt` false, `track_dirty_pages`
/// false, no CPU template, `huge_pages` `"None"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading. Kiln supports only `false`.
    #[serde(default)]
    pub smt: bool,
    /// Deprecated in Firecracker. Kiln supports only `"None"`; it is not reported when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking for Diff snapshots: KVM logs the guest's writes to memory.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge page backing. Kiln supports only `"None"`.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfiguration {
    /// Firecracker's configuration before any `PUT`: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

impl MachineConfiguration {
    /// Checks the ranges Firecracker checks and rejects the features Kiln does not implement.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_vcpu_count(self.vcpu_count)?;
        check_mem_size(self.mem_size_mib)?;
        check_smt(self.smt)?;
        check_cpu_template(self.cpu_template)?;
        check_huge_pages(self.huge_pages)
    }

    /// Guest memory in bytes. Cannot overflow once [`validate`](Self::validate) passed.
    pub fn mem_size_bytes(&self) -> Option<u64> {
        self.mem_size_mib.checked_mul(1 << 20)
    }
}

/// The body of `PATCH /machine-config`: any subset of [`MachineConfiguration`]'s fields, at least
/// one of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationPatch {
    /// New number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// New guest memory size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// New SMT setting (only `false` is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// New CPU template (only `"None"` is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// New dirty page tracking setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// New huge page setting (only `"None"` is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigurationPatch {
    /// True if no field is given (Firecracker answers "Empty PATCH request.").
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Checks the fields that are present, as [`MachineConfiguration::validate`] would.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(vcpus) = self.vcpu_count {
            check_vcpu_count(vcpus)?;
        }
        if let Some(mib) = self.mem_size_mib {
            check_mem_size(mib)?;
        }
        if let Some(smt) = self.smt {
            check_smt(smt)?;
        }
        check_cpu_template(self.cpu_template)?;
        if let Some(pages) = self.huge_pages {
            check_huge_pages(pages)?;
        }
        Ok(())
    }

    /// Returns `base` with the given fields replaced, validated as a whole.
    ///
    /// A `cpu_template` of `"None"` clears the template, as in Firecracker.
    pub fn apply_to(
        &self,
        base: &MachineConfiguration,
    ) -> Result<MachineConfiguration, ValidationError> {
        let cpu_template = match self.cpu_template {
            Some(CpuTemplate::None) => None,
            Some(other) => Some(other),
            None => base.cpu_template,
        };
        let updated = MachineConfiguration {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            cpu_template,
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
        };
        updated.validate()?;
        Ok(updated)
    }
}

fn check_vcpu_count(vcpus: u8) -> Result<(), ValidationError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ValidationError::InvalidVcpuCount(vcpus));
    }
    Ok(())
}

fn check_mem_size(mib: u64) -> Result<(), ValidationError> {
    if mib == 0 {
        return Err(ValidationError::InvalidMemorySize(mib));
    }
    if mib.checked_mul(1 << 20).is_none() {
        return Err(ValidationError::MemorySizeTooLarge(mib));
    }
    Ok(())
}

fn check_smt(smt: bool) -> Result<(), ValidationError> {
    if smt {
        return Err(ValidationError::SmtNotSupported);
    }
    Ok(())
}

fn check_cpu_template(template: Option<CpuTemplate>) -> Result<(), ValidationError> {
    match template {
        None | Some(CpuTemplate::None) => Ok(()),
        Some(other) => Err(ValidationError::CpuTemplateNotSupported(other)),
    }
}

fn check_huge_pages(pages: HugePages) -> Result<(), ValidationError> {
    match pages {
        HugePages::None => Ok(()),
        other => Err(ValidationError::HugePagesNotSupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<MachineConfiguration, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_match_firecracker() {
        let m = parse(r#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        assert_eq!(
            m,
            MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..MachineConfiguration::default()
            }
        );
        m.validate().unwrap();
        assert_eq!(
            serde_json::to_string(&MachineConfiguration::default()).unwrap(),
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#
        );
        assert_eq!(m.mem_size_bytes(), Some(256 << 20));
    }

    #[test]
    fn accepts_every_supported_explicit_value() {
        let m = parse(
            r#"{"vcpu_count":32,"mem_size_mib":1024,"smt":false,"track_dirty_pages":true,
                "cpu_template":"None","huge_pages":"None"}"#,
        )
        .unwrap();
        m.validate().unwrap();
        assert_eq!(m.cpu_template, Some(CpuTemplate::None));
    }

    #[test]
    fn firecracker_enum_strings_parse_but_are_refused() {
        for t in ["C3", "T2", "T2S", "T2CL", "T2A", "V1N1"] {
            let m = parse(&format!(
                r#"{{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"{t}"}}"#
            ))
            .unwrap();
            let err = m.validate().unwrap_err();
            assert!(
                matches!(err, ValidationError::CpuTemplateNotSupported(_)),
                "{t}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "Kiln does not support CPU templates: cpu_template must be \"None\", not \"{t}\"."
                )
            );
        }
        for p in ["Transparent", "2M"] {
            let m = parse(&format!(
                r#"{{"vcpu_count":1,"mem_size_mib":128,"huge_pages":"{p}"}}"#
            ))
            .unwrap();
            let err = m.validate().unwrap_err();
            assert!(matches!(err, ValidationError::HugePagesNotSupported(_)));
            assert!(err.to_string().ends_with(&format!("not \"{p}\".")), "{err}");
        }
        let m = parse(r#"{"vcpu_count":2,"mem_size_mib":128,"smt":true}"#).unwrap();
        assert!(matches!(
            m.validate(),
            Err(ValidationError::SmtNotSupported)
        ));
    }

    #[test]
    fn rejects_bad_values() {
        let err = parse(r#"{"vcpu_count":1,"mem_size_mib":128,"huge_pages":"7M"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `7M`"), "{err}");
        let err =
            parse(r#"{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"none"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `none`"), "{err}");
        let err = parse(r#"{"mem_size_mib":128}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `vcpu_count`"),
            "{err}"
        );
        let err = parse(r#"{"vcpu_count":256,"mem_size_mib":128}"#).unwrap_err();
        assert!(err.to_string().contains("expected u8"), "{err}");
        let err = parse(r#"{"vcpu_count":-1,"mem_size_mib":128}"#).unwrap_err();
        assert!(err.to_string().contains("expected u8"), "{err}");
        let err = parse(r#"{"vcpu_count":"2","mem_size_mib":128}"#).unwrap_err();
        assert!(err.to_string().contains("invalid type: string"), "{err}");

        for vcpus in [0, 33, 255] {
            let m = parse(&format!(r#"{{"vcpu_count":{vcpus},"mem_size_mib":128}}"#)).unwrap();
            let err = m.validate().unwrap_err();
            assert!(matches!(err, ValidationError::InvalidVcpuCount(v) if v == vcpus));
            assert!(err
                .to_string()
                .starts_with("The number of vCPUs must be greater than 0"));
        }
        let m = parse(r#"{"vcpu_count":1,"mem_size_mib":0}"#).unwrap();
        assert!(matches!(
            m.validate(),
            Err(ValidationError::InvalidMemorySize(0))
        ));
        let m = parse(r#"{"vcpu_count":1,"mem_size_mib":17592186044416}"#).unwrap();
        assert!(matches!(
            m.validate(),
            Err(ValidationError::MemorySizeTooLarge(_))
        ));
        assert_eq!(m.mem_size_bytes(), None);
        let m = parse(r#"{"vcpu_count":1,"mem_size_mib":17592186044415}"#).unwrap();
        m.validate().unwrap();
    }

    #[test]
    fn patch_applies_only_given_fields() {
        let patch: MachineConfigurationPatch =
            serde_json::from_str(r#"{"mem_size_mib":512}"#).unwrap();
        assert!(!patch.is_empty());
        patch.validate().unwrap();
        let base = MachineConfiguration {
            vcpu_count: 4,
            ..Default::default()
        };
        let updated = patch.apply_to(&base).unwrap();
        assert_eq!(updated.vcpu_count, 4);
        assert_eq!(updated.mem_size_mib, 512);

        let patch: MachineConfigurationPatch = serde_json::from_str("{}").unwrap();
        assert!(patch.is_empty());

        let patch: MachineConfigurationPatch = serde_json::from_str(r#"{"vcpu_count":0}"#).unwrap();
        assert!(matches!(
            patch.validate(),
            Err(ValidationError::InvalidVcpuCount(0))
        ));
        assert!(patch.apply_to(&base).is_err());

        let patch: MachineConfigurationPatch =
            serde_json::from_str(r#"{"cpu_template":"None"}"#).unwrap();
        assert_eq!(patch.apply_to(&base).unwrap().cpu_template, None);

        let err = serde_json::from_str::<MachineConfigurationPatch>(r#"{"vcpus":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpus`"), "{err}");
    }
}
