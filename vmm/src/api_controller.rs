//! Answers Firecracker API requests, in two phases that are two methods: [`ApiController::pre_boot`]
//! accumulates [`VmResources`] until `InstanceStart`; [`ApiController::runtime`] acts on the running
//! VM. A request that belongs to the other phase is refused with Firecracker's fault message.
//!
//! Nothing here speaks HTTP: a request goes in as an [`ApiRequest`] and comes out as a
//! [`VmmOutcome`], which the api crate alone turns into a status code and body.

use std::sync::mpsc::Receiver;
use std::time::Instant;

use api::models::{
    ActionType, FirecrackerVersion, InstanceInfo, InstanceState, MemoryBackendType,
    SnapshotLoadParams, SnapshotType, VmState,
};
use api::outcome::{VmmActionError, VmmData, VmmOutcome};
use api::routes::ApiRequest;

use kvm_ioctls::Kvm;

use crate::arch::HostQuirks;
use crate::builder::{build_microvm, restore_microvm, BuildError};
use crate::machine::{MicroVm, VmmEvent};
use crate::metrics::METRICS;
use crate::persist::{self, SnapshotError};
use crate::resources::{balloon_model, ResourceError, VmResources};
use crate::vmm_actions::{RunningVm, VmmError};
use devices::mmds::{MmdsStore, SharedMmds, StoreError};

/// Firecracker's MMDS size limit without `--mmds-size-limit`: the API's default body limit.
pub const DEFAULT_MMDS_SIZE_LIMIT: usize = 51200;

/// The Firecracker API version Kiln serves (its OpenAPI document's version).
pub const API_VERSION: &str = crate::personality::FIRECRACKER_VERSION;

const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

/// What a pre-boot request leads to.
#[derive(Debug)]
pub enum PreBoot {
    /// Answer it.
    Reply(VmmOutcome),
    /// Build and start the VM, then answer (success, or the build error as a refusal).
    Start(StartRequest),
}

/// How a VM comes to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRequest {
    /// `InstanceStart`: boot the kernel the resources name.
    Boot,
    /// `PUT /snapshot/load`: restore a snapshot.
    Load(Box<SnapshotLoadParams>),
}

/// Firecracker's refusal of a load into a process that was configured for a boot.
const LOAD_AFTER_CONFIG: &str =
    "Loading a microVM snapshot not allowed after configuring boot-specific resources.";

/// The API's view of one microVM.
pub struct ApiController {
    id: String,
    resources: VmResources,
    /// The MMDS document, which the API changes in either phase and the guest reads.
    mmds: SharedMmds,
}

fn refused(message: impl std::fmt::Display) -> VmmOutcome {
    Err(VmmActionError::refused(message))
}

fn done(result: Result<(), ResourceError>) -> VmmOutcome {
    result
        .map(|()| VmmData::Empty)
        .map_err(VmmActionError::refused)
}

impl ApiController {
    /// A controller for instance `id` starting from `resources` (empty, or a config file's),
    /// with an empty MMDS document of Firecracker's default size limit.
    pub fn new(id: String, resources: VmResources) -> Self {
        Self {
            id,
            resources,
            mmds: MmdsStore::shared(DEFAULT_MMDS_SIZE_LIMIT),
        }
        .with_mmds_version()
    }

    /// The controller with `mmds` as its MMDS document (`--mmds-size-limit`, `--metadata`).
    pub fn with_mmds(self, mmds: SharedMmds) -> Self {
        Self { mmds, ..self }.with_mmds_version()
    }

    /// Serves MMDS in the version (and IMDS mode) the resources' `mmds-config` names, as a
    /// config file's does: `PUT /mmds/config` sets it the same way.
    fn with_mmds_version(self) -> Self {
        if let Some(config) = &self.resources.mmds_config {
            let (version, imds_compat) = (config.version, config.imds_compat);
            let _ = self.with_store(|s| s.configure(version, imds_compat));
        }
        self
    }

    /// Runs `f` on the MMDS document.
    fn with_store<T>(&self, f: impl FnOnce(&mut MmdsStore) -> T) -> Result<T, VmmActionError> {
        let mut store = self
            .mmds
            .lock()
            .map_err(|_| VmmActionError::Internal("the MMDS store's lock is poisoned".into()))?;
        Ok(f(&mut store))
    }

