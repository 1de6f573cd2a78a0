//! Consistency of `api/openapi.yaml` with [`ROUTES`] and with the model types.
//!
//! There is no YAML parser in the workspace, so these tests scan the file line by line and rely on
//! its layout (the layout of Firecracker's document, which Kiln's copy keeps):
//! - top-level sections (`paths:`, `definitions:`) start in column 0;
//! - under `paths:`, a path is a 2-space-indented key starting with `/`, and its methods are
//!   4-space-indented `get:` / `put:` / `patch:` (any other HTTP method is caught too);
//! - under `definitions:`, a definition is a 2-space-indented key; its `required:` list items and
//!   its `properties:` keys are 6-space-indented, under 4-space-indented `required:` /
//!   `properties:` lines;
//! - `#` starts a comment line.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ROUTES;
use crate::models::*;

const OPENAPI: &str = include_str!("../../openapi.yaml");

/// A line's indentation in spaces.
fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The non-blank, non-comment lines of top-level section `name`, up to the next top-level key.
fn section(name: &str) -> Vec<&'static str> {
    let header = format!("{name}:");
    let mut lines = OPENAPI.lines().skip_while(|l| l.trim_end() != header);
    assert!(
        lines.next().is_some(),
        "openapi.yaml has no top-level `{header}`"
    );
    lines
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .take_while(|l| indent(l) > 0)
        .collect()
}

/// The key of a `key:` line (nothing after the colon), if it is one.
fn key(line: &str) -> Option<&str> {
    let key = line.trim().strip_suffix(':')?;
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-/{}".contains(&b));
    plain.then_some(key)
}

/// Every (METHOD, path) of the `paths:` section.
fn yaml_routes() -> BTreeSet<(String, String)> {
    const METHODS: &[&str] = &["get", "put", "patch", "post", "delete", "head", "options"];
    let mut routes = BTreeSet::new();
    let mut path = None;
    for line in section("paths") {
        match (indent(line), key(line)) {
            (2, Some(p)) if p.starts_with('/') => path = Some(p),
            (2, _) => panic!("unexpected line under paths: {line:?}"),
            (4, Some(m)) if METHODS.contains(&m) => {
                let path = path.unwrap_or_else(|| panic!("method before any path: {line:?}"));
                let fresh = routes.insert((m.to_ascii_uppercase(), path.to_string()));
                assert!(fresh, "{m} {path} listed twice");
            }
            _ => {}
        }
    }
    routes
}

/// One definition's `required:` and `properties:` names.
#[derive(Debug, Default)]
struct Definition {
    required: BTreeSet<String>,
    properties: BTreeSet<String>,
}

