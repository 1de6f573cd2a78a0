//! Instance-level bodies: `PUT /actions`, `PATCH /vm`, `GET /`, `GET /version` and the error
//! body every failed request gets.

use serde::{Deserialize, Serialize};

/// What `PUT /actions` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured microVM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard controller.
    SendCtrlAltDel,
}

/// The body of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action to take.
    pub action_type: ActionType,
}

/// The state `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop running the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The desired state.
    pub state: VmState,
}

/// The instance's state as `GET /` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured (or not yet), never booted.
    #[default]
    #[serde(rename = "Not started")]
    NotStarted,
    /// Booted, vCPUs running.
    Running,
    /// Booted, vCPUs paused.
    Paused,
}

/// The answer to `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// Application name (`"Kiln"`; Firecracker says `"Firecracker"`).
    pub app_name: String,
    /// MicroVM / instance ID.
    pub id: String,
    /// Current state.
    pub state: InstanceState,
    /// Monitor build version.
    pub vmm_version: String,
}

/// The answer to `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerVersion {
    /// The Firecracker API version Kiln implements.
    pub firecracker_version: String,
}

/// The body of every error answer: `{"fault_message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// What went wrong, for a person. Optional in the schema, so a body without it reads as "".
    #[serde(default)]
    pub fault_message: String,
}

impl ApiError {
    /// Wraps a message.
    pub fn new(fault_message: impl Into<String>) -> Self {
        Self {
            fault_message: fault_message.into(),
        }
    }

    /// The JSON text of this error body.
    pub fn to_json(&self) -> String {
        // A struct with one string field always serializes; the fallback is unreachable but
        // keeps this infallible without a panic.
        serde_json::to_string(self).unwrap_or_else(|_| String::from(r#"{"fault_message":""}"#))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_and_vm_state() {
        for (s, a) in [
            ("InstanceStart", ActionType::InstanceStart),
            ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
            ("FlushMetrics", ActionType::FlushMetrics),
        ] {
            let body: InstanceActionInfo =
                serde_json::from_str(&format!(r#"{{"action_type":"{s}"}}"#)).unwrap();
            assert_eq!(body.action_type, a);
        }
        let err =
            serde_json::from_str::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `Reboot`"),
            "{err}"
        );
        let vm: Vm = serde_json::from_str(r#"{"state":"Paused"}"#).unwrap();
        assert_eq!(vm.state, VmState::Paused);
        assert!(serde_json::from_str::<Vm>(r#"{"state":"paused"}"#).is_err());
    }

    #[test]
    fn instance_info_uses_firecracker_state_strings() {
        let info = InstanceInfo {
            app_name: "Kiln".into(),
            id: "anonymous-instance".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0.1.0".into(),
        };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"app_name":"Kiln","id":"anonymous-instance","state":"Not started","vmm_version":"0.1.0"}"#
        );
        let back: InstanceInfo =
            serde_json::from_str(&serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn error_body() {
        assert_eq!(
            ApiError::new(r#"say "hi""#).to_json(),
            r#"{"fault_message":"say \"hi\""}"#
        );
        assert_eq!(
            serde_json::to_string(&FirecrackerVersion {
                firecracker_version: "1.17.0-dev".into()
            })
            .unwrap(),
            r#"{"firecracker_version":"1.17.0-dev"}"#
        );
    }
}
