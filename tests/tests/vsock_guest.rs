//! End to end: virtio-vsock with Firecracker's hybrid Unix-socket protocol, in one boot of the
//! default guest (ext4 root on a read-only drive) with `--vsock`.
//!
//! The guest runs `kiln-vsock` (guest-images/tools/kiln-vsock.c), delivered on a raw drive:
//! - as a server on vsock port 5000, which the test reaches through `CONNECT 5000`;
//! - as a client of host port 6000, which the test serves on the Unix socket `<uds>_6000`.
//!
//! Streams carry `ECHO`, `SINK` and `SOURCE` commands with payloads from a seeded pattern and
//! are checked byte for byte or by FNV-1a checksums (tests/src/vsock_proto.rs). Covered: a few
//! MiB each way in both directions, 64 concurrent connections each way, a host peer and a guest
//! peer that vanish mid-stream, bad CONNECT lines and a port nobody listens on, with every later
//! stream still working. The guest waits at a barrier (host port 6001, served only once the
//! host side is done) before it reboots.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::vsock_proto::{connect_guest, fnv64, fnv_hex, pattern, read_line, Fnv64};
use kiln_tests::{
    kiln_bin, kvm_available, scratch_dir, spawn_piped, wait_with_deadline, write_script_drive,
    write_tool_drive,
};

const TOOL: &str = "kiln-vsock";
const GUEST_CID: u32 = 3;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const BARRIER_PORT: u32 = 6001;
/// Bytes in each direction for the single-stream checks.
const STREAM_LEN: usize = 4 << 20;
const CONNS: usize = 64;
const ECHO_LEN: usize = 32 << 10;
const BOOT_DEADLINE: Duration = Duration::from_secs(900);

fn guest_script(tool_len: usize) -> String {
    format!(
        r#"
if ! head -c {tool_len} /dev/vdc >/tmp/kv || ! chmod +x /tmp/kv; then
    echo "KILN-T setup failed"
    exit 1
fi
/tmp/kv serve {GUEST_PORT} &
/tmp/kv send 2 {HOST_PORT} {STREAM_LEN} 7
/tmp/kv fetch 2 {HOST_PORT} {STREAM_LEN} 9
/tmp/kv echo-many 2 {HOST_PORT} {CONNS} {ECHO_LEN}
/tmp/kv abort 2 {HOST_PORT} 1048576
/tmp/kv send 2 {HOST_PORT} 65536 11
if /tmp/kv send 2 4242 16 1 >/dev/null 2>&1; then echo "KILN-T unlistened accepted"; else echo "KILN-T unlistened refused"; fi
i=0
until /tmp/kv fetch 2 {BARRIER_PORT} 1 0 >/dev/null 2>&1; do
    i=$((i+1))
    [ $i -gt 600 ] && break
    sleep 1
done
echo "KILN-T barrier $i"
"#
    )
}

/// What the host-side server saw, per command.
#[derive(Default, Debug)]
struct ServerLog {
    lines: Vec<String>,
}

/// Serves the test protocol (ECHO / SINK / SOURCE) on `listener`, one thread per connection.
fn serve(listener: UnixListener, log: Arc<Mutex<ServerLog>>) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = log.clone();
            thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(300))).ok();
                let Ok(command) = read_line(&mut stream) else {
                    return;
                };
                let result = serve_one(&mut stream, &command);
                log.lock()
                    .unwrap()
                    .lines
                    .push(format!("{command} -> {result}"));
            });
        }
    });
}

fn serve_one(stream: &mut UnixStream, command: &str) -> String {
    let mut words = command.split_whitespace();
    match words.next() {
        Some("ECHO") => {
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0usize;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return format!("write error after {total}");
                        }
                        total += n;
                    }
                    Err(e) => return format!("read error after {total}: {e}"),
                }
            }
            let _ = stream.shutdown(Shutdown::Write);
            format!("echoed {total}")
        }
        Some("SINK") => {
            let mut fnv = Fnv64::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0usize;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        fnv.update(&buf[..n]);
                        total += n;
                    }
                    Err(e) => return format!("read error after {total}: {e}"),
                }
            }
            let reply = format!("{total} {}\n", fnv_hex(fnv.finish()));
            match stream.write_all(reply.as_bytes()) {
                Ok(()) => format!("sank {total}"),
                Err(_) => format!("sank {total}, reply lost"),
            }
        }
        Some("SOURCE") => {
            let n: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let seed: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            match stream.write_all(&pattern(seed, n)) {
                Ok(()) => format!("sourced {n}"),
                Err(e) => format!("source error: {e}"),
            }
        }
        _ => "bad command".to_string(),
    }
}

