//! `kiln`: boot a Linux guest in a KVM microVM.
//!
//! Exit status: 0 when the guest reboots or powers off (a microVM's way to end), 2 for bad input
//! (flags, images, sizes), 1 when the VM or host fails, 128+N when stopped by signal N.

use std::process::ExitCode;

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use api::http::{
    bind_api_socket, ApiServer, HttpRequest, HttpResponse, RequestHandler, ServerConfig,
    SocketGuard, ThreadSpawner,
};
use api::models::SnapshotLoadParams;
use api::outcome::{to_response, VmmActionError};
use api::routes::parse_request;
use clap::Parser;
use devices::mmds::{MmdsStore, SharedMmds};
use vmm::api_controller::{run_pre_boot, ApiController, PreBootEnd, StartRequest};
use vmm::arch::HostQuirks;
use vmm::cli::{Cli, Command, JailerCli, ObservabilityArgs, ProcessArgs, RunArgs, SnapshotCommand};
use vmm::config::{ConsoleConfig, SerialConfig};
use vmm::guest_images::default_guest;
use vmm::machine::{spawn_signal_watcher, ApiCall, ExitReason, VmmEvent};
use vmm::metrics::METRICS;
use vmm::personality::Personality;
use vmm::resources::VmResources;
use vmm::seccomp::{spawn_filtered, SeccompFilters, ThreadKind};
use vmm::startup_clock::StartupClock;
use vmm::vstate::vm;

const EXIT_FAILURE: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    log::error!("{message}");
    ExitCode::from(code)
}

/// `kiln run`: the flags become resources, and the controller starts them as it would the
/// API's.
fn run(mut args: RunArgs, filters: &Arc<SeccompFilters>) -> ExitCode {
    let kvm = match vm::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    if let Some(params) = args.restore.take() {
        return restore(args, &params, &kvm, filters);
    }
    let images = match args.kernel {
        Some(_) => None,
        None => match default_guest() {
            Ok(images) => Some(images),
            Err(e) => return fail(EXIT_FAILURE, e),
        },
    };
    let forward_stdin = matches!(args.console, None | Some(ConsoleConfig::Stdout));
    let resources = match args.into_resources(images.as_ref()) {
        Ok(resources) => resources,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let controller = ApiController::new(String::new(), resources);
    let quirks = HostQuirks::detect();
    let microvm = match controller.start(&kvm, &quirks) {
        Ok(microvm) => microvm,
        Err(e) if e.is_bad_input() => return fail(EXIT_BAD_INPUT, e),
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    if let Some(line) = quirks.describe() {
        log::info!("{line}");
    }
    exit_status(microvm.run(forward_stdin, filters))
}

/// `kiln run --restore`: the snapshot's VM, with the run's console, restored and run.
fn restore(
    args: RunArgs,
    params: &SnapshotLoadParams,
    kvm: &kvm_ioctls::Kvm,
    filters: &Arc<SeccompFilters>,
) -> ExitCode {
    let console = args.console.unwrap_or(ConsoleConfig::Stdout);
    let forward_stdin = console == ConsoleConfig::Stdout;
    let loader = VmResources {
        serial: SerialConfig {
            console,
            rate_limit: None,
        },
        ..VmResources::default()
    };
    let controller = ApiController::new(String::new(), loader);
    let microvm = match controller.load_snapshot(kvm, params) {
        Ok(microvm) => microvm,
        Err(e) if e.is_bad_input() => return fail(EXIT_BAD_INPUT, format!("--restore: {e}")),
        Err(e) => return fail(EXIT_FAILURE, format!("--restore: {e}")),
    };
    exit_status(microvm.run(forward_stdin, filters))
}

/// `kiln snapshot ...`.
fn snapshot_command(command: SnapshotCommand) -> ExitCode {
    match command {
        SnapshotCommand::Merge { base, diff } => match vmm::persist::memory::merge(&base, &diff) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_BAD_INPUT, format!("merging {}: {e}", diff.display())),
        },
        SnapshotCommand::Describe { state } => describe_snapshot(&state),
    }
}

