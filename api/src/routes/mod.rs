//! From an HTTP request line and body to one typed [`ApiRequest`].
//!
//! [`parse_request`] is the only place raw API input is looked at: it matches the method and path
//! against [`ROUTES`], checks path IDs, deserializes the body into its [`crate::models`] type and
//! validates it. What comes out is a request the VMM can act on without checking anything the
//! client controls again. Errors carry Firecracker's status (always 400 here) and, where
//! Firecracker has the same check, Firecracker's fault message.

use serde::de::DeserializeOwned;

use crate::models::{
    check_id, ActionType, ApiError, BootSource, Drive, EntropyDevice, InstanceActionInfo, Logger,
    MachineConfiguration, MachineConfigurationPatch, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SerialDevice, ValidationError, Vm, VmState, Vsock,
};

#[cfg(test)]
mod openapi_check;
#[cfg(test)]
mod tests;

/// Every `(method, path template)` Kiln serves; `api/openapi.yaml` documents exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("PUT", "/boot-source"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/serial"),
];

/// One parsed and validated API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: instance information.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfiguration),
    /// `PATCH /machine-config` (at least one field present).
    PatchMachineConfig(MachineConfigurationPatch),
    /// `PUT /drives/{drive_id}`; the ID of the path equals `drive_id`.
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`; the ID of the path equals `drive_id`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{iface_id}`; the ID of the path equals `iface_id`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}`; the ID of the path equals `iface_id`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /serial`.
    PutSerial(SerialDevice),
}

/// Why a request was refused before reaching the VMM. Every variant answers HTTP 400, as
/// Firecracker does; [`fault_message`](Self::fault_message) is the text for the
/// `{"fault_message": ...}` body.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No route for this method and path (Firecracker's text; Firecracker prints only the first
    /// path segment, Kiln the whole path).
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// The request method as received.
        method: String,
        /// The request path as received (without any query string).
        path: String,
    },
    /// A `GET` with a body (Firecracker's text).
    #[error("GET request cannot have a body.")]
    GetWithBody,
    /// A `PUT` without a body (Firecracker's text).
    #[error("Empty PUT request.")]
    EmptyPut,
    /// A `PATCH` without a body, or `PATCH /machine-config` with no field (Firecracker's text).
    #[error("Empty PATCH request.")]
    EmptyPatch,
    /// The body is not valid JSON for the route's type: syntax, wrong type, missing or unknown
    /// field, unknown enum string, integer out of range (Firecracker's text around serde_json's).
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(#[from] serde_json::Error),
    /// The body's `drive_id` / `iface_id` differs from the path's (Firecracker's text).
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch {
        /// The ID in the path.
        path_id: String,
        /// The ID in the body.
        body_id: String,
    },
    /// The path ID or the body failed validation.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl RequestError {
    /// The HTTP status to answer with: 400 Bad Request for every variant, like Firecracker.
    pub fn status(&self) -> u16 {
        400
    }

    /// The `fault_message` text.
    pub fn fault_message(&self) -> String {
        self.to_string()
    }

    /// The JSON error body, `{"fault_message": ...}`.
    pub fn to_api_error(&self) -> ApiError {
        ApiError::new(self.fault_message())
    }
}

