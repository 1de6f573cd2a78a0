//! Firecracker-style metrics: one JSON object per line, appended to the file or named pipe that
//! `--metrics-path` or `PUT /metrics` named, every 60 s (a timer on the `kiln_vmm` event loop),
//! on `PUT /actions {"action_type":"FlushMetrics"}`, and once when Kiln exits.
//!
//! # A line
//!
//! ```text
//! {"utc_timestamp_ms":1718000000000,            first, always
//!  "id":"vm1", "properties":{...},              with PUT /metrics' emit_id / properties
//!  "api_server":{...}, "get_api_requests":{...}, "put_api_requests":{...},
//!  "patch_api_requests":{...},                  while the API is served
//!  "block_<drive_id>":{...}, "block":{...},     one per drive, then all drives together
//!  "net_<iface_id>":{...}, "net":{...},         likewise per network interface
//!  "entropy":{...}, "vsock":{...},              the entropy and vsock devices
//!  "balloon":{...},                             the balloon
//!  "uart":{...},                                the serial console's output
//!  "i8042":{...}, "rtc":{...},                  the keyboard controller and the CMOS clock
//!  "latencies_us":{...},                       while the API is served (pause, resume,
//!                                               snapshot create and load)
//!  "logger":{...}, "signals":{...}, "vcpu":{...}, "vmm":{...}}
//! ```
//!
//! Group and field names are Firecracker's, and only what Kiln really counts is there (a device
//! group appears once such a device exists). Kiln's own fields: `guest_errors` (unusable buffers
//! or rings a guest submitted) in `net` and `entropy`, and `sigint`, `sigterm`, `sigusr1` next to
//! Firecracker's `sighup` in `signals`, and `cap_dropped_bytes` in `uart` (output past the
//! console file's cap). The `_fails` of the API groups count every answer that
//! was not 2xx, parse errors and refused requests alike; their field names come from the api
//! crate's route table, the one list of routes.
//!
//! # Counters and gauges
//!
//! A [`Counter`] is Firecracker's `SharedIncMetric`: a line carries what was added since the
//! previous line, as if each flush reset it. A [`Gauge`] (`process_startup_time_us`,
//! `latencies_us`) is a `SharedStoreMetric`: the last value stored, on every line. Device
//! counters are kept by the devices as running totals; a flush reports the difference from what
//! it reported last time, so the devices need nothing of this module.
//!
//! # Device groups
//!
//! This module knows no device. Each device keeps its own counters (`metrics.rs` in its folder)
//! and reports them through `VirtioDevice::metric_values`; the device registry
//! ([`crate::device_manager::DeviceRegistry::metric_groups`]) walks the VM's devices and names
//! the groups (`block_<id>` and `block`, `net_<id>` and `net`, `entropy`, `vsock`, `balloon`,
//! `uart`). Whoever flushes passes those groups in: the control loop, the event loop's timer
//! (which holds a handle on the registry, not on a global) and the VM's last flush. A new device
//! kind needs nothing here.
//!
//! Invariants: flushes are serialized (by the output's lock), so each counted event is reported in
//! exactly one line while writes succeed; a failed write is counted in `logger.missed_metrics_count`
//! and its deltas are lost, as in Firecracker. Nothing here blocks a vCPU: vCPUs and the API only
//! add to atomics.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use vmm_sys_util::timerfd::TimerFd;

use api::routes::ROUTES;

use crate::output_file::{open_output, OutputError};

/// How often the event loop writes a line (Firecracker's period).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(60);

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();

/// Errors in configuring or writing the metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A second configuration (Firecracker's text).
    #[error("Reinitialization of metrics not allowed.")]
    AlreadyConfigured,
    /// A flush before any configuration.
    #[error("the metrics system is not configured: PUT /metrics (or --metrics-path) first")]
    NotConfigured,
    /// The output could not be opened.
    #[error("metrics_path {0}")]
    Output(#[from] OutputError),
    /// A line could not be written.
    #[error("Failed to write metrics: {0}")]
    Write(#[source] std::io::Error),
}

/// Firecracker's `SharedIncMetric`: a count that each line reports as what was added since the
/// previous line.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    reported: AtomicU64,
}