/// Prints a state file's format version (`vMAJOR.MINOR.0`, Firecracker's form).
fn describe_snapshot(path: &std::path::Path) -> ExitCode {
    let version = devices::host_file::open(path, false, devices::host_file::Accept::RegularFile)
        .map_err(|e| e.to_string())
        .and_then(|mut file| {
            vmm::persist::format::read_version(&mut file).map_err(|e| e.to_string())
        });
    match version {
        Ok((major, minor)) => {
            println!("v{major}.{minor}.0");
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_BAD_INPUT, format!("{}: {e}", path.display())),
    }
}

/// The process's exit status for how the VM ended.
fn exit_status(result: std::io::Result<ExitReason>) -> ExitCode {
    match result {
        Ok(ExitReason::GuestReset) => {
            log::info!("the guest rebooted; exiting");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::GuestPowerOff) => {
            log::info!("the guest powered off; exiting");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::Fatal(e)) => fail(EXIT_FAILURE, format!("guest failed: {e}")),
        Ok(ExitReason::Signal(signal)) => {
            log::info!("stopped by signal {signal}");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Ok(ExitReason::EventLoopFailed(e)) => fail(EXIT_FAILURE, format!("device event loop: {e}")),
        Ok(ExitReason::EventSourcesGone) => fail(
            EXIT_FAILURE,
            "internal error: every thread reporting to the control loop ended",
        ),
        Err(e) => fail(EXIT_FAILURE, format!("starting the VM: {e}")),
    }
}

/// How long the API thread waits for the VMM to answer one request (a pause waits up to 5 s per
/// vCPU; a build opens images and loads the kernel).
const API_REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// The API thread's request handler: parse, hand to the VMM, wait for its answer; count it in
/// the metrics.
fn api_handler(tx: Sender<VmmEvent>) -> RequestHandler {
    Arc::new(move |request: HttpRequest| {
        let response = answer(&tx, &request);
        METRICS
            .api_requests
            .record(request.method.as_str(), &request.path, response.status());
        response
    })
}

fn answer(tx: &Sender<VmmEvent>, request: &HttpRequest) -> HttpResponse {
    let parsed = parse_request(request.method.as_str(), &request.path, &request.body);
    let request = match parsed {
        Ok(request) => request,
        Err(e) => return HttpResponse::fault(e.status(), &e.fault_message()),
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let call = VmmEvent::Api(ApiCall {
        request,
        reply: reply_tx,
    });
    let outcome = if tx.send(call).is_err() {
        METRICS.api_server.sync_response_fails.inc();
        Err(VmmActionError::ShuttingDown)
    } else {
        match reply_rx.recv_timeout(API_REPLY_TIMEOUT) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => {
                METRICS.api_server.sync_vmm_send_timeout_count.inc();
                Err(VmmActionError::TimedOut)
            }
            // The VMM ended with the request still queued.
            Err(RecvTimeoutError::Disconnected) => Err(VmmActionError::ShuttingDown),
        }
    };
    to_response(&outcome)
}

/// Firecracker's process mode: serve the API and/or boot from a config file.
fn serve(
    args: ProcessArgs,
    personality: Personality,
    startup: StartupClock,
    filters: &Arc<SeccompFilters>,
) -> ExitCode {
    if args.enable_pci {
        log::warn!(
            "--enable-pci: Kiln has no virtio-pci transport; every device stays on virtio-mmio, \
             announced on the guest's command line"
        );
    }
    let startup = startup.with_launcher_times(
        args.start_time_us,
        args.start_time_cpu_us,
        args.parent_cpu_time_us,
    );
    let api_sock = args.api_sock(personality);
    let kvm = match vm::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    let resources = match &args.config_file {
        Some(path) => match read_config_file(path) {
            Ok(resources) => resources,
            Err(e) => return fail(EXIT_BAD_INPUT, e),
        },
        None => VmResources::default(),
    };
    // A config file's logger and metrics apply at once, after the flags (as in Firecracker).
    if let Some(logger) = &resources.logger {
        if let Err(e) = vmm::logger::configure(logger) {
            return fail(EXIT_BAD_INPUT, format!("config file: {e}"));
        }
    }
    if let Some(metrics) = &resources.metrics {
        if let Err(e) = METRICS.configure(metrics, &args.id) {
            return fail(EXIT_BAD_INPUT, format!("config file: {e}"));
        }
    }
    let (tx, rx) = mpsc::channel();
    // From here on a stop signal ends Kiln cleanly (the socket guard removes the socket).
    if let Err(e) = spawn_signal_watcher(tx.clone(), filters) {
        return fail(EXIT_FAILURE, format!("watching signals: {e}"));
    }
    // Kept to the end: dropping it stops the API thread and removes the socket.
    let server = if args.no_api {
        None
    } else {
        let listener = match bind_api_socket(&api_sock) {
            Ok(listener) => listener,
            Err(e) => return fail(EXIT_BAD_INPUT, format!("API socket: {e}")),
        };
        let guard = SocketGuard::new(&api_sock);
        let config = ServerConfig {
            max_payload: args.max_payload,
            ..ServerConfig::default()
        };
        match ApiServer::start_with(
            listener,
            config,
            api_handler(tx.clone()),
            api_thread(filters),
        ) {
            Ok(server) => Some((server, guard)),
            Err(e) => return fail(EXIT_FAILURE, format!("starting the API server: {e}")),
        }
    };
    if server.is_some() {
        let (wall, cpu) = startup.elapsed();
        METRICS.api_started(wall.unwrap_or_default(), cpu);
    }
    let resources = VmResources {
        boot_timer: args.observability.boot_timer,
        ..resources
    };
    let mmds = match mmds_store(&args) {
        Ok(mmds) => mmds,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let mut controller = ApiController::new(args.id, resources).with_mmds(mmds);
    let quirks = HostQuirks::detect();
    let start = |controller: &ApiController, request: &StartRequest| match request {
        StartRequest::Boot => {
            let microvm = controller.start(&kvm, &quirks).map_err(|e| e.to_string())?;
            // Said of a boot only: a restored guest is not booted, and its command line was
            // the snapshotted guest's.
            if let Some(line) = quirks.describe() {
                log::info!("{line}");
            }
            Ok(microvm)
        }
        StartRequest::Load(params) => {
            let started = std::time::Instant::now();
            let microvm = controller
                .load_snapshot(&kvm, params)
                .map_err(|e| format!("Load snapshot error: {e}"))?;
            METRICS
                .latencies_us
                .load_snapshot
                .store(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            Ok(microvm)
        }
    };
    let microvm = if args.config_file.is_some() {
        match start(&controller, &StartRequest::Boot) {
            Ok(microvm) => microvm,
            Err(e) => return fail(EXIT_BAD_INPUT, e),
        }
    } else {
        match run_pre_boot(&rx, &mut controller, start) {
            PreBootEnd::Started(microvm) => microvm,
            PreBootEnd::Signal(signal) => {
                log::info!("stopped by signal {signal} before the microVM started");
                return ExitCode::from(128u8.saturating_add(signal as u8));
            }
            PreBootEnd::ChannelClosed => {
                return fail(EXIT_FAILURE, "internal error: the API thread ended")
            }
        }
    };
    let result = microvm.run_with(false, filters, tx, rx, &mut |request, vm| {
        controller.runtime(request, vm)
    });
    exit_status(result)
}

/// Starts the API thread confined by the `api` filter, before it accepts a connection.
fn api_thread(filters: &Arc<SeccompFilters>) -> ThreadSpawner {
    let filters = filters.clone();
    Box::new(move |name, body| Ok(spawn_filtered(name, &filters, ThreadKind::Api, body)?))
}

/// The MMDS document: `--mmds-size-limit` (else the API's body limit, as Firecracker), filled
/// from `--metadata`.
fn mmds_store(args: &ProcessArgs) -> Result<SharedMmds, String> {
    let store = MmdsStore::shared(args.mmds_size_limit.unwrap_or(args.max_payload));
    if let Some(path) = &args.metadata {
        let limit = u64::try_from(args.mmds_size_limit.unwrap_or(args.max_payload))
            .unwrap_or(u64::MAX)
            .saturating_mul(4)
            .max(4096);
        let text = vmm::config::read_small_file(path, limit)
            .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
        let data: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
        if let Ok(mut store) = store.lock() {
            store
                .put(data)
                .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
        }
    }
    Ok(store)
}

/// Reads a `--config-file` (the shape of GET /vm/config) into resources.
fn read_config_file(path: &std::path::Path) -> Result<VmResources, String> {
    let text = vmm::config::read_small_file(path, vmm::config::MAX_CONFIG_FILE_BYTES)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    VmResources::from_config_json(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// Applies the logging and metrics flags.
fn configure_observability(args: &ObservabilityArgs) -> Result<(), String> {
    if let Some(logger) = args.logger_config() {
        vmm::logger::configure(&logger).map_err(|e| e.to_string())?;
    }
    if let Some(metrics) = args.metrics_config() {
        // `--metrics-path` has no instance id to emit.
        METRICS.configure(&metrics, "").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The two ways Kiln runs a VM (`kiln jail` only wraps one of them).
enum Mode {
    /// `kiln run`: boot from flags until the guest reboots.
    Run(RunArgs),
    /// Firecracker's process mode: serve the API.
    Process(ProcessArgs),
}

fn main() -> ExitCode {
    vmm::seccomp::keep_allocator_within_filters();
    let startup = StartupClock::now();
    let program = std::env::args_os().next().unwrap_or_default();
    let personality = Personality::from_program_name(&program);
    personality.install();
    // Under Firecracker's names `--version` is Firecracker's (Kata parses its first line).
    if let Some(text) = personality.version_text() {
        if std::env::args()
            .skip(1)
            .any(|a| a == "--version" || a == "-V")
        {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
    }
    if personality == Personality::Jailer {
        return vmm::jail::main(JailerCli::parse().jail);
    }
    let cli = Cli::parse();
    let mode = match cli.command {
        // Before the logger, metrics and seccomp: the jailer must start single-threaded.
        Some(Command::Jail(args)) => return vmm::jail::main(args),
        Some(Command::Snapshot(command)) => {
            let _ = vmm::logger::install();
            return snapshot_command(command);
        }
        Some(Command::Run(args)) => Mode::Run(*args),
        None => Mode::Process(cli.process),
    };
    if let Mode::Process(args) = &mode {
        if args.snapshot_version {
            let (major, minor) = vmm::persist::format::VERSION;
            println!("v{major}.{minor}.0");
            return ExitCode::SUCCESS;
        }
        if let Some(path) = &args.describe_snapshot {
            let _ = vmm::logger::install();
            return describe_snapshot(path);
        }
    }
    // The only possible failure is another logger installed first, and nothing else installs one.
    let _ = vmm::logger::install();
    // `kiln run -- CMD` supervises a VM process of its own: no filters, metrics or VM here.
    let mode = match mode {
        // Its own errors go to stderr; the logging and metrics flags are the VM process's.
        Mode::Run(args) if !args.command.is_empty() => {
            return ExitCode::from(vmm::runner::main(args));
        }
        mode => mode,
    };
    // Both modes take the logging, metrics and seccomp flags.
    let (observability, seccomp) = match &mode {
        Mode::Run(args) => (&args.observability, &args.seccomp),
        Mode::Process(args) => (&args.observability, &args.seccomp),
    };
    if let Err(e) = configure_observability(observability) {
        return fail(EXIT_BAD_INPUT, e);
    }
    let filters = match seccomp.filters() {
        Ok(filters) => Arc::new(filters),
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let status = match mode {
        Mode::Run(args) => run(args, &filters),
        Mode::Process(args) => serve(args, personality, startup, &filters),
    };
    // Firecracker writes the metrics one last time on its way out (a VM's run wrote it with
    // its devices already).
    METRICS.flush_at_exit();
    status
}