    /// `GET|PUT|PATCH /mmds`, served the same in both phases.
    fn mmds_request(&self, request: &ApiRequest) -> Option<VmmOutcome> {
        let result = match request {
            ApiRequest::GetMmds => {
                return Some(self.with_store(|s| VmmData::MmdsValue(s.data())));
            }
            ApiRequest::PutMmds(data) => self.with_store(|s| s.put(data.clone())),
            ApiRequest::PatchMmds(patch) => self.with_store(|s| s.patch(patch)),
            _ => return None,
        };
        Some(match result {
            Ok(Ok(())) => Ok(VmmData::Empty),
            Ok(Err(e @ StoreError::LimitExceeded)) => {
                Err(VmmActionError::PayloadTooLarge(e.to_string()))
            }
            Ok(Err(e)) => Err(VmmActionError::refused(e)),
            Err(e) => Err(e),
        })
    }

    /// The resources as they stand.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// Builds the microVM the resources describe: what `InstanceStart`, a `--config-file` and
    /// `kiln run` all do. A failure leaves the resources as they were, to be fixed and tried
    /// again.
    pub fn start(&self, kvm: &Kvm, quirks: &HostQuirks) -> Result<MicroVm, BuildError> {
        build_microvm(kvm, &self.resources, &self.mmds, quirks)
    }

    /// Restores the snapshot `params` names: its state file read and checked, its memory
    /// mapped, its devices rebuilt with the load's overrides, its vCPUs paused unless
    /// `resume_vm`. A failure leaves this process as it was, able to try again.
    pub fn load_snapshot(
        &self,
        kvm: &Kvm,
        params: &SnapshotLoadParams,
    ) -> Result<MicroVm, BuildError> {
        let state = persist::read_state(&params.snapshot_path)?;
        let resources = persist::restored_resources(&state.vm_config, params, &self.resources)?;
        let source = params
            .memory_source()
            .ok_or_else(|| SnapshotError::Inconsistent("no memory source".into()))?;
        let (mem, handler) = match source.backend_type {
            MemoryBackendType::File => (
                persist::memory::restore_from_file(&source.path, &state.memory)
                    .map_err(SnapshotError::from)?,
                None,
            ),
            MemoryBackendType::Uffd => {
                let (mem, uffd) = persist::uffd::restore_with_handler(&source.path, &state.memory)
                    .map_err(SnapshotError::from)?;
                (mem, Some(uffd))
            }
        };
        let restore = persist::Restore {
            state: &state,
            clock_realtime: params.clock_realtime,
        };
        let mut microvm = restore_microvm(kvm, &resources, &self.mmds, &restore, mem)?;
        if let Some(uffd) = handler {
            microvm = microvm.with_memory_handler(uffd);
        }
        Ok(if params.resume_vm {
            microvm
        } else {
            microvm.paused()
        })
    }