impl Counter {
    /// Zero.
    pub const fn new() -> Self {
        Self {
            total: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        // Relaxed: a count needs no ordering with anything else, only atomicity.
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Everything added so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// What was added since the previous call. Only flushes call it, one at a time.
    fn take_delta(&self) -> u64 {
        let total = self.total();
        total.wrapping_sub(self.reported.swap(total, Ordering::Relaxed))
    }
}

/// Firecracker's `SharedStoreMetric`: a value every line reports as it stands.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Sets the value.
    pub fn store(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A group's fields as a JSON object.
fn group<'a>(fields: impl IntoIterator<Item = (&'a str, u64)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_string(), Value::from(value)))
            .collect(),
    )
}

/// `api_server`.
#[derive(Debug, Default)]
pub struct ApiServerMetrics {
    /// Microseconds from Kiln's start until its API socket was served.
    pub process_startup_time_us: Gauge,
    /// Process CPU microseconds spent until then.
    pub process_startup_time_cpu_us: Gauge,
    /// Requests the VMM could not take because it was shutting down (503).
    pub sync_response_fails: Counter,
    /// Requests the VMM did not answer in time (504).
    pub sync_vmm_send_timeout_count: Counter,
}

impl ApiServerMetrics {
    const fn new() -> Self {
        Self {
            process_startup_time_us: Gauge::new(),
            process_startup_time_cpu_us: Gauge::new(),
            sync_response_fails: Counter::new(),
            sync_vmm_send_timeout_count: Counter::new(),
        }
    }

    fn take(&self) -> Value {
        group([
            (
                "process_startup_time_us",
                self.process_startup_time_us.get(),
            ),
            (
                "process_startup_time_cpu_us",
                self.process_startup_time_cpu_us.get(),
            ),
            ("sync_response_fails", self.sync_response_fails.take_delta()),
            (
                "sync_vmm_send_timeout_count",
                self.sync_vmm_send_timeout_count.take_delta(),
            ),
        ])
    }
}

/// The three API request groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiGroup {
    Get,
    Put,
    Patch,
}

impl ApiGroup {
    fn name(self) -> &'static str {
        match self {
            Self::Get => "get_api_requests",
            Self::Put => "put_api_requests",
            Self::Patch => "patch_api_requests",
        }
    }
}

/// One route's counters: `<name>_count` and, for PUT and PATCH, `<name>_fails`.
#[derive(Debug)]
struct RouteCounters {
    count: Counter,
    fails: Counter,
}

/// `get_api_requests`, `put_api_requests`, `patch_api_requests`: Firecracker's per-route counts,
/// one pair per entry of the api crate's route table (the routes Firecracker does not count have
/// no metric name there and are never reported).
#[derive(Debug)]
pub struct ApiRequestMetrics {
    routes: [RouteCounters; ROUTES.len()],
}

