//! Firecracker's API end to end: the real `kiln` binary serving its Unix socket, driven by a plain
//! HTTP/1.1 client, booting a tiny hand-made kernel (seconds, even on nested KVM).

use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use kiln_tests::{
    api_call as call, hello_elf, kvm_available, metrics_lines, scratch_dir, send_signal,
    spawn_kiln, tiny_elf, wait_for_socket, wait_with_deadline, write_file, TINY_LOAD_ADDR,
};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn configure_start_pause_resume_and_stop_through_the_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api");
    let kernel = write_file(&dir, "spin.elf", &tiny_elf(TINY_LOAD_ADDR, &[0xeb, 0xfe])); // jmp $
    let sock = dir.join("api.sock");
    let child = spawn_kiln(&["--api-sock", sock.to_str().unwrap(), "--id", "api_test"]);
    wait_for_socket(&sock, DEADLINE);
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );

    let (status, body) = call(&sock, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""state":"Not started""#), "{body}");
    assert!(body.contains(r#""id":"api_test""#), "{body}");

    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    assert_eq!(call(&sock, "PUT", "/boot-source", &boot).0, 204);
    let machine = r#"{"vcpu_count":2,"mem_size_mib":16}"#;
    assert_eq!(call(&sock, "PUT", "/machine-config", machine).0, 204);
    let (status, body) = call(&sock, "PUT", "/machine-config", r#"{"vcpu_count":2}"#);
    assert_eq!(status, 400);
    assert!(
        body.contains("fault_message") && body.contains("mem_size_mib"),
        "{body}"
    );
    let (status, body) = call(&sock, "PUT", "/drives/d1", r#"{"drive_id":"d2"}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(&sock, "GET", "/nowhere", "");
    assert_eq!(status, 400);
    assert!(
        body.contains("Invalid request method and/or path"),
        "{body}"
    );
    let (status, body) = call(&sock, "GET", "/vm/config", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""vcpu_count":2"#), "{body}");

    let disk_a = write_file(&dir, "a.img", &[0u8; 4096]);
    let disk_b = write_file(&dir, "b.img", &[0u8; 65536]);
    let drive = format!(
        r#"{{"drive_id":"drive1","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
        disk_a.display()
    );
    assert_eq!(call(&sock, "PUT", "/drives/drive1", &drive).0, 204);

    // The vsock device: refused bodies change nothing; the socket appears at start.
    let vsock_path = dir.join("v.sock");
    for (bad, expected) in [
        (r#"{"guest_cid":2,"uds_path":"/tmp/v.sock"}"#, "guest_cid 2"),
        (r#"{"guest_cid":3}"#, "uds_path"),
        (
            r#"{"guest_cid":3,"uds_path":"/v","cid":3}"#,
            "unknown field",
        ),
    ] {
        let (status, body) = call(&sock, "PUT", "/vsock", bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains(expected), "{bad}: {body}");
    }
    let vsock = format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, vsock_path.display());
    assert_eq!(call(&sock, "PUT", "/vsock", &vsock).0, 204);
    let (_, config) = call(&sock, "GET", "/vm/config", "");
    assert!(config.contains(r#""guest_cid":3"#), "{config}");
    assert!(!vsock_path.exists(), "bound only at InstanceStart");

    let start = r#"{"action_type":"InstanceStart"}"#;
    let (status, body) = call(&sock, "PUT", "/actions", start);
    assert_eq!(status, 204, "{body}");
    assert!(call(&sock, "GET", "/", "")
        .1
        .contains(r#""state":"Running""#));
    let (status, body) = call(&sock, "PUT", "/boot-source", &boot);
    assert_eq!(status, 400);
    assert!(body.contains("not supported after starting"), "{body}");
    assert!(vsock_path.exists(), "the vsock socket is bound at start");
    let (status, body) = call(&sock, "PUT", "/vsock", &vsock);
    assert_eq!(status, 400);
    assert!(body.contains("not supported after starting"), "{body}");
    assert_eq!(call(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#).0, 204);
    assert!(call(&sock, "GET", "/", "")
        .1
        .contains(r#""state":"Paused""#));
    assert_eq!(call(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#).0, 204);
    assert!(call(&sock, "GET", "/", "")
        .1
        .contains(r#""state":"Running""#));

    // Kata's hot-plug: a placeholder drive gets its real backing file after start.
    let patch = format!(
        r#"{{"drive_id":"drive1","path_on_host":"{}"}}"#,
        disk_b.display()
    );
    let (status, body) = call(&sock, "PATCH", "/drives/drive1", &patch);
    assert_eq!(status, 204, "{body}");
    let (_, config) = call(&sock, "GET", "/vm/config", "");
    assert!(config.contains("b.img"), "{config}");
    let missing = r#"{"drive_id":"drive1","path_on_host":"/nonexistent/c.img"}"#;
    let (status, body) = call(&sock, "PATCH", "/drives/drive1", missing);
    assert_eq!(status, 400);
    assert!(body.contains("Unable to patch the block device"), "{body}");
    let limits = r#"{"drive_id":"drive1","rate_limiter":{"ops":{"size":100,"refill_time":1000}}}"#;
    assert_eq!(call(&sock, "PATCH", "/drives/drive1", limits).0, 204);
    let unknown = r#"{"drive_id":"nodrive","path_on_host":"/x"}"#;
    assert_eq!(call(&sock, "PATCH", "/drives/nodrive", unknown).0, 400);
    let cad = r#"{"action_type":"SendCtrlAltDel"}"#;
    assert_eq!(call(&sock, "PUT", "/actions", cad).0, 204);
    // No PUT /metrics: nothing to flush to, which is not an error (Firecracker's 204).
    let flush = r#"{"action_type":"FlushMetrics"}"#;
    let (status, body) = call(&sock, "PUT", "/actions", flush);
    assert_eq!(status, 204, "{body}");

    send_signal(&child, "-TERM");
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");
    assert!(
        out.stderr.contains("kiln: api: PUT /actions -> 204"),
        "{}",
        out.stderr
    );
    assert!(!sock.exists(), "the socket is removed on exit");
    assert!(!vsock_path.exists(), "the vsock socket is removed on exit");
}

#[test]
fn config_file_boots_without_an_api() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-config");
    let kernel = write_file(&dir, "hello.elf", &hello_elf());
    let config = format!(
        r#"{{"boot-source":{{"kernel_image_path":"{}"}},
            "machine-config":{{"vcpu_count":1,"mem_size_mib":16}},
            "drives":[]}}"#,
        kernel.display()
    );
    let config_path = write_file(&dir, "vm.json", config.as_bytes());
    let child = spawn_kiln(&["--no-api", "--config-file", config_path.to_str().unwrap()]);
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");

    let bad = write_file(
        &dir,
        "bad.json",
        br#"{"boot-source":{"kernel_image_path":"/k"},"bogus":1}"#,
    );
    let out = wait_with_deadline(
        spawn_kiln(&["--no-api", "--config-file", bad.to_str().unwrap()]),
        DEADLINE,
    );
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("bogus"), "{out:?}");
}

#[test]
fn a_stop_signal_before_start_removes_the_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-preboot-signal");
    let sock = dir.join("api.sock");
    let child = spawn_kiln(&["--api-sock", sock.to_str().unwrap()]);
    wait_for_socket(&sock, DEADLINE);
    assert_eq!(call(&sock, "GET", "/", "").0, 200);
    send_signal(&child, "-TERM");
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");
    assert!(!sock.exists(), "the socket is removed on exit");
}

/// Reads a metrics file: one JSON object per line.
#[test]
fn logger_and_metrics_through_the_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-observability");
    let kernel = write_file(&dir, "spin.elf", &tiny_elf(TINY_LOAD_ADDR, &[0xeb, 0xfe])); // jmp $
    let sock = dir.join("api.sock");
    let log = dir.join("kiln.log");
    let metrics = dir.join("metrics.json");
    let child = spawn_kiln(&["--api-sock", sock.to_str().unwrap(), "--id", "obs_vm"]);
    wait_for_socket(&sock, DEADLINE);

    // Refused bodies change nothing.
    let (status, body) = call(&sock, "PUT", "/logger", r#"{"level":"Loud"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("unknown variant `Loud`"), "{body}");
    let (status, body) = call(&sock, "PUT", "/logger", r#"{"log_fifo":"/tmp/x"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("unknown field `log_fifo`"), "{body}");
    let link = dir.join("link.log");
    std::os::unix::fs::symlink(dir.join("elsewhere.log"), &link).unwrap();
    let body = format!(r#"{{"log_path":"{}"}}"#, link.display());
    let (status, body) = call(&sock, "PUT", "/logger", &body);
    assert_eq!(status, 400);
    assert!(body.contains("symbolic link"), "{body}");
    assert!(!dir.join("elsewhere.log").exists());
    let flush = r#"{"action_type":"FlushMetrics"}"#;
    let (status, body) = call(&sock, "PUT", "/actions", flush);
    assert_eq!(status, 400);
    assert!(body.contains("not supported before starting"), "{body}");

    // Warnings and worse only: the next request is not logged.
    let body = format!(
        r#"{{"log_path":"{}","level":"warning","show_level":true}}"#,
        log.display()
    );
    assert_eq!(call(&sock, "PUT", "/logger", &body).0, 204);
    assert_eq!(call(&sock, "GET", "/version", "").0, 200);
    // Back to Info, now with the origin too; the log path stays.
    let body = r#"{"level":"Info","show_log_origin":true}"#;
    assert_eq!(call(&sock, "PUT", "/logger", body).0, 204);
    assert_eq!(call(&sock, "GET", "/machine-config", "").0, 200);

    let body = format!(
        r#"{{"metrics_path":"{}","emit_id":true}}"#,
        metrics.display()
    );
    assert_eq!(call(&sock, "PUT", "/metrics", &body).0, 204);
    let (status, body) = call(&sock, "PUT", "/metrics", &body);
    assert_eq!(status, 400);
    assert!(
        body.contains("Reinitialization of metrics not allowed."),
        "{body}"
    );

    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    assert_eq!(call(&sock, "PUT", "/boot-source", &boot).0, 204);
    let machine = r#"{"vcpu_count":1,"mem_size_mib":16}"#;
    assert_eq!(call(&sock, "PUT", "/machine-config", machine).0, 204);
    let start = r#"{"action_type":"InstanceStart"}"#;
    assert_eq!(call(&sock, "PUT", "/actions", start).0, 204);

    // Pre-boot only, as in Firecracker.
    for (path, body) in [
        ("/logger", r#"{"level":"Debug"}"#.to_string()),
        (
            "/metrics",
            format!(r#"{{"metrics_path":"{}"}}"#, dir.join("m2").display()),
        ),
    ] {
        let (status, answer) = call(&sock, "PUT", path, &body);
        assert_eq!(status, 400, "{path}");
        assert!(answer.contains("not supported after starting"), "{answer}");
    }
    assert!(!dir.join("m2").exists());

    assert_eq!(call(&sock, "PUT", "/actions", flush).0, 204);
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["id"], "obs_vm");
    for group in [
        "utc_timestamp_ms",
        "api_server",
        "get_api_requests",
        "put_api_requests",
        "patch_api_requests",
        "latencies_us",
        "logger",
        "signals",
        "vcpu",
        "vmm",
    ] {
        assert!(line.get(group).is_some(), "{group} missing: {line}");
    }
    // The logger PUTs (3 refused, 2 taken, 1 after start) and one machine-config PUT.
    assert_eq!(line["put_api_requests"]["logger_count"], 6, "{line}");
    assert_eq!(line["put_api_requests"]["logger_fails"], 4, "{line}");
    assert_eq!(line["put_api_requests"]["machine_cfg_count"], 1, "{line}");
    assert!(
        line["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0
    );

    send_signal(&child, "-TERM");
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");

    // Before PUT /logger, stderr; after it, the file, at the level of the moment.
    assert!(
        out.stderr.contains("kiln: api: PUT /logger -> 400"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("/machine-config"), "{}", out.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("GET /version"), "{text}");
    assert!(
        text.contains("kiln: [INFO:api/src/http/server.rs:")
            && text.contains("] api: GET /machine-config -> 200 in "),
        "{text}"
    );
    assert!(text.contains("] stopped by signal 15"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // One more line at exit, with the signal that ended Kiln.
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["signals"]["sigterm"], 1, "{}", lines[1]);
    assert_eq!(
        lines[1]["put_api_requests"]["logger_count"], 0,
        "reset by the flush"
    );
}
