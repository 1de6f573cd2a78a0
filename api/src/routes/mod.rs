//! From an HTTP request line and body to one typed [`ApiRequest`].
//!
//! [`parse_request`] is the only place raw API input is looked at: it matches the method and path
//! against [`ROUTES`], checks path IDs, deserializes the body into its [`crate::models`] type and
//! validates it. What comes out is a request the VMM can act on without checking anything the
//! client controls again. Errors carry Firecracker's status (always 400 here) and, where
//! Firecracker has the same check, Firecracker's fault message.

use serde::de::DeserializeOwned;

use crate::models::{
    check_id, ActionType, ApiError, Balloon, BalloonStartCmd, BalloonStatsUpdate, BalloonUpdate,
    BootSource, Drive, EntropyDevice, InstanceActionInfo, Logger, MachineConfiguration,
    MachineConfigurationPatch, Metrics, MmdsConfig, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SerialDevice, SnapshotCreateParams, SnapshotLoadParams,
    ValidationError, Vm, VmState, Vsock,
};

#[cfg(test)]
mod openapi_check;
#[cfg(test)]
mod tests;

/// One route Kiln serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method.
    pub method: &'static str,
    /// The path template (`/drives/{drive_id}`).
    pub path: &'static str,
    /// Firecracker's name for the route in its `get_api_requests`, `put_api_requests` and
    /// `patch_api_requests` metrics (`drive` gives `drive_count` and `drive_fails`), if
    /// Firecracker counts the route.
    pub metric: Option<&'static str>,
}

const fn route(method: &'static str, path: &'static str, metric: Option<&'static str>) -> Route {
    Route {
        method,
        path,
        metric,
    }
}