/// The first segment of a path or route template (`""` for `/`).
fn first_segment(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

impl ApiRequestMetrics {
    const fn new() -> Self {
        Self {
            routes: [const {
                RouteCounters {
                    count: Counter::new(),
                    fails: Counter::new(),
                }
            }; ROUTES.len()],
        }
    }

    /// Counts one answered request, under the counted route with its method and first path
    /// segment (as Firecracker matches them). Uncounted routes and unknown paths count nothing.
    pub fn record(&self, method: &str, path: &str, status: u16) {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let segment = first_segment(path);
        let Some(index) = ROUTES.iter().position(|r| {
            r.metric.is_some() && r.method == method && first_segment(r.path) == segment
        }) else {
            return;
        };
        let counters = &self.routes[index];
        counters.count.inc();
        if !(200..300).contains(&status) {
            counters.fails.inc();
        }
    }

    fn take(&self, group: ApiGroup) -> Value {
        let method = match group {
            ApiGroup::Get => "GET",
            ApiGroup::Put => "PUT",
            ApiGroup::Patch => "PATCH",
        };
        let mut fields = Map::new();
        for (route, counters) in ROUTES.iter().zip(&self.routes) {
            let Some(name) = route.metric.filter(|_| route.method == method) else {
                continue;
            };
            let count = counters.count.take_delta();
            fields.insert(format!("{name}_count"), Value::from(count));
            // Firecracker's GET group has no failure counts.
            if group != ApiGroup::Get {
                let fails = counters.fails.take_delta();
                fields.insert(format!("{name}_fails"), Value::from(fails));
            }
        }
        Value::Object(fields)
    }
}

/// `latencies_us`.
#[derive(Debug, Default)]
pub struct LatencyMetrics {
    /// How long the last pause of the vCPUs took.
    pub vmm_pause_vm: Gauge,
    /// How long the last resume took.
    pub vmm_resume_vm: Gauge,
    /// How long the last Full snapshot took to create.
    pub full_create_snapshot: Gauge,
    /// How long the last Diff snapshot took to create.
    pub diff_create_snapshot: Gauge,
    /// How long the last snapshot load took.
    pub load_snapshot: Gauge,
}

impl LatencyMetrics {
    const fn new() -> Self {
        Self {
            vmm_pause_vm: Gauge::new(),
            vmm_resume_vm: Gauge::new(),
            full_create_snapshot: Gauge::new(),
            diff_create_snapshot: Gauge::new(),
            load_snapshot: Gauge::new(),
        }
    }

    fn take(&self) -> Value {
        group([
            ("vmm_pause_vm", self.vmm_pause_vm.get()),
            ("vmm_resume_vm", self.vmm_resume_vm.get()),
            ("full_create_snapshot", self.full_create_snapshot.get()),
            ("diff_create_snapshot", self.diff_create_snapshot.get()),
            ("load_snapshot", self.load_snapshot.get()),
        ])
    }
}

/// `logger`.
#[derive(Debug, Default)]
pub struct LoggerMetrics {
    /// Log lines that could not be written.
    pub missed_log_count: Counter,
    /// Metrics lines that could not be written.
    pub missed_metrics_count: Counter,
}

impl LoggerMetrics {
    const fn new() -> Self {
        Self {
            missed_log_count: Counter::new(),
            missed_metrics_count: Counter::new(),
        }
    }

    fn take(&self) -> Value {
        group([
            ("missed_log_count", self.missed_log_count.take_delta()),
            (
                "missed_metrics_count",
                self.missed_metrics_count.take_delta(),
            ),
        ])
    }
}

/// `signals`: the signals Kiln acts on.
#[derive(Debug, Default)]
pub struct SignalMetrics {
    /// SIGHUP (stops Kiln).
    pub sighup: Counter,
    /// SIGINT (stops Kiln).
    pub sigint: Counter,
    /// SIGTERM (stops Kiln).
    pub sigterm: Counter,
    /// SIGUSR1 (vCPU report).
    pub sigusr1: Counter,
}

impl SignalMetrics {
    const fn new() -> Self {
        Self {
            sighup: Counter::new(),
            sigint: Counter::new(),
            sigterm: Counter::new(),
            sigusr1: Counter::new(),
        }
    }

    /// Counts `signal` if it is one of these.
    pub fn record(&self, signal: i32) {
        let counter = match signal {
            libc::SIGHUP => &self.sighup,
            libc::SIGINT => &self.sigint,
            libc::SIGTERM => &self.sigterm,
            libc::SIGUSR1 => &self.sigusr1,
            _ => return,
        };
        counter.inc();
    }

    fn take(&self) -> Value {
        group([
            ("sighup", self.sighup.take_delta()),
            ("sigint", self.sigint.take_delta()),
            ("sigterm", self.sigterm.take_delta()),
            ("sigusr1", self.sigusr1.take_delta()),
        ])
    }
}

/// `vcpu`: exits of every vCPU together.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: Counter,
    /// Port writes.
    pub exit_io_out: Counter,
    /// MMIO reads.
    pub exit_mmio_read: Counter,
    /// MMIO writes.
    pub exit_mmio_write: Counter,
    /// vCPUs that stopped on an exit Kiln cannot continue from.
    pub failures: Counter,
}

