//! `PUT /mmds/config`, and the MMDS document of `PUT|PATCH|GET /mmds`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{check_id, ValidationError};

pub use ::devices::mmds::MmdsVersion;

/// Firecracker's default MMDS address.
pub const DEFAULT_MMDS_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The body of `PUT /mmds/config`: which interfaces reach MMDS, at which address, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// `V1` (plain GETs, the default) or `V2` (session tokens).
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces (their `iface_id`s) through which the guest reaches MMDS.
    pub network_interfaces: Vec<String>,
    /// The address MMDS answers at; link-local, 169.254.169.254 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer every request in IMDS plain text, whatever its `Accept` header.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// At least one interface, each a valid id; a link-local address (Firecracker's rules).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.network_interfaces.is_empty() {
            return Err(ValidationError::MmdsNoInterfaces);
        }
        for id in &self.network_interfaces {
            check_id(id)?;
        }
        if let Some(addr) = self.ipv4_address {
            if !addr.is_link_local() {
                return Err(ValidationError::MmdsAddressNotLinkLocal(addr));
            }
        }
        Ok(())
    }

    /// The address MMDS answers at.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<MmdsConfig, String> {
        let config: MmdsConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn firecracker_bodies_and_rules() {
        let c = config(r#"{"network_interfaces":["eth0"]}"#).unwrap();
        assert_eq!(c.version, MmdsVersion::V1);
        assert_eq!(c.ipv4(), DEFAULT_MMDS_IPV4);
        let c = config(
            r#"{"version":"V2","network_interfaces":["eth0","eth1"],"ipv4_address":"169.254.170.2","imds_compat":true}"#,
        )
        .unwrap();
        assert_eq!(c.version, MmdsVersion::V2);
        assert_eq!(c.ipv4(), Ipv4Addr::new(169, 254, 170, 2));
        assert!(c.imds_compat);
        assert!(config(r#"{"network_interfaces":[]}"#)
            .unwrap_err()
            .contains("empty"));
        assert!(
            config(r#"{"network_interfaces":["eth0"],"ipv4_address":"10.0.0.1"}"#)
                .unwrap_err()
                .contains("link local")
        );
        assert!(config(r#"{"network_interfaces":["eth-0"]}"#).is_err());
        assert!(config(r#"{"version":"V3","network_interfaces":["eth0"]}"#).is_err());
        assert!(config(r#"{"network_interfaces":["eth0"],"x":1}"#).is_err());
    }
}