/// Every definition of the `definitions:` section.
fn yaml_definitions() -> BTreeMap<String, Definition> {
    let mut defs: BTreeMap<String, Definition> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut block = "";
    for line in section("definitions") {
        match indent(line) {
            2 => {
                let name = key(line).unwrap_or_else(|| panic!("bad definition line {line:?}"));
                assert!(!defs.contains_key(name), "definition {name} twice");
                defs.insert(name.to_string(), Definition::default());
                current = Some(name.to_string());
                block = "";
            }
            4 => block = line.trim(),
            6 => {
                let Some(def) = current.as_ref().and_then(|c| defs.get_mut(c)) else {
                    continue;
                };
                match block {
                    "required:" => {
                        if let Some(item) = line.trim().strip_prefix("- ") {
                            def.required.insert(item.trim().to_string());
                        }
                    }
                    "properties:" => {
                        if let Some(k) = key(line) {
                            def.properties.insert(k.to_string());
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    defs
}

/// Every `#/definitions/X` the file refers to.
fn yaml_refs() -> BTreeSet<String> {
    OPENAPI
        .split("#/definitions/")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn paths_equal_routes() {
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(expected.len(), ROUTES.len(), "ROUTES has duplicates");
    assert_eq!(yaml_routes(), expected);
}

#[test]
fn definitions_are_all_used_and_all_defined() {
    let defs = yaml_definitions();
    let refs = yaml_refs();
    let defined: BTreeSet<String> = defs.keys().cloned().collect();
    assert_eq!(
        refs.difference(&defined).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "referenced but not defined"
    );
    assert_eq!(
        defined.difference(&refs).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "defined but never referenced"
    );
}

/// Whether `T` deserializes from `value`.
fn accepts<T: DeserializeOwned>(value: &Value) -> bool {
    serde_json::from_value::<T>(value.clone()).is_ok()
}

/// A model type with every optional field set, serialized, and its deserializer.
struct Sample {
    definition: &'static str,
    full: Value,
    accepts: fn(&Value) -> bool,
    /// Every field is optional whatever the definition says (the PATCH body type).
    all_optional: bool,
}

fn sample<T: serde::Serialize + DeserializeOwned>(definition: &'static str, full: T) -> Sample {
    let full = serde_json::to_value(full).unwrap_or_else(|e| panic!("{definition}: {e}"));
    Sample {
        definition,
        full,
        accepts: accepts::<T>,
        all_optional: false,
    }
}

fn samples() -> Vec<Sample> {
    let backend = MemoryBackend {
        backend_type: MemoryBackendType::Uffd,
        backend_path: "/u".into(),
    };
    let net_override = NetworkOverride {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
    };
    let vsock_override = VsockOverride {
        uds_path: "/v".into(),
    };
    let drive_override = DriveOverride {
        drive_id: "d".into(),
        path_on_host: "/d".into(),
    };
    let bucket = TokenBucketConfig {
        size: 1,
        one_time_burst: Some(1),
        refill_time: 1,
    };
    let limiter = RateLimiterConfig {
        bandwidth: Some(bucket),
        ops: Some(bucket),
    };
    let boot = BootSource {
        kernel_image_path: "/k".into(),
        boot_args: Some("console=ttyS0".into()),
        initrd_path: Some("/i".into()),
    };
    let machine = MachineConfiguration {
        cpu_template: Some(CpuTemplate::None),
        ..Default::default()
    };
    let drive = Drive {
        drive_id: "d".into(),
        partuuid: Some("p".into()),
        is_root_device: true,
        cache_type: CacheType::Writeback,
        is_read_only: Some(true),
        path_on_host: Some("/x".into()),
        rate_limiter: Some(limiter),
        io_engine: IoEngine::Async,
        socket: Some("/s".into()),
    };
    let iface = NetworkInterface {
        iface_id: "n".into(),
        host_dev_name: "tap0".into(),
        guest_mac: Some(MacAddr([6, 0, 0, 0, 0, 1])),
        mtu: Some(1500),
        rx_rate_limiter: Some(limiter),
        tx_rate_limiter: Some(limiter),
    };
    let vsock = Vsock {
        vsock_id: Some("v".into()),
        guest_cid: 3,
        uds_path: "/v".into(),
    };
    let entropy = EntropyDevice {
        rate_limiter: Some(limiter),
    };
    let logger = Logger {
        log_path: Some("/l".into()),
        level: Some(LogLevel::Info),
        show_level: Some(true),
        show_log_origin: Some(true),
        module: Some("m".into()),
    };
    let metrics = Metrics {
        metrics_path: "/m".into(),
        emit_id: Some(true),
        properties: Some([("k".to_string(), "v".to_string())].into()),
    };
    let serial = SerialDevice {
        serial_out_path: Some("/c".into()),
        rate_limiter: Some(bucket),
    };
    let balloon = Balloon {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: true,
        free_page_reporting: true,
    };
    let mmds = MmdsConfig {
        version: MmdsVersion::V2,
        network_interfaces: vec!["n".into()],
        ipv4_address: Some(DEFAULT_MMDS_IPV4),
        imds_compat: true,
    };
    let some = Some(1);
    let stats = BalloonStats {
        target_pages: 1,
        actual_pages: 1,
        target_mib: 1,
        actual_mib: 1,
        swap_in: some,
        swap_out: some,
        major_faults: some,
        minor_faults: some,
        free_memory: some,
        total_memory: some,
        available_memory: some,
        disk_caches: some,
        hugetlb_allocations: some,
        hugetlb_failures: some,
        oom_kill: some,
        alloc_stall: some,
        async_scan: some,
        direct_scan: some,
        async_reclaim: some,
        direct_reclaim: some,
    };
    vec![
        sample("Balloon", balloon),
        sample("BalloonUpdate", BalloonUpdate { amount_mib: 1 }),
        sample(
            "BalloonStatsUpdate",
            BalloonStatsUpdate {
                stats_polling_interval_s: 1,
            },
        ),
        sample(
            "BalloonStartCmd",
            BalloonStartCmd {
                acknowledge_on_stop: true,
            },
        ),
        sample("BalloonStats", stats),
        sample(
            "BalloonHintingStatus",
            HintingStatus {
                host_cmd: 2,
                guest_cmd: Some(2),
            },
        ),
        sample("BootSource", boot.clone()),
        sample("MachineConfiguration", machine.clone()),
        // PATCH /machine-config's body is a MachineConfiguration with every field optional.
        Sample {
            all_optional: true,
            ..sample(
                "MachineConfiguration",
                MachineConfigurationPatch {
                    vcpu_count: Some(1),
                    mem_size_mib: Some(1),
                    smt: Some(false),
                    cpu_template: Some(CpuTemplate::None),
                    track_dirty_pages: Some(false),
                    huge_pages: Some(HugePages::None),
                },
            )
        },
        sample("Drive", drive.clone()),
        sample(
            "PartialDrive",
            PartialDrive {
                drive_id: "d".into(),
                path_on_host: Some("/x".into()),
                rate_limiter: Some(limiter),
            },
        ),
        sample("NetworkInterface", iface.clone()),
        sample(
            "PartialNetworkInterface",
            PartialNetworkInterface {
                iface_id: "n".into(),
                rx_rate_limiter: Some(limiter),
                tx_rate_limiter: Some(limiter),
            },
        ),
        sample("RateLimiter", limiter),
        sample("TokenBucket", bucket),
        sample("Vsock", vsock.clone()),
        sample("EntropyDevice", entropy.clone()),
        sample("SerialDevice", serial.clone()),
        sample("Logger", logger.clone()),
        sample("Metrics", metrics.clone()),
        sample(
            "InstanceActionInfo",
            InstanceActionInfo {
                action_type: ActionType::InstanceStart,
            },
        ),
        sample(
            "Vm",
            Vm {
                state: VmState::Paused,
            },
        ),
        sample(
            "InstanceInfo",
            InstanceInfo {
                app_name: "Kiln".into(),
                id: "i".into(),
                state: InstanceState::Running,
                vmm_version: "0".into(),
            },
        ),
        sample(
            "FirecrackerVersion",
            FirecrackerVersion {
                firecracker_version: "1".into(),
            },
        ),
        sample("Error", ApiError::new("e")),
        sample(
            "FullVmConfiguration",
            FullVmConfiguration {
                drives: vec![drive],
                boot_source: Some(boot),
                logger: Some(logger),
                machine_config: Some(machine),
                metrics: Some(metrics),
                network_interfaces: vec![iface],
                vsock: Some(vsock),
                entropy: Some(entropy),
                serial: Some(serial),
                balloon: Some(balloon),
                mmds_config: Some(mmds.clone()),
                fs: vec![FsDevice {
                    tag: "t".into(),
                    socket: "/s".into(),
                    num_queues: 1,
                    queue_size: 1024,
                }],
            },
        ),
        sample(
            "FsDevice",
            FsDevice {
                tag: "t".into(),
                socket: "/s".into(),
                num_queues: 2,
                queue_size: 256,
            },
        ),
        sample("MmdsConfig", mmds),
        sample(
            "SnapshotCreateParams",
            SnapshotCreateParams {
                mem_file_path: "/m".into(),
                snapshot_path: "/s".into(),
                snapshot_type: SnapshotType::Diff,
            },
        ),
        sample("MemoryBackend", backend.clone()),
        sample("NetworkOverride", net_override.clone()),
        sample("VsockOverride", vsock_override.clone()),
        sample("DriveOverride", drive_override.clone()),
        sample(
            "SnapshotLoadParams",
            SnapshotLoadParams {
                snapshot_path: "/s".into(),
                mem_file_path: Some("/m".into()),
                mem_backend: Some(backend),
                enable_diff_snapshots: true,
                track_dirty_pages: true,
                resume_vm: true,
                network_overrides: vec![net_override],
                vsock_override: Some(vsock_override),
                clock_realtime: true,
                huge_pages: SnapshotHugePages::None,
                drive_overrides: vec![drive_override],
            },
        ),
    ]
}

#[test]
fn model_fields_match_definitions() {
    let defs = yaml_definitions();
    let mut covered = BTreeSet::new();
    for s in samples() {
        let def = defs
            .get(s.definition)
            .unwrap_or_else(|| panic!("no definition {}", s.definition));
        covered.insert(s.definition);
        let Value::Object(fields) = &s.full else {
            panic!("{} is not an object", s.definition)
        };
        let keys: BTreeSet<String> = fields.keys().cloned().collect();
        assert_eq!(
            keys, def.properties,
            "{}: fields vs properties",
            s.definition
        );
        assert!(
            (s.accepts)(&s.full),
            "{}: full sample refused",
            s.definition
        );

        // Dropping a field must fail exactly when the definition lists it as required.
        for name in fields.keys() {
            let mut without = fields.clone();
            without.remove(name);
            let accepted = (s.accepts)(&Value::Object(without));
            let required = def.required.contains(name) && !s.all_optional;
            assert_eq!(
                accepted, !required,
                "{}: dropping `{name}` (required: {required})",
                s.definition
            );
        }
    }
    // Every definition with properties is covered by a model type.
    for (name, def) in &defs {
        if !def.properties.is_empty() {
            assert!(
                covered.contains(name.as_str()),
                "no model type for definition {name}"
            );
        }
    }
}