impl VcpuMetrics {
    const fn new() -> Self {
        Self {
            exit_io_in: Counter::new(),
            exit_io_out: Counter::new(),
            exit_mmio_read: Counter::new(),
            exit_mmio_write: Counter::new(),
            failures: Counter::new(),
        }
    }

    fn take(&self) -> Value {
        group([
            ("exit_io_in", self.exit_io_in.take_delta()),
            ("exit_io_out", self.exit_io_out.take_delta()),
            ("exit_mmio_read", self.exit_mmio_read.take_delta()),
            ("exit_mmio_write", self.exit_mmio_write.take_delta()),
            ("failures", self.failures.take_delta()),
        ])
    }
}

/// `vmm`.
#[derive(Debug, Default)]
pub struct VmmMetrics {
    /// Events the device event loop dispatched.
    pub device_events: Counter,
}

impl VmmMetrics {
    const fn new() -> Self {
        Self {
            device_events: Counter::new(),
        }
    }

    fn take(&self) -> Value {
        group([("device_events", self.device_events.take_delta())])
    }
}

/// One device group of a line, as the device registry reports it: running totals since the
/// device was created, under Firecracker's field names (`block_<id>`, `block`, `uart`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGroup {
    /// The group's name in the line.
    pub name: String,
    /// The running totals.
    pub values: Vec<(&'static str, u64)>,
}

/// What each device counter gained since the previous line, from the totals `now` and the
/// totals `reported` last time (which become `now`'s).
fn device_deltas(
    reported: &mut BTreeMap<String, Vec<(&'static str, u64)>>,
    now: &[DeviceGroup],
) -> Vec<(String, Value)> {
    now.iter()
        .map(|group| {
            let before = reported.get(&group.name);
            let deltas = group.values.iter().map(|&(field, total)| {
                let was = before
                    .and_then(|b| b.iter().find(|(f, _)| *f == field))
                    .map_or(0, |&(_, v)| v);
                (field, total.saturating_sub(was))
            });
            let value = self::group(deltas);
            reported.insert(group.name.clone(), group.values.clone());
            (group.name.clone(), value)
        })
        .collect()
}

/// Where lines go, and what `PUT /metrics` asked to add to each.
struct Output {
    file: File,
    id: Option<String>,
    properties: Option<BTreeMap<String, String>>,
}

/// Top-level entries in the order given (serde_json's own map would sort them).
struct Ordered<'a>(&'a [(String, Value)]);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The metrics system: counters anyone may add to, the devices to read, and the output.
pub struct Metrics {
    output: Mutex<Option<Output>>,
    /// Each device group's totals as the previous line reported them.
    reported: Mutex<BTreeMap<String, Vec<(&'static str, u64)>>>,
    /// Set by the last flush of a VM's run, so the process's exit does not write another line.
    exit_flushed: AtomicBool,
    /// Set once the API is served: the groups only the API feeds are written from then on.
    api_served: AtomicBool,
    /// `api_server`.
    pub api_server: ApiServerMetrics,
    /// `get_api_requests`, `put_api_requests`, `patch_api_requests`.
    pub api_requests: ApiRequestMetrics,
    /// `latencies_us`.
    pub latencies_us: LatencyMetrics,
    /// `logger`.
    pub logger: LoggerMetrics,
    /// `signals`.
    pub signals: SignalMetrics,
    /// `vcpu`.
    pub vcpu: VcpuMetrics,
    /// `vmm`.
    pub vmm: VmmMetrics,
}

/// Locks `mutex`, going on if a thread panicked while holding it: counters and files stay usable.
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// No output, no devices, every counter zero.
    pub const fn new() -> Self {
        Self {
            output: Mutex::new(None),
            reported: Mutex::new(BTreeMap::new()),
            exit_flushed: AtomicBool::new(false),
            api_served: AtomicBool::new(false),
            api_server: ApiServerMetrics::new(),
            api_requests: ApiRequestMetrics::new(),
            latencies_us: LatencyMetrics::new(),
            logger: LoggerMetrics::new(),
            signals: SignalMetrics::new(),
            vcpu: VcpuMetrics::new(),
            vmm: VmmMetrics::new(),
        }
    }

