//! Firecracker's API end to end: the real `kiln` binary serving its Unix socket, driven by a plain
//! HTTP/1.1 client, booting a tiny hand-made kernel (seconds, even on nested KVM).

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::{kvm_available, scratch_dir, spawn_kiln, tiny_elf, wait_with_deadline};

const LOAD_ADDR: u64 = 0x10_0000;
const DEADLINE: Duration = Duration::from_secs(60);

/// One request on a fresh connection; returns the status and the body.
fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(sock).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < DEADLINE,
            "{} never appeared",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn configure_start_pause_resume_and_stop_through_the_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api");
    let kernel = write(&dir, "spin.elf", &tiny_elf(LOAD_ADDR, &[0xeb, 0xfe])); // jmp $
    let sock = dir.join("api.sock");
    let child = spawn_kiln(&["--api-sock", sock.to_str().unwrap(), "--id", "api_test"]);
    wait_for_socket(&sock);
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

    let disk_a = write(&dir, "a.img", &[0u8; 4096]);
    let disk_b = write(&dir, "b.img", &[0u8; 65536]);
    let drive = format!(
        r#"{{"drive_id":"drive1","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
        disk_a.display()
    );
    assert_eq!(call(&sock, "PUT", "/drives/drive1", &drive).0, 204);

    let start = r#"{"action_type":"InstanceStart"}"#;
    let (status, body) = call(&sock, "PUT", "/actions", start);
    assert_eq!(status, 204, "{body}");
    assert!(call(&sock, "GET", "/", "")
        .1
        .contains(r#""state":"Running""#));
    let (status, body) = call(&sock, "PUT", "/boot-source", &boot);
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

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");
    assert!(
        out.stderr.contains("kiln: api: PUT /actions -> 204"),
        "{}",
        out.stderr
    );
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn config_file_boots_without_an_api() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-config");
    // Writes "KILN-TINY-OK\n" to COM1, then resets through the i8042.
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in b"KILN-TINY-OK\n" {
        code.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    let kernel = write(&dir, "hello.elf", &tiny_elf(LOAD_ADDR, &code));
    let config = format!(
        r#"{{"boot-source":{{"kernel_image_path":"{}"}},
            "machine-config":{{"vcpu_count":1,"mem_size_mib":16}},
            "drives":[]}}"#,
        kernel.display()
    );
    let config_path = write(&dir, "vm.json", config.as_bytes());
    let child = spawn_kiln(&["--no-api", "--config-file", config_path.to_str().unwrap()]);
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");

    let bad = write(
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
    wait_for_socket(&sock);
    assert_eq!(call(&sock, "GET", "/", "").0, 200);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");
    assert!(!sock.exists(), "the socket is removed on exit");
}
