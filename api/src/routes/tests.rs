//! Unit tests of [`parse_request`], with bodies as Kata, firecracker-go-sdk and firectl send them.

use std::path::PathBuf;

use super::*;
use crate::models::{CacheType, InstanceState, IoEngine, LogLevel, MacAddr, TokenBucketConfig};

fn ok(method: &str, path: &str, body: &str) -> ApiRequest {
    match parse_request(method, path, body.as_bytes()) {
        Ok(req) => req,
        Err(err) => panic!("{method} {path} {body}: {err}"),
    }
}

fn err(method: &str, path: &str, body: &str) -> RequestError {
    match parse_request(method, path, body.as_bytes()) {
        Ok(req) => panic!("{method} {path} {body}: parsed as {req:?}"),
        Err(err) => {
            assert_eq!(err.status(), 400);
            err
        }
    }
}

fn message(method: &str, path: &str, body: &str) -> String {
    err(method, path, body).fault_message()
}

#[test]
fn get_routes() {
    assert_eq!(ok("GET", "/", ""), ApiRequest::GetInstanceInfo);
    assert_eq!(ok("GET", "/version", ""), ApiRequest::GetVersion);
    assert_eq!(
        ok("GET", "/machine-config", ""),
        ApiRequest::GetMachineConfig
    );
    assert_eq!(ok("GET", "/vm/config", ""), ApiRequest::GetVmConfig);
    // Firecracker's tokenizer: trailing '/' and repeated leading '/' are the same path.
    assert_eq!(ok("GET", "/version/", ""), ApiRequest::GetVersion);
    assert_eq!(
        ok("GET", "//machine-config", ""),
        ApiRequest::GetMachineConfig
    );
    assert_eq!(ok("GET", "/vm/config?x=1", ""), ApiRequest::GetVmConfig);
}

#[test]
fn put_boot_source() {
    let req = ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path":"/k/vmlinux","boot_args":"console=ttyS0 reboot=k panic=1 pci=off"}"#,
    );
    let ApiRequest::PutBootSource(boot) = req else {
        panic!("{req:?}")
    };
    assert_eq!(boot.kernel_image_path, PathBuf::from("/k/vmlinux"));
    assert_eq!(boot.initrd_path, None);
}

#[test]
fn machine_config_put_and_patch() {
    // firecracker-go-sdk sends all four fields.
    let req = ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":2048,"smt":false,"track_dirty_pages":false}"#,
    );
    assert_eq!(
        req,
        ApiRequest::PutMachineConfig(MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 2048,
            ..Default::default()
        })
    );
    // Kata's shape: vcpu_count and mem_size_mib only.
    assert!(matches!(
        ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#
        ),
        ApiRequest::PutMachineConfig(_)
    ));
    let req = ok("PATCH", "/machine-config", r#"{"vcpu_count":4}"#);
    assert_eq!(
        req,
        ApiRequest::PatchMachineConfig(MachineConfigurationPatch {
            vcpu_count: Some(4),
            ..Default::default()
        })
    );
    assert_eq!(
        message("PATCH", "/machine-config", "{}"),
        "Empty PATCH request."
    );
    assert_eq!(
        message(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":128,"smt":true}"#
        ),
        "Kiln does not support SMT: smt must be false."
    );
    assert!(matches!(
        err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":33,"mem_size_mib":128}"#
        ),
        RequestError::Invalid(ValidationError::InvalidVcpuCount(33))
    ));
    assert!(matches!(
        err("PATCH", "/machine-config", r#"{"huge_pages":"2M"}"#),
        RequestError::Invalid(ValidationError::HugePagesNotSupported(_))
    ));
}