    /// Opens `config.metrics_path` (see [`open_output`]) and writes there from now on. Only once,
    /// as in Firecracker; on error nothing changes. `instance_id` is emitted when
    /// `config.emit_id` asks for it.
    pub fn configure(
        &self,
        config: &api::models::Metrics,
        instance_id: &str,
    ) -> Result<(), MetricsError> {
        let mut output = lock(&self.output);
        if output.is_some() {
            return Err(MetricsError::AlreadyConfigured);
        }
        let file = open_output(&config.metrics_path)?;
        *output = Some(Output {
            file,
            id: config
                .emit_id
                .unwrap_or(false)
                .then(|| instance_id.to_string()),
            properties: config.properties.clone(),
        });
        Ok(())
    }

    /// Records that the API is served, `startup` after Kiln started (and `startup_cpu` of
    /// process CPU time): the API groups and `latencies_us` appear in the lines from now on.
    pub fn api_started(&self, startup: Duration, startup_cpu: Option<Duration>) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.api_server
            .process_startup_time_us
            .store(micros(startup));
        if let Some(cpu) = startup_cpu {
            self.api_server
                .process_startup_time_cpu_us
                .store(micros(cpu));
        }
        self.api_served.store(true, Ordering::Relaxed);
    }

    /// True once an output is configured.
    pub fn is_configured(&self) -> bool {
        lock(&self.output).is_some()
    }

    /// Writes one line now, with `devices`' groups (the running VM's registry walked; none
    /// before a VM exists). [`MetricsError::NotConfigured`] if there is no output yet.
    pub fn flush(&self, devices: &[DeviceGroup]) -> Result<(), MetricsError> {
        let mut output = lock(&self.output);
        let output = output.as_mut().ok_or(MetricsError::NotConfigured)?;
        let mut line = self.line(output, devices);
        line.push('\n');
        output.file.write_all(line.as_bytes()).map_err(|e| {
            self.logger.missed_metrics_count.inc();
            MetricsError::Write(e)
        })
    }

    /// Flushes if an output is configured; a failure is logged (for the timer and the exit,
    /// which have nobody to answer).
    pub fn flush_if_configured(&self, devices: &[DeviceGroup]) {
        match self.flush(devices) {
            Ok(()) | Err(MetricsError::NotConfigured) => {}
            Err(e) => log::warn!("metrics: {e}"),
        }
    }

    /// The last line of a VM's run, with its devices (Firecracker writes one on its way out).
    pub fn flush_at_vm_end(&self, devices: &[DeviceGroup]) {
        self.flush_if_configured(devices);
        self.exit_flushed.store(true, Ordering::Relaxed);
    }

    /// The last line of the process, unless a VM's run already wrote it.
    pub fn flush_at_exit(&self) {
        if !self.exit_flushed.load(Ordering::Relaxed) {
            self.flush_if_configured(&[]);
        }
    }

    /// The JSON object of one flush (taking every counter's delta).
    fn line(&self, output: &Output, devices: &[DeviceGroup]) -> String {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut entries = vec![("utc_timestamp_ms".to_string(), Value::from(timestamp))];
        if let Some(id) = &output.id {
            entries.push(("id".to_string(), Value::from(id.as_str())));
        }
        if let Some(properties) = &output.properties {
            let properties = properties
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect();
            entries.push(("properties".to_string(), Value::Object(properties)));
        }
        // Without an API nothing counts these: they would only ever be zeros.
        let api = self.api_served.load(Ordering::Relaxed);
        let mut push = |name: &str, value: Value| entries.push((name.to_string(), value));
        if api {
            push("api_server", self.api_server.take());
            for group in [ApiGroup::Get, ApiGroup::Put, ApiGroup::Patch] {
                push(group.name(), self.api_requests.take(group));
            }
        }
        entries.extend(device_deltas(&mut lock(&self.reported), devices));
        let mut push = |name: &str, value: Value| entries.push((name.to_string(), value));
        if api {
            push("latencies_us", self.latencies_us.take());
        }
        push("logger", self.logger.take());
        push("signals", self.signals.take());
        push("vcpu", self.vcpu.take());
        push("vmm", self.vmm.take());
        // Serializing strings, numbers and maps cannot fail; an empty object is the fallback.
        serde_json::to_string(&Ordered(&entries)).unwrap_or_else(|_| "{}".to_string())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The event-loop subscriber that flushes `metrics` every period.
pub struct PeriodicFlush {
    metrics: &'static Metrics,
    timer: TimerFd,
    devices: Box<dyn Fn() -> Vec<DeviceGroup> + Send>,
}

impl PeriodicFlush {
    /// A timer firing every `period`, armed when the event loop registers it; each flush
    /// carries the groups `devices` reports (the VM's registry walked).
    pub fn new(
        metrics: &'static Metrics,
        period: Duration,
        devices: Box<dyn Fn() -> Vec<DeviceGroup> + Send>,
    ) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(period, Some(period))?;
        Ok(Self {
            metrics,
            timer,
            devices,
        })
    }
}

