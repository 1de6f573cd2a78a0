//! Answers Firecracker API requests, in two phases that are two methods: [`ApiController::pre_boot`]
//! accumulates [`VmResources`] until `InstanceStart`; [`ApiController::runtime`] acts on the running
//! VM. A request that belongs to the other phase is answered with Firecracker's fault message.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use api::http::HttpResponse;
use api::models::{
    ActionType, FirecrackerVersion, InstanceInfo, InstanceState, PartialDrive,
    PartialNetworkInterface, RateLimiterConfig, VmState,
};
use api::routes::ApiRequest;
use serde::Serialize;

use crate::machine::RunningVm;
use crate::metrics::{MetricsError, METRICS};
use crate::resources::{ResourceError, VmResources};

/// The Firecracker API version Kiln serves (its OpenAPI document's version).
pub const API_VERSION: &str = "1.17.0";

const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

/// What a pre-boot request leads to.
pub enum PreBoot {
    /// Answer it.
    Reply(HttpResponse),
    /// `InstanceStart`: build and start the VM from the resources, then answer 204 (or the
    /// build error as a 400).
    Start,
}

/// The API's view of one microVM.
pub struct ApiController {
    id: String,
    resources: VmResources,
}

fn json<T: Serialize>(value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => HttpResponse::json(200, body),
        Err(e) => HttpResponse::fault(500, &format!("serializing the answer: {e}")),
    }
}

fn fault(message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::fault(400, &message.to_string())
}

fn done(result: Result<(), ResourceError>) -> HttpResponse {
    match result {
        Ok(()) => HttpResponse::no_content(),
        Err(e) => fault(e),
    }
}

impl ApiController {
    /// A controller for instance `id` starting from `resources` (empty, or a config file's).
    pub fn new(id: String, resources: VmResources) -> Self {
        Self { id, resources }
    }