/// Every route Kiln serves, once: `api/openapi.yaml` documents exactly these, the parser serves
/// them and the VMM's request metrics are named from them.
pub const ROUTES: &[Route] = &[
    route("GET", "/", Some("instance_info")),
    route("GET", "/version", Some("vmm_version")),
    route("PUT", "/boot-source", Some("boot_source")),
    route("GET", "/machine-config", Some("machine_cfg")),
    route("PUT", "/machine-config", Some("machine_cfg")),
    route("PATCH", "/machine-config", Some("machine_cfg")),
    route("PUT", "/drives/{drive_id}", Some("drive")),
    route("PATCH", "/drives/{drive_id}", Some("drive")),
    route("PUT", "/network-interfaces/{iface_id}", Some("network")),
    route("PATCH", "/network-interfaces/{iface_id}", Some("network")),
    route("PUT", "/vsock", Some("vsock")),
    route("PUT", "/entropy", None),
    route("PUT", "/actions", Some("actions")),
    route("PATCH", "/vm", None),
    route("GET", "/vm/config", None),
    route("PUT", "/logger", Some("logger")),
    route("PUT", "/metrics", Some("metrics")),
    route("PUT", "/serial", Some("serial")),
    route("GET", "/balloon", None),
    route("PUT", "/balloon", None),
    route("PATCH", "/balloon", None),
    route("GET", "/balloon/statistics", None),
    route("PATCH", "/balloon/statistics", None),
    route("PATCH", "/balloon/hinting/start", None),
    route("GET", "/balloon/hinting/status", None),
    route("PATCH", "/balloon/hinting/stop", None),
    route("GET", "/mmds", Some("mmds")),
    route("PUT", "/mmds", Some("mmds")),
    route("PATCH", "/mmds", Some("mmds")),
    route("PUT", "/mmds/config", None),
    route("PUT", "/snapshot/create", None),
    route("PUT", "/snapshot/load", None),
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
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start` (an empty body is the default command).
    StartBalloonHinting(BalloonStartCmd),
    /// `GET /balloon/hinting/status`.
    GetBalloonHintingStatus,
    /// `PATCH /balloon/hinting/stop` (any body is ignored, as by Firecracker).
    StopBalloonHinting,
    /// `GET /mmds`: the MMDS document.
    GetMmds,
    /// `PUT /mmds`: a new MMDS document (any JSON).
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch of the document.
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(Box<SnapshotLoadParams>),
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
        /// The path's first segment (the resource), as Firecracker reports it.
        path: String,
    },
    /// A `GET` with a body (Firecracker's text).
    #[error("GET request cannot have a body.")]
    GetWithBody,
    /// A sub-path of `/balloon` that does not exist (Firecracker's text).
    #[error("Unrecognized {method} request path `{path}`.")]
    UnrecognizedPath {
        /// The request method.
        method: &'static str,
        /// The part of the path that is not known.
        path: String,
    },
    /// `PUT /snapshot` without `create` or `load` (Firecracker's text).
    #[error("Missing snapshot operation type.")]
    MissingSnapshotOperation,
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
    // Firecracker's matching: the first segment picks the resource; what follows is looked at
    // only where the resource has sub-paths (`/vm/config`, `/balloon/...`) or an id
    // (`/drives/{id}`), and ignored otherwise, so `PUT /vsock/vsock0` is `PUT /vsock`.
    let mut segments = path.trim_start_matches('/').split_terminator('/');
    let resource = segments.next().unwrap_or("");
    let rest: Vec<&str> = segments.collect();
    let has_body = !body.is_empty();
    let invalid = || RequestError::InvalidPathMethod {
        method: method.to_string(),
        path: resource.to_string(),
    };
    let id = || rest.first().copied();

    match (method, resource, has_body) {
        ("GET", "", false) => Ok(ApiRequest::GetInstanceInfo),
        ("GET", "balloon", false) => match rest.as_slice() {
            [] => Ok(ApiRequest::GetBalloon),
            ["statistics", ..] => Ok(ApiRequest::GetBalloonStats),
            ["hinting", "status", ..] => Ok(ApiRequest::GetBalloonHintingStatus),
            ["hinting", other, ..] => Err(RequestError::UnrecognizedPath {
                method: "GET",
                path: format!("/hinting/{other}"),
            }),
            ["hinting"] => Err(RequestError::UnrecognizedPath {
                method: "GET",
                path: "/hinting/".to_string(),
            }),
            [other, ..] => Err(RequestError::UnrecognizedPath {
                method: "GET",
                path: (*other).to_string(),
            }),
        },
        ("GET", "version", false) => Ok(ApiRequest::GetVersion),
        ("GET", "vm", false) if id() == Some("config") => Ok(ApiRequest::GetVmConfig),
        ("GET", "machine-config", false) => Ok(ApiRequest::GetMachineConfig),
        ("GET", "mmds", false) => Ok(ApiRequest::GetMmds),
        ("GET", _, true) => Err(RequestError::GetWithBody),

        ("PUT", "actions", true) => {
            let action: InstanceActionInfo = parse_body(body)?;
            Ok(ApiRequest::Action(action.action_type))
        }
        ("PUT", "balloon", true) => {
            let balloon: Balloon = parse_body(body)?;
            balloon.validate()?;
            Ok(ApiRequest::PutBalloon(balloon))
        }
        ("PUT", "boot-source", true) => {
            let boot: BootSource = parse_body(body)?;
            boot.validate()?;
            Ok(ApiRequest::PutBootSource(boot))
        }
        ("PUT", "drives", true) => {
            let id = path_id(id())?;
            let drive: Drive = parse_body(body)?;
            same_id(id, &drive.drive_id)?;
            drive.validate()?;
            Ok(ApiRequest::PutDrive(drive))
        }
        ("PUT", "logger", true) => {
            let logger: Logger = parse_body(body)?;
            logger.validate()?;
            Ok(ApiRequest::PutLogger(logger))
        }
        ("PUT", "serial", true) => {
            let serial: SerialDevice = parse_body(body)?;
            serial.validate()?;
            Ok(ApiRequest::PutSerial(serial))
        }
        ("PUT", "machine-config", true) => {
            let machine: MachineConfiguration = parse_body(body)?;
            machine.validate()?;
            Ok(ApiRequest::PutMachineConfig(machine))
        }
        ("PUT", "metrics", true) => {
            let metrics: Metrics = parse_body(body)?;
            metrics.validate()?;
            Ok(ApiRequest::PutMetrics(metrics))
        }
        ("PUT", "network-interfaces", true) => {
            let id = path_id(id())?;
            let iface: NetworkInterface = parse_body(body)?;
            same_id(id, &iface.iface_id)?;
            iface.validate()?;
            Ok(ApiRequest::PutNetworkInterface(iface))
        }
        ("PUT", "vsock", true) => {
            let vsock: Vsock = parse_body(body)?;
            vsock.validate()?;
            Ok(ApiRequest::PutVsock(vsock))
        }
        ("PUT", "mmds", true) => match id() {
            None => Ok(ApiRequest::PutMmds(parse_body(body)?)),
            Some("config") => {
                let config: MmdsConfig = parse_body(body)?;
                config.validate()?;
                Ok(ApiRequest::PutMmdsConfig(config))
            }
            Some(other) => Err(RequestError::UnrecognizedPath {
                method: "PUT",
                path: other.to_string(),
            }),
        },
        ("PATCH", "mmds", true) => Ok(ApiRequest::PatchMmds(parse_body(body)?)),
        ("PUT", "snapshot", true) => match id() {
            Some("create") => {
                let params: SnapshotCreateParams = parse_body(body)?;
                params.validate()?;
                Ok(ApiRequest::CreateSnapshot(params))
            }
            Some("load") => {
                let params: SnapshotLoadParams = parse_body(body)?;
                params.validate()?;
                Ok(ApiRequest::LoadSnapshot(Box::new(params)))
            }
            Some(other) => Err(RequestError::InvalidPathMethod {
                method: method.to_string(),
                path: format!("/snapshot/{other}"),
            }),
            None => Err(RequestError::MissingSnapshotOperation),
        },
        ("PUT", "entropy", true) => {
            let entropy: EntropyDevice = parse_body(body)?;
            entropy.validate()?;
            Ok(ApiRequest::PutEntropy(entropy))
        }
        ("PUT", _, false) => Err(RequestError::EmptyPut),

        // The hinting commands are the one PATCH Firecracker takes without a body.
        ("PATCH", "balloon", _) => match (rest.as_slice(), has_body) {
            (["statistics", ..], true) => Ok(ApiRequest::PatchBalloonStats(parse_body(body)?)),
            (["hinting", "start", ..], _) => {
                let cmd = if has_body {
                    parse_body(body)?
                } else {
                    BalloonStartCmd::default()
                };
                Ok(ApiRequest::StartBalloonHinting(cmd))
            }
            (["hinting", "stop", ..], _) => Ok(ApiRequest::StopBalloonHinting),
            (["hinting", other, ..], _) => Err(RequestError::UnrecognizedPath {
                method: "PATCH",
                path: format!("/hinting/{other}"),
            }),
            (["hinting"], _) => Err(RequestError::UnrecognizedPath {
                method: "PATCH",
                path: "/hinting/".to_string(),
            }),
            (_, true) => {
                let update: BalloonUpdate = parse_body(body)?;
                update.validate()?;
                Ok(ApiRequest::PatchBalloon(update))
            }
            (_, false) => Err(RequestError::EmptyPatch),
        },
        ("PATCH", "drives", true) => {
            let id = path_id(id())?;
            let drive: PartialDrive = parse_body(body)?;
            same_id(id, &drive.drive_id)?;
            drive.validate()?;
            Ok(ApiRequest::PatchDrive(drive))
        }
        ("PATCH", "machine-config", true) => {
            let patch: MachineConfigurationPatch = parse_body(body)?;
            if patch.is_empty() {
                return Err(RequestError::EmptyPatch);
            }
            patch.validate()?;
            Ok(ApiRequest::PatchMachineConfig(patch))
        }
        ("PATCH", "network-interfaces", true) => {
            let id = path_id(id())?;
            let iface: PartialNetworkInterface = parse_body(body)?;
            same_id(id, &iface.iface_id)?;
            iface.validate()?;
            Ok(ApiRequest::PatchNetworkInterface(iface))
        }
        ("PATCH", "vm", true) => {
            let vm: Vm = parse_body(body)?;
            Ok(ApiRequest::PatchVm(vm.state))
        }
        ("PATCH", _, false) => Err(RequestError::EmptyPatch),
        _ => Err(invalid()),
    }
}

/// The `{id}` of `/<resource>/{id}[/...]`: Firecracker's "The ID cannot be empty." without
/// one; checked as an id.
fn path_id(id: Option<&str>) -> Result<&str, RequestError> {
    let id = id.ok_or(ValidationError::EmptyId)?;
    check_id(id)?;
    Ok(id)
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