/// Everything the host does towards the guest's server; panics on the first mismatch.
fn drive_guest_server(uds: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = Vec::new();

    // Host → guest: a few MiB into the guest, checked there.
    let mut s = connect_guest(uds, GUEST_PORT, deadline);
    let data = pattern(1, STREAM_LEN);
    s.write_all(b"SINK\n").unwrap();
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut s).unwrap();
    assert_eq!(
        reply,
        format!("{STREAM_LEN} {}", fnv_hex(fnv64(&data))),
        "guest's checksum of what the host sent"
    );
    seen.push(format!("sink {reply}"));

    // Guest → host on a host-initiated stream.
    let mut s = connect_guest(uds, GUEST_PORT, deadline);
    s.write_all(format!("SOURCE {STREAM_LEN} 2\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), STREAM_LEN);
    assert!(got == pattern(2, STREAM_LEN), "guest's stream differs");
    seen.push(format!("source {}", got.len()));

    // 64 connections open at once, each echoing its own pattern.
    let streams: Vec<UnixStream> = (0..CONNS)
        .map(|_| connect_guest(uds, GUEST_PORT, deadline))
        .collect();
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            thread::spawn(move || {
                let data = pattern(100 + i as u32, ECHO_LEN);
                let mut writer = s.try_clone().unwrap();
                let sender = {
                    let data = data.clone();
                    thread::spawn(move || {
                        writer.write_all(b"ECHO\n").unwrap();
                        writer.write_all(&data).unwrap();
                        writer.shutdown(Shutdown::Write).unwrap();
                    })
                };
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                sender.join().unwrap();
                assert!(
                    back == data,
                    "connection {i}: echo differs ({} bytes)",
                    back.len()
                );
            })
        })
        .collect();
    for w in workers {
        w.join().expect("an echo connection failed");
    }
    seen.push(format!("echo x{CONNS}"));

    // A host peer that vanishes mid-stream.
    let s = connect_guest(uds, GUEST_PORT, deadline);
    let mut w = s.try_clone().unwrap();
    w.write_all(b"ECHO\n").unwrap();
    w.write_all(&pattern(5, 64 << 10)).unwrap();
    let mut first = [0u8; 1024];
    (&s).read_exact(&mut first).unwrap();
    drop(w);
    drop(s);

    // Bad CONNECT lines and an unlistened port are refused; the device carries on.
    let mut bad = UnixStream::connect(uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(60))).ok();
    bad.write_all(b"CONNECT nope\n").unwrap();
    let line = read_line(&mut bad).unwrap();
    assert!(line.starts_with("ERROR"), "garbage CONNECT got {line:?}");
    let mut endless = UnixStream::connect(uds).unwrap();
    endless.set_read_timeout(Some(Duration::from_secs(60))).ok();
    endless.write_all(&[b'A'; 64]).unwrap();
    let mut rest = Vec::new();
    // Closed with our unread bytes still queued, the stream may report a reset instead of EOF.
    match endless.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "an endless line got {rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let mut nobody = UnixStream::connect(uds).unwrap();
    nobody.set_read_timeout(Some(Duration::from_secs(60))).ok();
    nobody.write_all(b"CONNECT 5001\n").unwrap();
    let line = read_line(&mut nobody).unwrap();
    assert!(line.is_empty(), "unlistened guest port answered {line:?}");
    seen.push("refusals ok".to_string());

    // Still working.
    let mut s = connect_guest(uds, GUEST_PORT, deadline);
    let data = pattern(3, 65536);
    s.write_all(b"SINK\n").unwrap();
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_line(&mut s).unwrap(),
        format!("65536 {}", fnv_hex(fnv64(&data)))
    );
    seen.push("after-abort ok".to_string());
    seen
}