    /// The resources as they stand.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    fn instance_info(&self, state: InstanceState) -> HttpResponse {
        json(&InstanceInfo {
            app_name: "Kiln".to_string(),
            id: self.id.clone(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Requests either phase answers the same way; `None` for the others.
    fn common(&self, request: &ApiRequest, state: InstanceState) -> Option<HttpResponse> {
        Some(match request {
            ApiRequest::GetInstanceInfo => self.instance_info(state),
            ApiRequest::GetVersion => json(&FirecrackerVersion {
                firecracker_version: API_VERSION.to_string(),
            }),
            ApiRequest::GetMachineConfig => json(&self.resources.machine_config),
            ApiRequest::GetVmConfig => json(&self.resources.full_config()),
            _ => return None,
        })
    }

    /// Handles a request before `InstanceStart`.
    pub fn pre_boot(&mut self, request: ApiRequest) -> PreBoot {
        if let Some(response) = self.common(&request, InstanceState::NotStarted) {
            return PreBoot::Reply(response);
        }
        let r = &mut self.resources;
        let response = match request {
            ApiRequest::Action(ActionType::InstanceStart) => return PreBoot::Start,
            ApiRequest::PutBootSource(boot) => {
                r.boot_source = Some(boot);
                HttpResponse::no_content()
            }
            ApiRequest::PutMachineConfig(config) => {
                r.machine_config = config;
                HttpResponse::no_content()
            }
            ApiRequest::PatchMachineConfig(patch) => done(r.patch_machine_config(&patch)),
            ApiRequest::PutDrive(drive) => done(r.put_drive(drive)),
            ApiRequest::PutNetworkInterface(net) => done(r.put_net(net)),
            ApiRequest::PutEntropy(entropy) => {
                r.entropy = Some(entropy);
                HttpResponse::no_content()
            }
            ApiRequest::PutSerial(serial) => done(r.put_serial(serial)),
            ApiRequest::PutVsock(vsock) => {
                // Replaces any earlier one; the socket is bound at InstanceStart.
                r.vsock = Some(vsock);
                HttpResponse::no_content()
            }
            ApiRequest::PutLogger(logger) => match crate::logger::configure(&logger) {
                Ok(()) => HttpResponse::no_content(),
                Err(e) => fault(format!("Logger error: {e}")),
            },
            ApiRequest::PutMetrics(metrics) => match METRICS.configure(&metrics, &self.id) {
                Ok(()) => HttpResponse::no_content(),
                Err(e) => fault(format!("Metrics error: {e}")),
            },
            ApiRequest::PatchDrive(_)
            | ApiRequest::PatchNetworkInterface(_)
            | ApiRequest::PatchVm(_)
            | ApiRequest::Action(ActionType::SendCtrlAltDel | ActionType::FlushMetrics) => {
                fault(NOT_BEFORE_START)
            }
            ApiRequest::GetInstanceInfo
            | ApiRequest::GetVersion
            | ApiRequest::GetMachineConfig
            | ApiRequest::GetVmConfig => unreachable_common(),
        };
        PreBoot::Reply(response)
    }

    /// Handles a request while the VM runs.
    pub fn runtime(&mut self, request: ApiRequest, vm: &mut RunningVm<'_>) -> HttpResponse {
        let state = if vm.is_paused() {
            InstanceState::Paused
        } else {
            InstanceState::Running
        };
        if let Some(response) = self.common(&request, state) {
            return response;
        }
        match request {
            ApiRequest::PatchVm(VmState::Paused) => {
                let started = Instant::now();
                match vm.pause() {
                    Ok(()) => {
                        METRICS.latencies_us.vmm_pause_vm.store(micros(started));
                        HttpResponse::no_content()
                    }
                    Err(e) => fault(format!("Failed to pause the microVM: {e}")),
                }
            }
            ApiRequest::PatchVm(VmState::Resumed) => {
                let started = Instant::now();
                vm.resume();
                METRICS.latencies_us.vmm_resume_vm.store(micros(started));
                HttpResponse::no_content()
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                fault("The microVM is already running.")
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                match locked(&vm.devices().i8042).trigger_ctrl_alt_del() {
                    Ok(()) => HttpResponse::no_content(),
                    Err(e) => fault(format!("Failed to send Ctrl+Alt+Del: {e}")),
                }
            }
            // As Firecracker: without a metrics output there is nothing to flush, and that is
            // not an error (clients flush on a timer whether or not metrics were set up).
            ApiRequest::Action(ActionType::FlushMetrics) => match METRICS.flush() {
                Ok(()) | Err(MetricsError::NotConfigured) => HttpResponse::no_content(),
                Err(e) => fault(format!("Metrics error: {e}")),
            },
            ApiRequest::PatchDrive(patch) => match self.patch_drive(&patch, vm) {
                Ok(()) => HttpResponse::no_content(),
                Err(e) => fault(format!("Unable to patch the block device: {e}")),
            },
            ApiRequest::PatchNetworkInterface(patch) => match self.patch_net(&patch, vm) {
                Ok(()) => HttpResponse::no_content(),
                Err(e) => fault(format!("Unable to patch the network interface: {e}")),
            },
            _ => fault(NOT_AFTER_START),
        }
    }
}

impl ApiController {
    /// `PATCH /drives/{id}` after boot: a new backing file (the guest is told its capacity may
    /// have changed) and/or new rate limits (buckets left out keep their settings).
    fn patch_drive(&mut self, patch: &PartialDrive, vm: &RunningVm<'_>) -> Result<(), String> {
        let attached = vm
            .devices()
            .drives
            .iter()
            .find(|d| d.id == patch.drive_id)
            .ok_or_else(|| format!("no drive with id {}", patch.drive_id))?;
        let stored = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == patch.drive_id)
            .ok_or_else(|| format!("no drive with id {}", patch.drive_id))?;
        if let Some(path) = &patch.path_on_host {
            locked(&attached.device)
                .update_disk(path)
                .map_err(|e| e.to_string())?;
            locked(&attached.transport).config_changed();
            stored.path_on_host = Some(path.clone());
        }
        if let Some(limits) = &patch.rate_limiter {
            let merged = merge_limits(stored.rate_limiter.unwrap_or_default(), limits);
            locked(&attached.device)
                .update_rate_limiter(&merged)
                .map_err(|e| e.to_string())?;
            stored.rate_limiter = Some(merged);
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` after boot: new rx and/or tx rate limits.
    fn patch_net(
        &mut self,
        patch: &PartialNetworkInterface,
        vm: &RunningVm<'_>,
    ) -> Result<(), String> {
        let attached = vm
            .devices()
            .nets
            .iter()
            .find(|n| n.id == patch.iface_id)
            .ok_or_else(|| format!("no network interface with id {}", patch.iface_id))?;
        let stored = self
            .resources
            .nets
            .iter_mut()
            .find(|n| n.iface_id == patch.iface_id)
            .ok_or_else(|| format!("no network interface with id {}", patch.iface_id))?;
        let rx = patch
            .rx_rate_limiter
            .as_ref()
            .map(|p| merge_limits(stored.rx_rate_limiter.unwrap_or_default(), p));
        let tx = patch
            .tx_rate_limiter
            .as_ref()
            .map(|p| merge_limits(stored.tx_rate_limiter.unwrap_or_default(), p));
        locked(&attached.device)
            .update_rate_limiters(rx.as_ref(), tx.as_ref())
            .map_err(|e| e.to_string())?;
        if rx.is_some() {
            stored.rx_rate_limiter = rx;
        }
        if tx.is_some() {
            stored.tx_rate_limiter = tx;
        }
        Ok(())
    }
}

/// Firecracker's PATCH semantics for rate limiters: a bucket left out keeps its settings.
fn merge_limits(old: RateLimiterConfig, patch: &RateLimiterConfig) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: patch.bandwidth.or(old.bandwidth),
        ops: patch.ops.or(old.ops),
    }
}

/// Locks a device, going on if a thread panicked while holding it: the device's own state checks
/// still hold, and refusing every later call would only wedge the API.
fn locked<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Microseconds since `started`, for the latency metrics.
fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `common` answered these already.
fn unreachable_common() -> HttpResponse {
    HttpResponse::fault(500, "internal error: request routed to the wrong phase")
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::routes::parse_request;

    fn pre(c: &mut ApiController, method: &str, path: &str, body: &str) -> HttpResponse {
        match c.pre_boot(parse_request(method, path, body.as_bytes()).unwrap()) {
            PreBoot::Reply(r) => r,
            PreBoot::Start => HttpResponse::no_content(),
        }
    }

    fn body(r: &HttpResponse) -> serde_json::Value {
        serde_json::from_slice(r.body().unwrap()).unwrap()
    }

    #[test]
    fn pre_boot_builds_resources_and_answers_gets() {
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let info = pre(&mut c, "GET", "/", "");
        assert_eq!(info.status(), 200);
        assert_eq!(body(&info)["state"], "Not started");
        assert_eq!(body(&info)["id"], "vm1");
        let r = pre(
            &mut c,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#,
        );
        assert_eq!(r.status(), 204);
        let r = pre(
            &mut c,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":256}"#,
        );
        assert_eq!(r.status(), 204);
        let r = pre(
            &mut c,
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#,
        );
        assert_eq!(r.status(), 204);
        let r = pre(
            &mut c,
            "PUT",
            "/drives/other",
            r#"{"drive_id":"other","path_on_host":"/o","is_root_device":true}"#,
        );
        assert_eq!(r.status(), 400);
        assert_eq!(
            body(&r)["fault_message"],
            "A root block device already exists!"
        );
        let config = body(&pre(&mut c, "GET", "/vm/config", ""));
        assert_eq!(config["machine-config"]["vcpu_count"], 2);
        assert_eq!(config["drives"][0]["drive_id"], "rootfs");
        assert_eq!(config["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(
            body(&pre(&mut c, "GET", "/version", ""))["firecracker_version"],
            API_VERSION
        );
    }

    #[test]
    fn patched_rate_limits_keep_buckets_left_out() {
        let bucket = |size| api::models::TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 100,
        };
        let old = RateLimiterConfig {
            bandwidth: Some(bucket(1000)),
            ops: Some(bucket(10)),
        };
        let patch = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(20)),
        };
        let merged = merge_limits(old, &patch);
        assert_eq!(merged.bandwidth, Some(bucket(1000)));
        assert_eq!(merged.ops, Some(bucket(20)));
    }

    #[test]
    fn runtime_only_requests_are_refused_before_start() {
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        for (method, path, payload) in [
            ("PATCH", "/vm", r#"{"state":"Paused"}"#),
            ("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#),
            (
                "PATCH",
                "/drives/d",
                r#"{"drive_id":"d","path_on_host":"/x"}"#,
            ),
        ] {
            let r = pre(&mut c, method, path, payload);
            assert_eq!(r.status(), 400);
            assert_eq!(body(&r)["fault_message"], NOT_BEFORE_START);
        }
        let start = c.pre_boot(
            parse_request("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#).unwrap(),
        );
        assert!(matches!(start, PreBoot::Start));
    }

    /// The failures only: a success would configure the process's logger or metrics, which the
    /// integration tests do in their own process.
    #[test]
    fn refused_logger_and_metrics_bodies_change_nothing() {
        let dir = std::env::temp_dir().join(format!("kiln-api-obs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let r = pre(
            &mut c,
            "PUT",
            "/logger",
            &format!(r#"{{"log_path":"{}","level":"Off"}}"#, link.display()),
        );
        assert_eq!(r.status(), 400);
        let message = body(&r)["fault_message"].as_str().unwrap().to_string();
        assert!(message.starts_with("Logger error: log_path "), "{message}");
        assert!(message.contains("symbolic link"), "{message}");
        assert_eq!(log::max_level(), log::LevelFilter::Off, "level unchanged");
        let r = pre(
            &mut c,
            "PUT",
            "/metrics",
            &format!(r#"{{"metrics_path":"{}"}}"#, dir.join("no/dir").display()),
        );
        assert_eq!(r.status(), 400);
        assert!(!METRICS.is_configured());
        let r = pre(
            &mut c,
            "PUT",
            "/actions",
            r#"{"action_type":"FlushMetrics"}"#,
        );
        assert_eq!(body(&r)["fault_message"], NOT_BEFORE_START);
        assert!(!dir.join("target").exists());
    }
}