#[test]
fn drives_put_and_patch() {
    let req = ok(
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true,"is_read_only":false}"#,
    );
    let ApiRequest::PutDrive(drive) = req else {
        panic!("{req:?}")
    };
    assert_eq!(drive.drive_id, "rootfs");
    assert!(drive.is_root_device);
    assert_eq!(drive.cache_type, CacheType::Unsafe);
    assert_eq!(drive.io_engine, IoEngine::Sync);

    // Kata hot-plugs placeholder drives with io_engine and a rate limiter.
    let req = ok(
        "PUT",
        "/drives/drive_1",
        r#"{"drive_id":"drive_1","path_on_host":"/run/kata/drive_1","is_root_device":false,
            "is_read_only":false,"io_engine":"Async","cache_type":"Writeback",
            "rate_limiter":{"bandwidth":{"size":1000000,"one_time_burst":0,"refill_time":1000}}}"#,
    );
    assert!(matches!(req, ApiRequest::PutDrive(ref d) if d.io_engine == IoEngine::Async));

    let req = ok(
        "PATCH",
        "/drives/drive_1",
        r#"{"drive_id":"drive_1","path_on_host":"/new"}"#,
    );
    assert_eq!(
        req,
        ApiRequest::PatchDrive(PartialDrive {
            drive_id: "drive_1".into(),
            path_on_host: Some("/new".into()),
            rate_limiter: None,
        })
    );
    let req = ok(
        "PATCH",
        "/drives/drive_1",
        r#"{"drive_id":"drive_1","rate_limiter":{"ops":{"size":500,"refill_time":100}}}"#,
    );
    let ApiRequest::PatchDrive(patch) = req else {
        panic!("{req:?}")
    };
    assert_eq!(
        patch.rate_limiter.and_then(|r| r.ops),
        Some(TokenBucketConfig {
            size: 500,
            one_time_burst: None,
            refill_time: 100
        })
    );

    let msg = message(
        "PUT",
        "/drives/v",
        r#"{"drive_id":"v","is_root_device":false,"socket":"/vhost.sock"}"#,
    );
    assert!(
        msg.contains("vhost-user") && msg.contains("not supported"),
        "{msg}"
    );
}

#[test]
fn network_interfaces_put_and_patch() {
    let req = ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","guest_mac":"AA:FC:00:00:00:01","host_dev_name":"tap0"}"#,
    );
    let ApiRequest::PutNetworkInterface(iface) = req else {
        panic!("{req:?}")
    };
    assert_eq!(iface.guest_mac, Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])));
    assert_eq!(iface.host_dev_name, "tap0");

    let req = ok(
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":1024,"refill_time":100}},
            "tx_rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#,
    );
    assert!(matches!(req, ApiRequest::PatchNetworkInterface(ref p) if p.iface_id == "eth0"));

    let msg = message(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"not-a-mac"}"#,
    );
    assert!(
        msg.starts_with(
            "An error occurred when deserializing the json body of a request: \
             invalid MAC address \"not-a-mac\""
        ),
        "{msg}"
    );
}