/// Parses one request into an [`ApiRequest`].
///
/// `method` is the request method exactly as received (methods are case-sensitive), `path` the
/// request target (a query string, if any, is ignored), `body` the request body; an empty body
/// means "no body", as for Firecracker. Mirrors Firecracker's order of checks: a `GET` with a body
/// and a `PUT`/`PATCH` without one are refused whatever the path; then the route; then the path
/// ID; then the body (JSON, then path/body ID match, then validation).
///
/// Unlike Firecracker, which ignores extra path segments (`PUT /boot-source/x` is
/// `PUT /boot-source` there), Kiln matches whole paths; a trailing `/` and repeated leading `/`
/// are tolerated as in Firecracker.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, RequestError> {
    let path = path.split_once('?').map_or(path, |(p, _query)| p);
    let segments: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();
    let has_body = !body.is_empty();

    match (method, has_body) {
        ("GET", true) => return Err(RequestError::GetWithBody),
        ("PUT", false) => return Err(RequestError::EmptyPut),
        ("PATCH", false) => return Err(RequestError::EmptyPatch),
        _ => {}
    }

    let invalid = || RequestError::InvalidPathMethod {
        method: method.to_string(),
        path: path.to_string(),
    };

    match (method, segments.as_slice()) {
        ("GET", []) => Ok(ApiRequest::GetInstanceInfo),
        ("GET", ["version"]) => Ok(ApiRequest::GetVersion),
        ("GET", ["machine-config"]) => Ok(ApiRequest::GetMachineConfig),
        ("GET", ["vm", "config"]) => Ok(ApiRequest::GetVmConfig),

        ("PUT", ["boot-source"]) => {
            let boot: BootSource = parse_body(body)?;
            boot.validate()?;
            Ok(ApiRequest::PutBootSource(boot))
        }
        ("PUT", ["machine-config"]) => {
            let machine: MachineConfiguration = parse_body(body)?;
            machine.validate()?;
            Ok(ApiRequest::PutMachineConfig(machine))
        }
        ("PATCH", ["machine-config"]) => {
            let patch: MachineConfigurationPatch = parse_body(body)?;
            if patch.is_empty() {
                return Err(RequestError::EmptyPatch);
            }
            patch.validate()?;
            Ok(ApiRequest::PatchMachineConfig(patch))
        }
        ("PUT", ["drives", rest @ ..]) => {
            let id = path_id(rest).ok_or_else(invalid)??;
            let drive: Drive = parse_body(body)?;
            same_id(id, &drive.drive_id)?;
            drive.validate()?;
            Ok(ApiRequest::PutDrive(drive))
        }
        ("PATCH", ["drives", rest @ ..]) => {
            let id = path_id(rest).ok_or_else(invalid)??;
            let drive: PartialDrive = parse_body(body)?;
            same_id(id, &drive.drive_id)?;
            drive.validate()?;
            Ok(ApiRequest::PatchDrive(drive))
        }
        ("PUT", ["network-interfaces", rest @ ..]) => {
            let id = path_id(rest).ok_or_else(invalid)??;
            let iface: NetworkInterface = parse_body(body)?;
            same_id(id, &iface.iface_id)?;
            iface.validate()?;
            Ok(ApiRequest::PutNetworkInterface(iface))
        }
        ("PATCH", ["network-interfaces", rest @ ..]) => {
            let id = path_id(rest).ok_or_else(invalid)??;
            let iface: PartialNetworkInterface = parse_body(body)?;
            same_id(id, &iface.iface_id)?;
            iface.validate()?;
            Ok(ApiRequest::PatchNetworkInterface(iface))
        }
        ("PUT", ["vsock"]) => {
            let vsock: Vsock = parse_body(body)?;
            vsock.validate()?;
            Ok(ApiRequest::PutVsock(vsock))
        }
        ("PUT", ["entropy"]) => {
            let entropy: EntropyDevice = parse_body(body)?;
            entropy.validate()?;
            Ok(ApiRequest::PutEntropy(entropy))
        }
        ("PUT", ["actions"]) => {
            let action: InstanceActionInfo = parse_body(body)?;
            Ok(ApiRequest::Action(action.action_type))
        }
        ("PATCH", ["vm"]) => {
            let vm: Vm = parse_body(body)?;
            Ok(ApiRequest::PatchVm(vm.state))
        }
        ("PUT", ["logger"]) => {
            let logger: Logger = parse_body(body)?;
            logger.validate()?;
            Ok(ApiRequest::PutLogger(logger))
        }
        ("PUT", ["metrics"]) => {
            let metrics: Metrics = parse_body(body)?;
            metrics.validate()?;
            Ok(ApiRequest::PutMetrics(metrics))
        }
        ("PUT", ["serial"]) => {
            let serial: SerialDevice = parse_body(body)?;
            serial.validate()?;
            Ok(ApiRequest::PutSerial(serial))
        }
        _ => Err(invalid()),
    }
}

/// The `{id}` of `/<resource>/{id}`: `None` if there are more segments (no such route), an error
/// if the ID is missing (Firecracker's "The ID cannot be empty.") or malformed.
fn path_id<'a>(rest: &[&'a str]) -> Option<Result<&'a str, RequestError>> {
    match rest {
        [] => Some(Err(ValidationError::EmptyId.into())),
        [id] => Some(check_id(id).map(|()| *id).map_err(RequestError::from)),
        _ => None,
    }
}

/// Requires the body's ID to equal the path's.
fn same_id(path_id: &str, body_id: &str) -> Result<(), RequestError> {
    if path_id != body_id {
        return Err(RequestError::IdMismatch {
            path_id: path_id.to_string(),
            body_id: body_id.to_string(),
        });
    }
    Ok(())
}

/// Deserializes a body with serde_json; trailing non-whitespace is an error.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    Ok(serde_json::from_slice(body)?)
}
