//! `PUT` and `PATCH /network-interfaces/{iface_id}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{check_id, check_rate_limiter, RateLimiterConfig, ValidationError};

/// Linux's `IFNAMSIZ`: interface names are at most `IFNAMSIZ - 1` bytes.
pub const IFNAMSIZ: usize = 16;

/// A MAC address, written in JSON as six colon-separated hex bytes (`"06:00:ac:10:00:02"`).
///
/// Parsed while the body is deserialized, so a malformed address is a serde error naming the
/// value and its position in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six colon-separated hex bytes such as \"06:00:ac:10:00:02\"")]
pub struct MacAddrError(String);

impl MacAddr {
    /// The six bytes, first byte first.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// True for a multicast (group) address, which a NIC cannot own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The body of `PUT /network-interfaces/{iface_id}`: one virtio-net device on a host tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Interface ID; must equal the `{iface_id}` of the path.
    pub iface_id: String,
    /// Host tap device name.
    pub host_dev_name: String,
    /// The guest's MAC address; absent lets the guest driver pick one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// MTU advertised with `VIRTIO_NET_F_MTU`, 68 to 65535; absent advertises none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Rate limiter for packets the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Rate limiter for packets the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// True if `name` can name a Linux network interface: 1 to `IFNAMSIZ - 1` bytes without '/',
/// NUL or whitespace.
pub fn is_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

impl NetworkInterface {
    /// Checks the ID, the tap name, the MTU range and both rate limiters.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id(&self.iface_id)?;
        if !is_tap_name(&self.host_dev_name) {
            return Err(ValidationError::InvalidHostDevName {
                name: self.host_dev_name.clone(),
            });
        }
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return Err(ValidationError::InvalidMtu {
                    iface_id: self.iface_id.clone(),
                    mtu,
                });
            }
        }
        check_rate_limiter("rx_rate_limiter", self.rx_rate_limiter.as_ref())?;
        check_rate_limiter("tx_rate_limiter", self.tx_rate_limiter.as_ref())
    }
}

/// The body of `PATCH /network-interfaces/{iface_id}`: new rate limiters for an attached
/// interface. Only the given limiters change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Interface ID; must equal the `{iface_id}` of the path.
    pub iface_id: String,
    /// New receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl PartialNetworkInterface {
    /// Checks the ID and both rate limiters.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id(&self.iface_id)?;
        check_rate_limiter("rx_rate_limiter", self.rx_rate_limiter.as_ref())?;
        check_rate_limiter("tx_rate_limiter", self.tx_rate_limiter.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac.bytes(), [0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        assert!(!mac.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        for bad in [
            "",
            "06:00:AC:10:00",
            "06:00:AC:10:00:02:03",
            "06:00:AC:10:00:2",
            "06:00:AC:10:00:0g",
            "06-00-AC-10-00-02",
            "+6:00:AC:10:00:02",
            "06:00:AC:10:00:02:",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(MacAddrError(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn firecracker_go_sdk_body_parses() {
        let n: NetworkInterface = serde_json::from_str(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"AA:FC:00:00:00:01"}"#,
        )
        .unwrap();
        n.validate().unwrap();
        assert_eq!(n.guest_mac, Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])));
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"aa:fc:00:00:00:01"}"#
        );

        let n: NetworkInterface = serde_json::from_str(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":9000,
                "rx_rate_limiter":{"bandwidth":{"size":1000,"refill_time":10}},
                "tx_rate_limiter":{"ops":{"size":10,"refill_time":10}}}"#,
        )
        .unwrap();
        n.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        let err = serde_json::from_str::<NetworkInterface>(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"zz"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid MAC address \"zz\""),
            "{err}"
        );
        let err = serde_json::from_str::<NetworkInterface>(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":70000}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("expected u16"), "{err}");
        let err = serde_json::from_str::<NetworkInterface>(r#"{"iface_id":"eth0"}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `host_dev_name`"),
            "{err}"
        );

        let n = |json: &str| {
            serde_json::from_str::<NetworkInterface>(json)
                .unwrap()
                .validate()
        };
        assert!(matches!(
            n(r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":67}"#),
            Err(ValidationError::InvalidMtu { mtu: 67, .. })
        ));
        for name in ["", "a/b", "tap 0", "sixteen_chars_xx"] {
            let json = format!(r#"{{"iface_id":"eth0","host_dev_name":"{name}"}}"#);
            assert!(
                matches!(n(&json), Err(ValidationError::InvalidHostDevName { .. })),
                "{name}"
            );
        }
        n(r#"{"iface_id":"eth0","host_dev_name":"fifteen_chars_x"}"#).unwrap();
        assert!(matches!(
            n(r#"{"iface_id":"eth.0","host_dev_name":"tap0"}"#),
            Err(ValidationError::InvalidIdCharacters { .. })
        ));
        assert!(matches!(
            n(r#"{"iface_id":"eth0","host_dev_name":"tap0",
                  "tx_rate_limiter":{"ops":{"size":0,"refill_time":5}}}"#),
            Err(ValidationError::RateLimiter {
                field: "tx_rate_limiter",
                ..
            })
        ));
    }

    #[test]
    fn partial_interface() {
        let p: PartialNetworkInterface = serde_json::from_str(
            r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":1,"refill_time":1}}}"#,
        )
        .unwrap();
        p.validate().unwrap();
        let err = serde_json::from_str::<PartialNetworkInterface>(
            r#"{"iface_id":"eth0","host_dev_name":"tap1"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `host_dev_name`"),
            "{err}"
        );
    }
}