    fn instance_info(&self, state: InstanceState) -> VmmData {
        VmmData::InstanceInfo(InstanceInfo {
            app_name: "Kiln".to_string(),
            id: self.id.clone(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Requests either phase answers the same way, from `resources` (the pre-boot ones, or the
    /// running VM's description); `None` for the others.
    fn common(
        &self,
        request: &ApiRequest,
        state: InstanceState,
        resources: &VmResources,
    ) -> Option<VmmOutcome> {
        if let Some(outcome) = self.mmds_request(request) {
            return Some(outcome);
        }
        Some(Ok(match request {
            ApiRequest::GetInstanceInfo => self.instance_info(state),
            ApiRequest::GetVersion => VmmData::Version(FirecrackerVersion {
                firecracker_version: API_VERSION.to_string(),
            }),
            ApiRequest::GetMachineConfig => {
                VmmData::MachineConfig(resources.machine_config.clone())
            }
            ApiRequest::GetVmConfig => VmmData::VmConfig(Box::new(resources.full_config())),
            _ => return None,
        }))
    }

    /// Handles a request before `InstanceStart`.
    pub fn pre_boot(&mut self, request: ApiRequest) -> PreBoot {
        if let Some(response) = self.common(&request, InstanceState::NotStarted, &self.resources) {
            return PreBoot::Reply(response);
        }
        let r = &mut self.resources;
        let response = match request {
            ApiRequest::Action(ActionType::InstanceStart) => {
                return PreBoot::Start(StartRequest::Boot)
            }
            ApiRequest::LoadSnapshot(params) => {
                if r.configured_for_boot() {
                    refused(LOAD_AFTER_CONFIG)
                } else {
                    return PreBoot::Start(StartRequest::Load(params));
                }
            }
            ApiRequest::PutBootSource(boot) => {
                r.boot_source = Some(boot);
                Ok(VmmData::Empty)
            }
            ApiRequest::PutMachineConfig(config) => {
                r.machine_config = config;
                Ok(VmmData::Empty)
            }
            ApiRequest::PatchMachineConfig(patch) => done(r.patch_machine_config(&patch)),
            ApiRequest::PutDrive(drive) => done(r.put_drive(drive)),
            ApiRequest::PutNetworkInterface(net) => done(r.put_net(net)),
            ApiRequest::PutEntropy(entropy) => {
                r.put_entropy(entropy);
                Ok(VmmData::Empty)
            }
            ApiRequest::PutSerial(serial) => done(r.put_serial(serial)),
            ApiRequest::PutBalloon(balloon) => done(r.put_balloon(&balloon)),
            ApiRequest::PatchBalloon(update) => done(r.patch_balloon(&update)),
            ApiRequest::PatchBalloonStats(update) => done(r.patch_balloon_stats(&update)),
            ApiRequest::GetBalloon => r
                .balloon()
                .map(VmmData::BalloonConfig)
                .map_err(VmmActionError::refused),
            ApiRequest::PutVsock(vsock) => {
                r.put_vsock(vsock);
                Ok(VmmData::Empty)
            }
            ApiRequest::PutMmdsConfig(config) => {
                let (version, imds_compat) = (config.version, config.imds_compat);
                match r.put_mmds_config(config) {
                    Ok(()) => self
                        .with_store(|s| s.configure(version, imds_compat))
                        .map(|()| VmmData::Empty),
                    Err(e) => refused(e),
                }
            }
            ApiRequest::PutLogger(logger) => match crate::logger::configure(&logger) {
                Ok(()) => Ok(VmmData::Empty),
                Err(e) => refused(format!("Logger error: {e}")),
            },
            ApiRequest::PutMetrics(metrics) => match METRICS.configure(&metrics, &self.id) {
                Ok(()) => Ok(VmmData::Empty),
                Err(e) => refused(format!("Metrics error: {e}")),
            },
            ApiRequest::PatchDrive(_)
            | ApiRequest::CreateSnapshot(_)
            | ApiRequest::PatchNetworkInterface(_)
            | ApiRequest::PatchVm(_)
            | ApiRequest::GetBalloonStats
            | ApiRequest::StartBalloonHinting(_)
            | ApiRequest::GetBalloonHintingStatus
            | ApiRequest::StopBalloonHinting
            | ApiRequest::Action(ActionType::SendCtrlAltDel | ActionType::FlushMetrics) => {
                refused(NOT_BEFORE_START)
            }
            ApiRequest::GetInstanceInfo
            | ApiRequest::GetVersion
            | ApiRequest::GetMachineConfig
            | ApiRequest::GetVmConfig
            | ApiRequest::GetMmds
            | ApiRequest::PutMmds(_)
            | ApiRequest::PatchMmds(_) => unreachable_common(),
        };
        PreBoot::Reply(response)
    }

    /// Handles a request while the VM runs.
    pub fn runtime(&mut self, request: ApiRequest, vm: &mut impl RunningVm) -> VmmOutcome {
        let state = if vm.is_paused() {
            InstanceState::Paused
        } else {
            InstanceState::Running
        };
        if let Some(response) = self.common(&request, state, vm.resources()) {
            return response;
        }
        match request {
            ApiRequest::PatchVm(VmState::Paused) => {
                let started = Instant::now();
                match vm.pause() {
                    Ok(()) => {
                        METRICS.latencies_us.vmm_pause_vm.store(micros(started));
                        Ok(VmmData::Empty)
                    }
                    Err(e) => refused(format!("Failed to pause the microVM: {e}")),
                }
            }
            ApiRequest::PatchVm(VmState::Resumed) => {
                let started = Instant::now();
                vm.resume();
                METRICS.latencies_us.vmm_resume_vm.store(micros(started));
                Ok(VmmData::Empty)
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                refused("The microVM is already running.")
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => done_vmm(vm.send_ctrl_alt_del()),
            ApiRequest::Action(ActionType::FlushMetrics) => done_vmm(vm.flush_metrics()),
            ApiRequest::PatchDrive(patch) => match vm.update_drive(
                &patch.drive_id,
                patch.path_on_host.as_deref(),
                patch.rate_limiter.as_ref(),
            ) {
                Ok(()) => Ok(VmmData::Empty),
                Err(e) => refused(format!("Unable to patch the block device: {e}")),
            },
            ApiRequest::PatchNetworkInterface(patch) => match vm.update_net_rate_limits(
                &patch.iface_id,
                patch.rx_rate_limiter.as_ref(),
                patch.tx_rate_limiter.as_ref(),
            ) {
                Ok(()) => Ok(VmmData::Empty),
                Err(e) => refused(format!("Unable to patch the network interface: {e}")),
            },
            ApiRequest::GetBalloon => vm
                .balloon_config()
                .map(|config| VmmData::BalloonConfig(balloon_model(&config)))
                .map_err(vmm_error),
            ApiRequest::PatchBalloon(update) => done_vmm(vm.update_balloon(update.amount_mib)),
            ApiRequest::GetBalloonStats => vm
                .balloon_stats()
                .map(|stats| VmmData::BalloonStats(Box::new(stats)))
                .map_err(vmm_error),
            ApiRequest::PatchBalloonStats(update) => {
                done_vmm(vm.update_balloon_stats_interval(update.stats_polling_interval_s))
            }
            ApiRequest::StartBalloonHinting(cmd) => {
                done_vmm(vm.start_balloon_hinting(cmd.acknowledge_on_stop))
            }
            ApiRequest::GetBalloonHintingStatus => vm
                .balloon_hinting_status()
                .map(VmmData::BalloonHintingStatus)
                .map_err(vmm_error),
            ApiRequest::StopBalloonHinting => done_vmm(vm.stop_balloon_hinting()),
            ApiRequest::CreateSnapshot(params) => {
                let started = Instant::now();
                let diff = params.snapshot_type == SnapshotType::Diff;
                match vm.create_snapshot(&params.snapshot_path, &params.mem_file_path, diff) {
                    Ok(()) => {
                        let latency = if diff {
                            &METRICS.latencies_us.diff_create_snapshot
                        } else {
                            &METRICS.latencies_us.full_create_snapshot
                        };
                        latency.store(micros(started));
                        Ok(VmmData::Empty)
                    }
                    Err(e) => refused(format!("Create snapshot error: {e}")),
                }
            }
            _ => refused(NOT_AFTER_START),
        }
    }
}

/// How the pre-boot phase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum PreBootEnd<T> {
    /// `InstanceStart` built the VM (the caller runs it).
    Started(T),
    /// A stop signal (SIGINT, SIGTERM, SIGHUP) arrived first.
    Signal(i32),
    /// Every sender of the control channel is gone: nothing can ask for a start any more.
    ChannelClosed,
}

/// The pre-boot control loop: answers the API calls that arrive on `events` until an
/// `InstanceStart` builds a VM with `start`, or a stop signal arrives. A failed start is
/// answered with its error as a refusal and the loop goes on, so the client can fix what was
/// wrong and start again. SIGUSR1 (a report) has nothing to report before the start.
pub fn run_pre_boot<T>(
    events: &Receiver<VmmEvent>,
    controller: &mut ApiController,
    mut start: impl FnMut(&ApiController, &StartRequest) -> Result<T, String>,
) -> PreBootEnd<T> {
    loop {
        let Ok(event) = events.recv() else {
            return PreBootEnd::ChannelClosed;
        };
        let call = match event {
            VmmEvent::Api(call) => call,
            VmmEvent::Signal(signal) if signal != libc::SIGUSR1 => {
                return PreBootEnd::Signal(signal)
            }
            _ => continue,
        };
        match controller.pre_boot(call.request) {
            PreBoot::Reply(outcome) => {
                let _ = call.reply.send(outcome);
            }
            PreBoot::Start(request) => match start(controller, &request) {
                Ok(vm) => {
                    let _ = call.reply.send(Ok(VmmData::Empty));
                    return PreBootEnd::Started(vm);
                }
                Err(e) => {
                    let _ = call.reply.send(refused(e));
                }
            },
        }
    }
}

/// A runtime action's failure as the client's refusal (a Kiln bug as an internal error).
fn vmm_error(e: VmmError) -> VmmActionError {
    match e {
        VmmError::Internal(_) => VmmActionError::Internal(e.to_string()),
        other => VmmActionError::refused(other),
    }
}

fn done_vmm(result: Result<(), VmmError>) -> VmmOutcome {
    result.map(|()| VmmData::Empty).map_err(vmm_error)
}

/// Microseconds since `started`, for the latency metrics.
fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `common` answered these already.
fn unreachable_common() -> VmmOutcome {
    Err(VmmActionError::Internal(
        "request routed to the wrong phase".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::http::HttpResponse;
    use api::outcome::to_response;
    use api::routes::parse_request;
    use devices::mmds::MmdsVersion;

    /// The controller's answer as the API would send it.
    fn pre(c: &mut ApiController, method: &str, path: &str, body: &str) -> HttpResponse {
        match c.pre_boot(parse_request(method, path, body.as_bytes()).unwrap()) {
            PreBoot::Reply(r) => to_response(&r),
            PreBoot::Start(_) => HttpResponse::no_content(),
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

    /// Sends `request` as the API thread would; returns where its answer will arrive.
    fn call(
        events: &std::sync::mpsc::Sender<VmmEvent>,
        method: &str,
        path: &str,
        body: &str,
    ) -> std::sync::mpsc::Receiver<VmmOutcome> {
        let (reply, answer) = std::sync::mpsc::channel();
        let request = parse_request(method, path, body.as_bytes()).unwrap();
        events
            .send(VmmEvent::Api(crate::machine::ApiCall { request, reply }))
            .unwrap();
        answer
    }

    #[test]
    fn the_pre_boot_loop_answers_until_a_start_succeeds() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let info = call(&tx, "GET", "/", "");
        tx.send(VmmEvent::Signal(libc::SIGUSR1)).unwrap();
        let boot = call(&tx, "PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#);
        let first = call(&tx, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        let second = call(&tx, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        let mut attempts = 0;
        let end = run_pre_boot(&rx, &mut c, |c, request| {
            assert_eq!(request, &StartRequest::Boot);
            attempts += 1;
            assert!(c.resources().boot_source.is_some());
            if attempts == 1 {
                Err("opening the kernel: no such file".to_string())
            } else {
                Ok("the VM")
            }
        });
        assert_eq!(end, PreBootEnd::Started("the VM"));
        assert!(matches!(
            info.recv().unwrap(),
            Ok(VmmData::InstanceInfo(InstanceInfo {
                state: InstanceState::NotStarted,
                ..
            }))
        ));
        assert_eq!(boot.recv().unwrap(), Ok(VmmData::Empty));
        assert_eq!(
            first.recv().unwrap(),
            Err(VmmActionError::refused("opening the kernel: no such file"))
        );
        assert_eq!(second.recv().unwrap(), Ok(VmmData::Empty));
    }

    #[test]
    fn the_pre_boot_loop_ends_on_a_stop_signal_or_without_senders() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let version = call(&tx, "GET", "/version", "");
        tx.send(VmmEvent::Signal(libc::SIGTERM)).unwrap();
        let never = call(&tx, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        let end = run_pre_boot(&rx, &mut c, |_, _| -> Result<(), String> {
            panic!("no start after a stop signal")
        });
        assert_eq!(end, PreBootEnd::Signal(libc::SIGTERM));
        assert!(matches!(version.recv().unwrap(), Ok(VmmData::Version(_))));
        drop(tx);
        // The start still queued is dropped unanswered with the loop's receiver.
        drop(rx);
        assert!(never.recv().is_err());

        let (tx, rx) = std::sync::mpsc::channel::<VmmEvent>();
        drop(tx);
        let end = run_pre_boot(&rx, &mut c, |_, _| Ok(()));
        assert_eq!(end, PreBootEnd::ChannelClosed);
    }

    #[test]
    fn balloon_before_start() {
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let r = pre(&mut c, "GET", "/balloon", "");
        assert_eq!(
            (r.status(), body(&r)["fault_message"].clone()),
            (400, "No balloon device found.".into())
        );
        let r = pre(&mut c, "PATCH", "/balloon", r#"{"amount_mib":1}"#);
        assert_eq!(r.status(), 400);
        let r = pre(
            &mut c,
            "PUT",
            "/balloon",
            r#"{"amount_mib":4096,"deflate_on_oom":true}"#,
        );
        assert_eq!(r.status(), 400, "bigger than the default 128 MiB guest");
        assert!(body(&r)["fault_message"]
            .as_str()
            .unwrap()
            .starts_with("Amount of pages requested is too large"));
        let r = pre(
            &mut c,
            "PUT",
            "/balloon",
            r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":5}"#,
        );
        assert_eq!(r.status(), 204);
        let r = pre(&mut c, "PATCH", "/balloon", r#"{"amount_mib":32}"#);
        assert_eq!(r.status(), 204);
        let r = pre(
            &mut c,
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s":1}"#,
        );
        assert_eq!(r.status(), 204);
        let got = body(&pre(&mut c, "GET", "/balloon", ""));
        assert_eq!(
            got,
            serde_json::json!({"amount_mib":32,"deflate_on_oom":true,"stats_polling_interval_s":1,
                "free_page_hinting":false,"free_page_reporting":false})
        );
        assert_eq!(body(&pre(&mut c, "GET", "/vm/config", ""))["balloon"], got);
        for (method, path) in [
            ("GET", "/balloon/statistics"),
            ("GET", "/balloon/hinting/status"),
            ("PATCH", "/balloon/hinting/start"),
            ("PATCH", "/balloon/hinting/stop"),
        ] {
            let r = pre(&mut c, method, path, "");
            assert_eq!(r.status(), 400);
            assert_eq!(body(&r)["fault_message"], NOT_BEFORE_START);
        }
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
        assert!(matches!(start, PreBoot::Start(StartRequest::Boot)));
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

    /// A running VM without KVM: it records what it was asked and answers as told.
    #[derive(Default)]
    struct FakeVm {
        resources: VmResources,
        paused: bool,
        pause_fails: bool,
        balloon: Option<devices::virtio::balloon::BalloonConfig>,
        calls: Vec<String>,
    }

    impl RunningVm for FakeVm {
        fn resources(&self) -> &VmResources {
            &self.resources
        }
        fn is_paused(&self) -> bool {
            self.paused
        }
        fn pause(&mut self) -> Result<(), VmmError> {
            if self.pause_fails {
                return Err(VmmError::Device("vCPU 0 did not stop".into()));
            }
            self.paused = true;
            Ok(())
        }
        fn resume(&mut self) {
            self.paused = false;
        }
        fn send_ctrl_alt_del(&self) -> Result<(), VmmError> {
            Ok(())
        }
        fn flush_metrics(&self) -> Result<(), VmmError> {
            Err(VmmError::Internal("the registry is inconsistent".into()))
        }
        fn create_snapshot(
            &mut self,
            snapshot_path: &std::path::Path,
            mem_path: &std::path::Path,
            _diff: bool,
        ) -> Result<(), VmmError> {
            self.calls.push(format!(
                "snapshot {} {}",
                snapshot_path.display(),
                mem_path.display()
            ));
            if !self.paused {
                return Err(VmmError::Device(SnapshotError::NotPaused.to_string()));
            }
            Ok(())
        }
        fn update_drive(
            &mut self,
            id: &str,
            path: Option<&std::path::Path>,
            limits: Option<&api::models::RateLimiterConfig>,
        ) -> Result<(), VmmError> {
            self.calls
                .push(format!("drive {id} {path:?} {}", limits.is_some()));
            match id {
                "rootfs" => Ok(()),
                _ => Err(VmmError::NoDevice(format!("no drive with id {id}"))),
            }
        }
        fn update_net_rate_limits(
            &mut self,
            id: &str,
            rx: Option<&api::models::RateLimiterConfig>,
            tx: Option<&api::models::RateLimiterConfig>,
        ) -> Result<(), VmmError> {
            self.calls
                .push(format!("net {id} {} {}", rx.is_some(), tx.is_some()));
            Ok(())
        }
        fn balloon_config(&self) -> Result<devices::virtio::balloon::BalloonConfig, VmmError> {
            self.balloon
                .ok_or_else(|| VmmError::NoDevice("No balloon device found.".into()))
        }
        fn update_balloon(&mut self, amount_mib: u32) -> Result<(), VmmError> {
            let balloon = self
                .balloon
                .as_mut()
                .ok_or_else(|| VmmError::NoDevice("No balloon device found.".into()))?;
            balloon.amount_mib = amount_mib;
            Ok(())
        }
        fn balloon_stats(&self) -> Result<devices::virtio::balloon::BalloonStats, VmmError> {
            Err(VmmError::Device("Statistics are not enabled.".into()))
        }
        fn update_balloon_stats_interval(&mut self, _: u16) -> Result<(), VmmError> {
            Ok(())
        }
        fn start_balloon_hinting(&self, _: bool) -> Result<(), VmmError> {
            Ok(())
        }
        fn balloon_hinting_status(
            &self,
        ) -> Result<devices::virtio::balloon::HintingStatus, VmmError> {
            Err(VmmError::NoDevice("No balloon device found.".into()))
        }
        fn stop_balloon_hinting(&self) -> Result<(), VmmError> {
            Ok(())
        }
    }

    /// The runtime controller's answer as the API would send it.
    fn run(
        c: &mut ApiController,
        vm: &mut FakeVm,
        method: &str,
        path: &str,
        body: &str,
    ) -> HttpResponse {
        to_response(&c.runtime(parse_request(method, path, body.as_bytes()).unwrap(), vm))
    }

    #[test]
    fn runtime_answers_from_the_running_vm_and_refuses_pre_boot_requests() {
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let mut vm = FakeVm::default();
        vm.resources.machine_config.vcpu_count = 3;
        let info = run(&mut c, &mut vm, "GET", "/", "");
        assert_eq!(body(&info)["state"], "Running");
        // GET /vm/config describes the running VM, not the controller's pre-boot copy.
        let config = body(&run(&mut c, &mut vm, "GET", "/vm/config", ""));
        assert_eq!(config["machine-config"]["vcpu_count"], 3);
        let r = run(
            &mut c,
            &mut vm,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/k"}"#,
        );
        assert_eq!(r.status(), 400);
        assert_eq!(body(&r)["fault_message"], NOT_AFTER_START);
        let r = run(
            &mut c,
            &mut vm,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        assert_eq!(body(&r)["fault_message"], "The microVM is already running.");

        assert_eq!(
            run(&mut c, &mut vm, "PATCH", "/vm", r#"{"state":"Paused"}"#).status(),
            204
        );
        assert_eq!(
            body(&run(&mut c, &mut vm, "GET", "/", ""))["state"],
            "Paused"
        );
        assert_eq!(
            run(&mut c, &mut vm, "PATCH", "/vm", r#"{"state":"Resumed"}"#).status(),
            204
        );
        assert!(!vm.paused);
        vm.pause_fails = true;
        let r = run(&mut c, &mut vm, "PATCH", "/vm", r#"{"state":"Paused"}"#);
        assert_eq!(r.status(), 400);
        assert_eq!(
            body(&r)["fault_message"],
            "Failed to pause the microVM: vCPU 0 did not stop"
        );
        // A Kiln bug is an internal error, not the client's fault.
        let r = run(
            &mut c,
            &mut vm,
            "PUT",
            "/actions",
            r#"{"action_type":"FlushMetrics"}"#,
        );
        assert_eq!(r.status(), 500, "{:?}", r.body());
    }

    #[test]
    fn runtime_patches_reach_the_vm_as_given() {
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        let mut vm = FakeVm::default();
        let r = run(
            &mut c,
            &mut vm,
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/new.img"}"#,
        );
        assert_eq!(r.status(), 204);
        let r = run(
            &mut c,
            &mut vm,
            "PATCH",
            "/drives/other",
            r#"{"drive_id":"other","rate_limiter":{"ops":{"size":1,"refill_time":100}}}"#,
        );
        assert_eq!(
            body(&r)["fault_message"],
            "Unable to patch the block device: no drive with id other"
        );
        let r = run(
            &mut c,
            &mut vm,
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":1,"refill_time":100}}}"#,
        );
        assert_eq!(r.status(), 204);
        assert_eq!(
            vm.calls,
            [
                r#"drive rootfs Some("/new.img") false"#,
                "drive other None true",
                "net eth0 false true"
            ]
        );
        // The balloon: absent, then present.
        let r = run(&mut c, &mut vm, "GET", "/balloon", "");
        assert_eq!(body(&r)["fault_message"], "No balloon device found.");
        vm.balloon = Some(devices::virtio::balloon::BalloonConfig::default());
        assert_eq!(
            run(&mut c, &mut vm, "PATCH", "/balloon", r#"{"amount_mib":9}"#).status(),
            204
        );
        assert_eq!(
            body(&run(&mut c, &mut vm, "GET", "/balloon", ""))["amount_mib"],
            9
        );
        let r = run(&mut c, &mut vm, "GET", "/balloon/statistics", "");
        assert_eq!(body(&r)["fault_message"], "Statistics are not enabled.");
    }

    #[test]
    fn a_config_files_mmds_version_is_served() {
        let resources = VmResources::from_config_json(
            r#"{"network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}],
                "mmds-config":{"network_interfaces":["eth0"],"version":"V2","imds_compat":true}}"#,
        )
        .unwrap();
        let store = MmdsStore::shared(1024);
        let _c = ApiController::new("vm".into(), resources).with_mmds(store.clone());
        let store = store.lock().unwrap();
        assert_eq!(store.version(), MmdsVersion::V2);
        assert!(store.imds_compat());
    }

    #[test]
    fn mmds_in_both_phases() {
        let mut c = ApiController::new("vm1".into(), VmResources::default())
            .with_mmds(MmdsStore::shared(64));
        assert_eq!(
            body(&pre(&mut c, "GET", "/mmds", "")),
            serde_json::json!({})
        );
        let r = pre(&mut c, "PATCH", "/mmds", r#"{"a":1}"#);
        assert_eq!(
            (r.status(), body(&r)["fault_message"].clone()),
            (400, "The MMDS data store is not initialized.".into())
        );
        assert_eq!(
            pre(&mut c, "PUT", "/mmds", r#"{"a":{"b":"c"}}"#).status(),
            204
        );
        assert_eq!(pre(&mut c, "PATCH", "/mmds", r#"{"d":"e"}"#).status(), 204);
        assert_eq!(
            body(&pre(&mut c, "GET", "/mmds", "")),
            serde_json::json!({"a": {"b": "c"}, "d": "e"})
        );
        let big = format!(r#"{{"k":"{}"}}"#, "v".repeat(100));
        let r = pre(&mut c, "PUT", "/mmds", &big);
        assert_eq!(r.status(), 413);
        assert_eq!(
            body(&r)["fault_message"],
            "The MMDS patch request doesn't fit."
        );
        // The config names configured interfaces only.
        let config = r#"{"network_interfaces":["eth0"],"version":"V2"}"#;
        let r = pre(&mut c, "PUT", "/mmds/config", config);
        assert_eq!(r.status(), 400);
        assert!(
            body(&r)["fault_message"]
                .as_str()
                .unwrap()
                .contains("does not correspond to any existing network interface"),
            "{:?}",
            r.body()
        );
        let eth0 = r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#;
        assert_eq!(
            pre(&mut c, "PUT", "/network-interfaces/eth0", eth0).status(),
            204
        );
        assert_eq!(pre(&mut c, "PUT", "/mmds/config", config).status(), 204);
        assert_eq!(c.mmds.lock().unwrap().version(), MmdsVersion::V2);
        let vm_config = body(&pre(&mut c, "GET", "/vm/config", ""));
        assert_eq!(vm_config["mmds-config"]["version"], "V2");
        assert_eq!(vm_config["mmds-config"]["network_interfaces"][0], "eth0");
        // After the start the document still changes; the config does not.
        let mut vm = FakeVm::default();
        assert_eq!(
            run(&mut c, &mut vm, "PATCH", "/mmds", r#"{"d":null}"#).status(),
            204
        );
        assert_eq!(
            body(&run(&mut c, &mut vm, "GET", "/mmds", "")),
            serde_json::json!({"a": {"b": "c"}})
        );
        let r = run(&mut c, &mut vm, "PUT", "/mmds/config", config);
        assert_eq!(body(&r)["fault_message"], NOT_AFTER_START);
    }

    #[test]
    fn a_snapshot_loads_only_into_a_fresh_process_and_is_taken_only_of_a_paused_vm() {
        let load = r#"{"snapshot_path":"/s","mem_file_path":"/m","resume_vm":true}"#;
        // Logger, metrics and console may come first; a boot resource may not.
        let mut c = ApiController::new("vm1".into(), VmResources::default());
        assert_eq!(pre(&mut c, "PUT", "/serial", r#"{}"#).status(), 204);
        let start = c.pre_boot(parse_request("PUT", "/snapshot/load", load.as_bytes()).unwrap());
        let PreBoot::Start(StartRequest::Load(params)) = start else {
            panic!("{start:?}")
        };
        assert!(params.resume_vm);
        pre(
            &mut c,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":64}"#,
        );
        let refusal = pre(&mut c, "PUT", "/snapshot/load", load);
        assert_eq!(refusal.status(), 400);
        assert_eq!(body(&refusal)["fault_message"], LOAD_AFTER_CONFIG);
        let create = r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#;
        assert_eq!(pre(&mut c, "PUT", "/snapshot/create", create).status(), 400);

        let mut vm = FakeVm::default();
        let refusal = run(&mut c, &mut vm, "PUT", "/snapshot/create", create);
        assert_eq!(refusal.status(), 400);
        assert_eq!(
            body(&refusal)["fault_message"],
            "Create snapshot error: the microVM must be paused before a snapshot is taken"
        );
        vm.paused = true;
        assert_eq!(
            run(&mut c, &mut vm, "PUT", "/snapshot/create", create).status(),
            204
        );
        assert_eq!(vm.calls, ["snapshot /s /m", "snapshot /s /m"]);
        assert_eq!(
            run(&mut c, &mut vm, "PUT", "/snapshot/load", load).status(),
            400
        );
    }
}