impl MutEventSubscriber for PeriodicFlush {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("metrics: cannot watch the flush timer, metrics are written only on request and at exit: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading the expiration count re-arms the level-triggered event; missed periods are one
        // flush, not several.
        let _ = self.timer.wait();
        self.metrics.flush_if_configured(&(self.devices)());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// Groups as a registry with two drives and an entropy device reports them.
    fn groups(root_read: u64) -> Vec<DeviceGroup> {
        let group = |name: &str, values: Vec<(&'static str, u64)>| DeviceGroup {
            name: name.to_string(),
            values,
        };
        vec![
            group(
                "block_root",
                vec![("read_bytes", root_read), ("flush_count", 1)],
            ),
            group("block_data", vec![("read_bytes", 100)]),
            group(
                "block",
                vec![("read_bytes", root_read + 100), ("flush_count", 1)],
            ),
            group("entropy", vec![("entropy_bytes", 64)]),
        ]
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-metrics-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(path: &std::path::Path) -> api::models::Metrics {
        api::models::Metrics {
            metrics_path: path.to_path_buf(),
            emit_id: None,
            properties: None,
        }
    }

    fn lines(path: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn counters_report_deltas_and_gauges_values() {
        let c = Counter::new();
        c.add(5);
        c.inc();
        assert_eq!((c.take_delta(), c.take_delta()), (6, 0));
        c.inc();
        assert_eq!((c.total(), c.take_delta()), (7, 1));
        let g = Gauge::new();
        g.store(42);
        assert_eq!((g.get(), g.get()), (42, 42));
    }

    #[test]
    fn lines_have_firecrackers_groups_and_deltas() {
        let dir = scratch("lines");
        let path = dir.join("metrics.json");
        let metrics: &'static Metrics = Box::leak(Box::default());
        assert!(matches!(
            metrics.flush(&[]),
            Err(MetricsError::NotConfigured)
        ));
        let mut cfg = config(&path);
        cfg.emit_id = Some(true);
        cfg.properties = Some(BTreeMap::from([("az".to_string(), "eu-1".to_string())]));
        metrics.configure(&cfg, "vm7").unwrap();
        metrics.flush(&[]).unwrap();
        metrics.api_started(Duration::from_micros(1500), None);
        assert!(matches!(
            metrics.configure(&config(&path), "vm7"),
            Err(MetricsError::AlreadyConfigured)
        ));
        metrics.api_requests.record("PUT", "/drives/root", 204);
        metrics.api_requests.record("PUT", "/drives/x", 400);
        metrics.api_requests.record("GET", "/?x=1", 200);
        metrics.api_requests.record("GET", "/vm/config", 200);
        metrics.vcpu.exit_io_out.add(3);
        metrics.signals.record(libc::SIGTERM);
        metrics.latencies_us.vmm_pause_vm.store(77);
        metrics.flush(&groups(512)).unwrap();
        metrics.flush(&groups(1536)).unwrap();

        let lines = lines(&path);
        assert_eq!(lines.len(), 3);
        let before_api = &lines[0];
        for group in ["api_server", "put_api_requests", "latencies_us"] {
            assert!(before_api.get(group).is_none(), "{group} without an API");
        }
        assert!(before_api["vcpu"].is_object());
        let first = &lines[1];
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(raw.starts_with(r#"{"utc_timestamp_ms":"#), "{raw}");
        assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(first["id"], "vm7");
        assert_eq!(first["properties"]["az"], "eu-1");
        for group in [
            "api_server",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "block_root",
            "block_data",
            "block",
            "entropy",
            "latencies_us",
            "logger",
            "signals",
            "vcpu",
            "vmm",
        ] {
            assert!(first[group].is_object(), "{group} missing: {first}");
        }
        assert!(first.get("net").is_none(), "no net device, no net group");
        assert!(first.get("entropy_").is_none());
        assert_eq!(first["put_api_requests"]["drive_count"], 2);
        assert_eq!(first["put_api_requests"]["drive_fails"], 1);
        assert_eq!(first["get_api_requests"]["instance_info_count"], 1);
        assert!(first["get_api_requests"]
            .get("instance_info_fails")
            .is_none());
        assert_eq!(first["block_root"]["read_bytes"], 512);
        assert_eq!(first["block"]["read_bytes"], 612);
        assert_eq!(first["entropy"]["entropy_bytes"], 64);
        assert_eq!(first["vcpu"]["exit_io_out"], 3);
        assert_eq!(first["signals"]["sigterm"], 1);
        assert_eq!(first["latencies_us"]["vmm_pause_vm"], 77);

        assert_eq!(first["api_server"]["process_startup_time_us"], 1500);
        let second = &lines[2];
        assert_eq!(
            second["put_api_requests"]["drive_count"], 0,
            "reset per flush"
        );
        assert_eq!(second["block_root"]["read_bytes"], 1024);
        assert_eq!(second["block_root"]["flush_count"], 0);
        assert_eq!(second["block"]["read_bytes"], 1024);
        assert_eq!(second["vcpu"]["exit_io_out"], 0);
        assert_eq!(
            second["latencies_us"]["vmm_pause_vm"], 77,
            "gauges keep their value"
        );
    }

    #[test]
    fn a_bad_path_changes_nothing() {
        let dir = scratch("bad");
        let metrics = Metrics::new();
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        let err = metrics.configure(&config(&link), "vm").unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!metrics.is_configured());
        assert!(metrics.configure(&config(&dir.join("ok")), "vm").is_ok());
    }

    #[test]
    fn the_event_loop_flushes_periodically() {
        use crate::event_loop::EventLoop;
        let dir = scratch("periodic");
        let path = dir.join("metrics.json");
        let metrics: &'static Metrics = Box::leak(Box::default());
        metrics.configure(&config(&path), "vm").unwrap();
        let flusher =
            PeriodicFlush::new(metrics, Duration::from_millis(20), Box::new(|| groups(512)))
                .unwrap();
        let running = EventLoop::new(&[Arc::new(Mutex::new(flusher))], Box::new(Vec::new))
            .unwrap()
            .spawn(
                &Arc::new(crate::seccomp::SeccompFilters::disabled()),
                |_| {},
            )
            .unwrap();
        let start = std::time::Instant::now();
        while std::fs::read_to_string(&path).unwrap().lines().count() < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no periodic flush"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        running.stop();
        assert!(lines(&path)
            .iter()
            .all(|l| l["vmm"].is_object() && l["block_root"].is_object()));
    }
}