#[test]
fn device_and_instance_routes() {
    assert_eq!(
        ok(
            "PUT",
            "/vsock",
            r#"{"guest_cid":3,"uds_path":"/tmp/kata.hvsock"}"#
        ),
        ApiRequest::PutVsock(Vsock {
            vsock_id: None,
            guest_cid: 3,
            uds_path: "/tmp/kata.hvsock".into(),
        })
    );
    // firecracker-go-sdk still sends the deprecated vsock_id.
    assert!(matches!(
        ok(
            "PUT",
            "/vsock",
            r#"{"vsock_id":"vsock0","guest_cid":3,"uds_path":"/v"}"#
        ),
        ApiRequest::PutVsock(_)
    ));
    assert!(matches!(
        err("PUT", "/vsock", r#"{"guest_cid":2,"uds_path":"/v"}"#),
        RequestError::Invalid(ValidationError::InvalidGuestCid(2))
    ));
    assert_eq!(
        ok("PUT", "/entropy", "{}"),
        ApiRequest::PutEntropy(EntropyDevice::default())
    );
    assert_eq!(
        ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        ApiRequest::Action(ActionType::InstanceStart)
    );
    assert_eq!(
        ok("PUT", "/actions", r#"{ "action_type": "SendCtrlAltDel" }"#),
        ApiRequest::Action(ActionType::SendCtrlAltDel)
    );
    assert_eq!(
        ok("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#),
        ApiRequest::Action(ActionType::FlushMetrics)
    );
    assert_eq!(
        ok("PATCH", "/vm", r#"{"state":"Paused"}"#),
        ApiRequest::PatchVm(VmState::Paused)
    );
    assert_eq!(
        ok("PATCH", "/vm", r#"{"state":"Resumed"}"#),
        ApiRequest::PatchVm(VmState::Resumed)
    );
    let req = ok(
        "PUT",
        "/logger",
        r#"{"log_path":"/run/fc.log","level":"Debug","show_level":true,"show_log_origin":true}"#,
    );
    assert!(matches!(req, ApiRequest::PutLogger(ref l) if l.level == Some(LogLevel::Debug)));
    assert!(matches!(
        ok("PUT", "/metrics", r#"{"metrics_path":"/run/fc.metrics"}"#),
        ApiRequest::PutMetrics(_)
    ));
    assert_eq!(
        ok("PUT", "/serial", r#"{"serial_out_path":"/tmp/console"}"#),
        ApiRequest::PutSerial(SerialDevice {
            serial_out_path: Some("/tmp/console".into()),
            rate_limiter: None,
        })
    );
    // Not a request type, but the state strings belong to the same contract.
    assert_eq!(
        serde_json::to_string(&InstanceState::Paused).unwrap(),
        r#""Paused""#
    );
}

#[test]
fn unknown_fields_give_serde_text() {
    assert_eq!(
        message(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true,"bogus":1}"#
        ),
        "An error occurred when deserializing the json body of a request: unknown field `bogus`, \
         expected one of `drive_id`, `partuuid`, `is_root_device`, `cache_type`, `is_read_only`, \
         `path_on_host`, `rate_limiter`, `io_engine`, `socket` at line 1 column 70."
    );
    for (path, body) in [
        ("/boot-source", r#"{"kernel_image_path":"/k","x":1}"#),
        (
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128,"x":1}"#,
        ),
        (
            "/network-interfaces/a",
            r#"{"iface_id":"a","host_dev_name":"t","x":1}"#,
        ),
        ("/vsock", r#"{"guest_cid":3,"uds_path":"/v","x":1}"#),
        ("/entropy", r#"{"x":1}"#),
        ("/actions", r#"{"action_type":"InstanceStart","x":1}"#),
        ("/logger", r#"{"x":1}"#),
        ("/metrics", r#"{"metrics_path":"/m","x":1}"#),
        ("/serial", r#"{"x":1}"#),
        (
            "/drives/a",
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":true,"rate_limiter":{"x":1}}"#,
        ),
    ] {
        let e = err("PUT", path, body);
        assert!(matches!(e, RequestError::Json(_)), "{path}: {e:?}");
        assert!(
            e.fault_message().contains("unknown field `x`"),
            "{path}: {e}"
        );
    }
    for (path, body) in [
        ("/machine-config", r#"{"x":1}"#),
        ("/drives/a", r#"{"drive_id":"a","x":1}"#),
        ("/network-interfaces/a", r#"{"iface_id":"a","x":1}"#),
        ("/vm", r#"{"state":"Paused","x":1}"#),
    ] {
        assert!(
            message("PATCH", path, body).contains("unknown field `x`"),
            "{path}"
        );
    }
}

#[test]
fn wrong_types_and_bad_json() {
    assert_eq!(
        message(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":"2","mem_size_mib":128}"#
        ),
        "An error occurred when deserializing the json body of a request: invalid type: string \
         \"2\", expected u8 at line 1 column 17."
    );
    assert!(message(
        "PUT",
        "/drives/a",
        r#"{"drive_id":"a","path_on_host":"/x","is_root_device":1}"#
    )
    .contains("invalid type: integer `1`, expected a boolean"));
    assert!(message("PUT", "/actions", r#"{"action_type":"Reboot"}"#)
        .contains("unknown variant `Reboot`"));
    assert!(message("PATCH", "/vm", r#"{"state":"Stopped"}"#).contains("unknown variant `Stopped`"));
    assert!(message("PUT", "/actions", "{}").contains("missing field `action_type`"));
    assert!(message("PUT", "/boot-source", "not json").contains("expected ident"));
    assert!(
        message("PUT", "/boot-source", r#"{"kernel_image_path":"/k"} x"#)
            .contains("trailing characters")
    );
    assert!(message("PUT", "/boot-source", "null").contains("invalid type: null"));
    // serde reads a struct from a JSON array positionally, in Firecracker too; an empty one is
    // short of fields.
    assert!(message("PUT", "/boot-source", "[]").contains("invalid length 0, expected struct"));
    assert!(message("PUT", "/boot-source", " ").contains("EOF while parsing a value"));
    assert!(matches!(
        parse_request("PUT", "/vsock", &[0xff, 0xfe]),
        Err(RequestError::Json(_))
    ));
}

#[test]
fn huge_numbers() {
    assert!(message(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":256,"mem_size_mib":128}"#
    )
    .contains("invalid value: integer `256`, expected u8"));
    assert!(message(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1e3,"mem_size_mib":128}"#
    )
    .contains("invalid type: floating point"));
    assert!(message(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":99999999999999999999999999}"#
    )
    .contains("invalid type: floating point"));
    assert!(matches!(
        err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":18446744073709551615}"#
        ),
        RequestError::Invalid(ValidationError::MemorySizeTooLarge(u64::MAX))
    ));
    assert!(message(
        "PUT",
        "/vsock",
        r#"{"guest_cid":4294967296,"uds_path":"/v"}"#
    )
    .contains("expected u32"));
    assert!(
        message("PUT", "/vsock", r#"{"guest_cid":-3,"uds_path":"/v"}"#).contains("expected u32")
    );
    assert!(message(
        "PUT",
        "/entropy",
        r#"{"rate_limiter":{"ops":{"size":18446744073709551616,"refill_time":1}}}"#
    )
    .contains("expected u64"));
    // The largest values that fit are accepted by serde; the rate limiter itself is consistent.
    assert!(matches!(
        ok(
            "PUT",
            "/entropy",
            r#"{"rate_limiter":{"ops":{"size":18446744073709551615,"refill_time":18446744073709551615}}}"#
        ),
        ApiRequest::PutEntropy(_)
    ));
}

#[test]
fn path_ids() {
    let body = r#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true}"#;
    assert_eq!(
        message("PUT", "/drives/other", body),
        "The id from the path does not match the id from the body!"
    );
    assert!(matches!(
        err("PUT", "/drives/other", body),
        RequestError::IdMismatch { ref path_id, ref body_id } if path_id == "other" && body_id == "rootfs"
    ));
    assert_eq!(
        message("PATCH", "/drives/other", r#"{"drive_id":"rootfs"}"#),
        "The id from the path does not match the id from the body!"
    );
    assert_eq!(
        message(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#
        ),
        "The id from the path does not match the id from the body!"
    );
    assert_eq!(
        message(
            "PATCH",
            "/network-interfaces/eth1",
            r#"{"iface_id":"eth0"}"#
        ),
        "The id from the path does not match the id from the body!"
    );

    // The path ID is checked before the body is read, as in Firecracker.
    for path in [
        "/drives/root-fs",
        "/drives/r%20fs",
        "/drives/r.fs",
        "/network-interfaces/eth:0",
    ] {
        let e = err("PUT", path, "not even json");
        assert!(
            matches!(
                e,
                RequestError::Invalid(ValidationError::InvalidIdCharacters { .. })
            ),
            "{path}: {e:?}"
        );
        assert!(e.fault_message().starts_with(
            "API Resource IDs can only contain alphanumeric characters and underscores"
        ));
    }
    assert_eq!(message("PUT", "/drives", body), "The ID cannot be empty.");
    assert_eq!(
        message("PATCH", "/network-interfaces/", r#"{"iface_id":"a"}"#),
        "The ID cannot be empty."
    );
    let long = "a".repeat(65);
    assert!(matches!(
        err("PUT", &format!("/drives/{long}"), body),
        RequestError::Invalid(ValidationError::IdTooLong { len: 65, .. })
    ));
    // A matching but invalid ID in a configuration file is caught by the body's own validation.
    assert!(matches!(
        err(
            "PUT",
            "/drives/a",
            r#"{"drive_id":"a","path_on_host":"","is_root_device":true}"#
        ),
        RequestError::Invalid(ValidationError::EmptyPath {
            field: "path_on_host"
        })
    ));
}

#[test]
fn unknown_paths_and_methods() {
    // Firecracker names the resource (the path's first segment) in the message.
    for (method, path, body, resource) in [
        ("GET", "/invalid", "", "invalid"),
        ("DELETE", "/mmds", "", "mmds"),
        (
            "POST",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
            "actions",
        ),
        ("DELETE", "/drives/rootfs", "", "drives"),
        // A served resource with a method it does not serve.
        ("GET", "/boot-source", "", "boot-source"),
        ("PATCH", "/boot-source", "{}", "boot-source"),
        ("GET", "/drives/rootfs", "", "drives"),
        ("GET", "/vm", "", "vm"),
        ("GET", "/vm/other", "", "vm"),
        ("get", "/", "", ""),
    ] {
        assert_eq!(
            message(method, path, body),
            format!("Invalid request method and/or path: {method} {resource}."),
            "{method} {path}"
        );
    }
    // Firecracker's CPU config, pmem and hotplug routes are not served.
    for (method, path) in [
        ("PUT", "/cpu-config"),
        ("PUT", "/pmem/p0"),
        ("PUT", "/hotplug/memory"),
    ] {
        let body = if method == "GET" { "" } else { "{}" };
        assert!(matches!(
            err(method, path, body),
            RequestError::InvalidPathMethod { .. }
        ));
    }
}

#[test]
fn trailing_segments_are_ignored_as_firecracker_does() {
    // Client libraries send `PUT /vsock/vsock0`; Firecracker serves it as `PUT /vsock`.
    let vsock = r#"{"guest_cid":3,"uds_path":"/v.sock"}"#;
    assert_eq!(
        ok("PUT", "/vsock/vsock0", vsock),
        ok("PUT", "/vsock", vsock)
    );
    let boot = r#"{"kernel_image_path":"/k"}"#;
    assert_eq!(
        ok("PUT", "/boot-source/extra", boot),
        ok("PUT", "/boot-source", boot)
    );
    assert_eq!(
        ok("GET", "/machine-config/x", ""),
        ApiRequest::GetMachineConfig
    );
    assert_eq!(ok("GET", "/version/", ""), ApiRequest::GetVersion);
    assert_eq!(ok("GET", "/vm/config/x", ""), ApiRequest::GetVmConfig);
    assert_eq!(ok("PUT", "/entropy/e0", "{}"), ok("PUT", "/entropy", "{}"));
    // After an id, the rest is ignored too; the id itself is still checked.
    let drive = r#"{"drive_id":"a","path_on_host":"/a","is_root_device":false}"#;
    assert_eq!(
        ok("PUT", "/drives/a/b", drive),
        ok("PUT", "/drives/a", drive)
    );
    assert_eq!(message("PUT", "/drives", drive), "The ID cannot be empty.");
    assert_eq!(message("PUT", "/drives/", drive), "The ID cannot be empty.");
    // The balloon's sub-paths: unknown ones get Firecracker's own message.
    assert_eq!(
        message("GET", "/balloon/other", ""),
        "Unrecognized GET request path `other`."
    );
    assert_eq!(
        message("GET", "/balloon/hinting", ""),
        "Unrecognized GET request path `/hinting/`."
    );
    assert_eq!(
        message("PATCH", "/balloon/hinting/go", ""),
        "Unrecognized PATCH request path `/hinting/go`."
    );
    // A PATCH under /balloon with a body that is not statistics or hinting updates the target.
    assert_eq!(
        ok("PATCH", "/balloon/anything", r#"{"amount_mib":4}"#),
        ApiRequest::PatchBalloon(BalloonUpdate { amount_mib: 4 })
    );
}

#[test]
fn body_presence_is_checked_first() {
    assert_eq!(message("PUT", "/boot-source", ""), "Empty PUT request.");
    assert_eq!(message("PUT", "/nowhere", ""), "Empty PUT request.");
    assert_eq!(message("PATCH", "/vm", ""), "Empty PATCH request.");
    assert_eq!(message("PATCH", "/drives/a", ""), "Empty PATCH request.");
    assert_eq!(message("GET", "/", "{}"), "GET request cannot have a body.");
    assert_eq!(
        message("GET", "/nowhere", "x"),
        "GET request cannot have a body."
    );
}

#[test]
fn error_body_and_status() {
    let e = err("PUT", "/boot-source", "");
    assert_eq!(e.status(), 400);
    assert_eq!(
        e.to_api_error().to_json(),
        r#"{"fault_message":"Empty PUT request."}"#
    );
}

#[test]
fn every_route_parses() {
    // One valid request per ROUTES entry, so a route added to the table without a parser (or the
    // other way round) fails here.
    let valid = |method: &str, template: &str| -> (String, &'static str) {
        let body = match (method, template) {
            ("GET", _) => "",
            ("PUT", "/boot-source") => r#"{"kernel_image_path":"/k"}"#,
            ("PUT", "/machine-config") => r#"{"vcpu_count":1,"mem_size_mib":128}"#,
            ("PATCH", "/machine-config") => r#"{"mem_size_mib":256}"#,
            ("PUT", "/drives/{drive_id}") => {
                r#"{"drive_id":"d","path_on_host":"/x","is_root_device":false}"#
            }
            ("PATCH", "/drives/{drive_id}") => r#"{"drive_id":"d"}"#,
            ("PUT", "/network-interfaces/{iface_id}") => {
                r#"{"iface_id":"d","host_dev_name":"tap0"}"#
            }
            ("PATCH", "/network-interfaces/{iface_id}") => r#"{"iface_id":"d"}"#,
            ("PUT", "/vsock") => r#"{"guest_cid":3,"uds_path":"/v"}"#,
            ("PUT", "/entropy") | ("PUT", "/logger") | ("PUT", "/serial") => "{}",
            ("PUT", "/actions") => r#"{"action_type":"InstanceStart"}"#,
            ("PATCH", "/vm") => r#"{"state":"Paused"}"#,
            ("PUT", "/metrics") => r#"{"metrics_path":"/m"}"#,
            ("PUT", "/balloon") => r#"{"amount_mib":0,"deflate_on_oom":false}"#,
            ("PATCH", "/balloon") => r#"{"amount_mib":0}"#,
            ("PATCH", "/balloon/statistics") => r#"{"stats_polling_interval_s":1}"#,
            ("PATCH", "/balloon/hinting/start") => r#"{"acknowledge_on_stop":true}"#,
            ("PATCH", "/balloon/hinting/stop") => "",
            ("PUT", "/mmds") | ("PATCH", "/mmds") => r#"{"latest":{"meta-data":{}}}"#,
            ("PUT", "/mmds/config") => r#"{"network_interfaces":["eth0"]}"#,
            ("PUT", "/snapshot/create") => r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
            ("PUT", "/snapshot/load") => r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
            _ => panic!("no sample body for {method} {template}"),
        };
        (
            template
                .replace("{drive_id}", "d")
                .replace("{iface_id}", "d"),
            body,
        )
    };
    let mut seen = Vec::new();
    for route in ROUTES {
        let (method, template) = (route.method, route.path);
        let (path, body) = valid(method, template);
        let req = ok(method, &path, body);
        let variant = format!("{req:?}");
        let variant = variant.split('(').next().unwrap_or_default().to_string();
        assert!(!seen.contains(&variant), "{variant} reached by two routes");
        seen.push(variant);
    }
    assert_eq!(seen.len(), ROUTES.len());
}

#[test]
fn balloon_routes() {
    assert_eq!(
        ok(
            "PUT",
            "/balloon",
            r#"{"amount_mib":8,"deflate_on_oom":false}"#
        ),
        ApiRequest::PutBalloon(Balloon {
            amount_mib: 8,
            ..Default::default()
        })
    );
    assert_eq!(
        ok("PATCH", "/balloon", r#"{"amount_mib":0}"#),
        ApiRequest::PatchBalloon(BalloonUpdate { amount_mib: 0 })
    );
    assert_eq!(
        message("PATCH", "/balloon", ""),
        "Empty PATCH request.",
        "only the hinting commands go without a body"
    );
    assert_eq!(
        ok("GET", "/balloon/statistics", ""),
        ApiRequest::GetBalloonStats
    );
    assert_eq!(
        ok(
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s":0}"#
        ),
        ApiRequest::PatchBalloonStats(BalloonStatsUpdate {
            stats_polling_interval_s: 0
        })
    );
    // Firecracker: the start command's body is optional, the stop command's ignored.
    assert_eq!(
        ok("PATCH", "/balloon/hinting/start", ""),
        ApiRequest::StartBalloonHinting(BalloonStartCmd::default())
    );
    assert_eq!(
        ok("PATCH", "/balloon/hinting/stop", ""),
        ApiRequest::StopBalloonHinting
    );
    assert_eq!(
        ok("GET", "/balloon/hinting/status", ""),
        ApiRequest::GetBalloonHintingStatus
    );
    assert!(matches!(
        err("PATCH", "/balloon/hinting/start", r#"{"ack":true}"#),
        RequestError::Json(_)
    ));
    assert!(matches!(
        err("PATCH", "/balloon/hinting", ""),
        RequestError::UnrecognizedPath { .. }
    ));
    assert!(matches!(
        err(
            "PUT",
            "/balloon",
            r#"{"amount_mib":16777216,"deflate_on_oom":false}"#
        ),
        RequestError::Invalid(ValidationError::BalloonTooLarge(_))
    ));
}

#[test]
fn mmds_routes() {
    assert_eq!(ok("GET", "/mmds", ""), ApiRequest::GetMmds);
    assert_eq!(
        ok("PUT", "/mmds", r#"{"latest":{"meta-data":{"id":"i-1"}}}"#),
        ApiRequest::PutMmds(serde_json::json!({"latest":{"meta-data":{"id":"i-1"}}}))
    );
    assert_eq!(
        ok("PATCH", "/mmds", r#"{"a":null}"#),
        ApiRequest::PatchMmds(serde_json::json!({"a": null}))
    );
    assert!(matches!(
        ok(
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces":["eth0"],"version":"V2"}"#
        ),
        ApiRequest::PutMmdsConfig(_)
    ));
    assert_eq!(
        message("PUT", "/mmds/other", "{}"),
        "Unrecognized PUT request path `other`."
    );
    assert!(matches!(
        err("PUT", "/mmds", "{not json"),
        RequestError::Json(_)
    ));
    assert!(message("PUT", "/mmds/config", r#"{"network_interfaces":[]}"#).contains("empty"));
    assert!(message(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces":["eth0"],"ipv4_address":"192.168.0.1"}"#
    )
    .contains("link local"));
}

#[test]
fn snapshot_routes_parse_their_bodies() {
    let create = ok(
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Full"}"#,
    );
    assert!(
        matches!(create, ApiRequest::CreateSnapshot(p) if p.snapshot_path.to_str() == Some("/s"))
    );
    let load = ok(
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"resume_vm":true}"#,
    );
    assert!(matches!(load, ApiRequest::LoadSnapshot(p) if p.resume_vm));
    assert_eq!(
        message("PUT", "/snapshot/load", r#"{"snapshot_path":"/s"}"#),
        "missing field: either `mem_backend` or `mem_file_path` is required"
    );
    assert_eq!(
        message("PUT", "/snapshot", "{}"),
        "Missing snapshot operation type."
    );
    assert_eq!(
        message("PUT", "/snapshot/other", "{}"),
        "Invalid request method and/or path: PUT /snapshot/other."
    );
    assert!(matches!(
        err("PUT", "/snapshot/create", r#"{"snapshot_path":"/s"}"#),
        RequestError::Json(_)
    ));
}