/// The value of the console line `<prefix> <value>`.
fn marker<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().find_map(|line| {
        let at = line.find(prefix)?;
        Some(line[at + prefix.len()..].trim())
    })
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

#[test]
fn hybrid_vsock_streams_both_ways() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let tool = images.vmlinux.parent().unwrap().join(TOOL);
    let tool_bytes = std::fs::read(&tool).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (guest images older than tools/{TOOL}.c?)",
            tool.display()
        )
    });
    let dir = scratch_dir("vsock-guest");
    let tool_drive = dir.join("tool.img");
    write_tool_drive(&tool_drive, &tool_bytes).unwrap();
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script(tool_bytes.len()));

    let uds = dir.join("v.sock");
    let log = Arc::new(Mutex::new(ServerLog::default()));
    serve(
        UnixListener::bind(port_path(&uds, HOST_PORT)).unwrap(),
        log.clone(),
    );

    let kiln = kiln_bin();
    let mut cmd = std::process::Command::new(&kiln);
    cmd.args([
        "run",
        "--mem-mib",
        "256",
        "--drive",
        &format!("path={},root,ro,id=rootfs", images.rootfs.display()),
        "--drive",
        &format!("path={},ro", script.display()),
        "--drive",
        &format!("path={},ro", tool_drive.display()),
        "--vsock",
        &format!("cid={GUEST_CID},uds={}", uds.display()),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb",
    ]);
    let child = spawn_piped(cmd);

    let host = {
        let uds = uds.clone();
        let log = log.clone();
        thread::spawn(move || {
            let result = std::panic::catch_unwind(|| drive_guest_server(&uds));
            // Whatever happened, let the guest finish.
            serve(
                UnixListener::bind(port_path(&uds, BARRIER_PORT)).unwrap(),
                log,
            );
            result
        })
    };
    let out = wait_with_deadline(child, BOOT_DEADLINE);
    eprintln!(
        "kiln ran {:.1} s, exit {}; stderr:\n{}\nconsole:\n{}",
        out.elapsed.as_secs_f64(),
        out.code(),
        out.stderr,
        out.stdout
    );
    eprintln!("host server log: {:#?}", log.lock().unwrap());
    let host_seen = match host.join().expect("host thread") {
        Ok(seen) => seen,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    eprintln!("host side: {host_seen:?}");

    let console = &out.stdout;
    assert_eq!(out.code(), 0, "kiln exit status");
    let sent = pattern(7, STREAM_LEN);
    assert_eq!(
        marker(console, "KILN-VSOCK-SEND"),
        Some(format!("ok {STREAM_LEN} {}", fnv_hex(fnv64(&sent))).as_str()),
        "guest → host stream"
    );
    let fetched = pattern(9, STREAM_LEN);
    assert_eq!(
        marker(console, "KILN-VSOCK-FETCH"),
        Some(format!("ok {STREAM_LEN} {}", fnv_hex(fnv64(&fetched))).as_str()),
        "host → guest on a guest-initiated stream"
    );
    assert_eq!(
        marker(console, "KILN-VSOCK-ECHO-MANY"),
        Some(format!("ok {CONNS} {}", CONNS * ECHO_LEN).as_str())
    );
    assert_eq!(marker(console, "KILN-VSOCK-ABORT"), Some("done"));
    assert_eq!(marker(console, "KILN-T unlistened"), Some("refused"));
    assert!(
        console
            .lines()
            .filter(|l| l.contains("KILN-VSOCK-SEND ok"))
            .count()
            >= 2,
        "a guest stream after the aborted one"
    );
    let lines = log.lock().unwrap().lines.clone();
    let echoes = lines
        .iter()
        .filter(|l| l.starts_with("ECHO -> echoed"))
        .count();
    assert_eq!(
        echoes, CONNS,
        "host saw every guest echo stream: {lines:#?}"
    );
    assert!(
        marker(console, "KILN-T barrier").is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n <= 600)),
        "the guest passed the barrier"
    );
    assert!(!uds.exists(), "the vsock socket is removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}
