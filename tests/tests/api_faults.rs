//! Kiln under hostile clients and failing outputs, with its seccomp filters on: each error path
//! (the connection limit, request timeouts, garbage, oversized and vanishing clients, an
//! exhausted fd table, sinks that are full, closed or unread, signals before the start) ends in
//! an answer or a documented exit, never in SIGSYS from a call the filters lack.
//!
//! `KILN_SECCOMP_LOG=1` runs every Kiln here with the default filters in logging mode (each call
//! outside a list is allowed and written to the kernel log) and prints what they logged: the way
//! to find a missing call in one run rather than one SIGSYS at a time.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::bench::{percentile, raise_fd_limit};
use kiln_tests::seccomp_log::{self, seccomp_args};
use kiln_tests::{
    api_call, kiln_bin, scratch_dir, send_signal, wait_for_exit, wait_for_socket, wait_for_thread,
    wait_until, NetNs,
};

const DEADLINE: Duration = Duration::from_secs(60);
/// Kiln's connection limit (Firecracker has none; its clients see refusals only from the kernel).
const MAX_CONNECTIONS: usize = 256;
/// Kiln's per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A Kiln serving its API, with the filters on.
struct Kiln {
    child: Child,
    sock: PathBuf,
}

impl Kiln {
    /// `kiln --api-sock DIR/api.sock EXTRA...`; `nofile` lowers its fd limit, `stderr` is where
    /// its log goes.
    fn start(dir: &Path, extra: &[&str], nofile: Option<u64>, stderr: Stdio) -> Kiln {
        Self::launch(dir, extra, nofile, Stdio::null(), stderr, None)
    }

    /// [`Self::start`] with stdout (where the guest console goes by default) as given, and in
    /// network namespace `netns` if one is given.
    fn launch(
        dir: &Path,
        extra: &[&str],
        nofile: Option<u64>,
        stdout: Stdio,
        stderr: Stdio,
        netns: Option<&NetNs>,
    ) -> Kiln {
        let sock = dir.join("api.sock");
        let mut cmd = match netns {
            Some(ns) => ns.command(&[kiln_bin().to_str().expect("kiln path")]),
            None => Command::new(kiln_bin()),
        };
        cmd.arg("--api-sock").arg(&sock).args(extra);
        cmd.args(seccomp_args(dir));
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        kiln_tests::die_with_test(&mut cmd);
        if let Some(limit) = nofile {
            // SAFETY: runs in the forked child before exec; close_range and setrlimit are
            // async-signal-safe system calls and read only the local struct.
            unsafe {
                cmd.pre_exec(move || {
                    // The limit is for Kiln's own fds: none inherited from the test runner.
                    libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0);
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().expect("spawn kiln");
        wait_for_socket(&sock, DEADLINE);
        Kiln { child, sock }
    }

    /// Kiln is still running (not ended by SIGSYS or anything else).
    fn assert_alive(&mut self, when: &str) {
        let status = self.child.try_wait().expect("try_wait");
        assert!(
            status.is_none(),
            "{when}: Kiln ended with {status:?} (signal {:?}){}",
            status.and_then(|s| s.signal()),
            seccomp_log::audit_note(self.child.id())
        );
    }

    /// `GET /` answers 200.
    fn assert_serving(&mut self, when: &str) {
        self.assert_alive(when);
        let (status, body) = api_call(&self.sock, "GET", "/", "");
        assert_eq!(status, 200, "{when}: {body}");
    }

    /// SIGTERM, then the documented exit: 128+15, socket removed.
    fn stop(mut self) {
        self.assert_alive("before SIGTERM");
        send_signal(&self.child, "-TERM");
        let status = wait_for_exit(&mut self.child, DEADLINE);
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
        assert!(!self.sock.exists());
        seccomp_log::report(self.child.id());
    }
}

fn connect(sock: &Path) -> UnixStream {
    let stream = UnixStream::connect(sock).expect("connect");
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT + DEADLINE))
        .expect("timeout");
    stream
}

/// A client that has sent `partial` (part of a request) and waits, held by the caller; Kiln
/// has had a moment to read it.
fn half_sent(sock: &Path, partial: &[u8]) -> UnixStream {
    let mut stream = connect(sock);
    stream.write_all(partial).expect("send half a request");
    thread::sleep(Duration::from_millis(100));
    stream
}

/// Everything the server sends until it closes (or the read times out).
fn read_all(stream: &mut UnixStream) -> String {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn status_of(reply: &str) -> Option<u16> {
    reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
}

/// How each misbehaving client talks.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// Half a request head, then silence.
    Slow,
    /// Bytes that are not HTTP.
    Garbage,
    /// A head that never ends.
    OversizedHead,
    /// A body far over the payload limit.
    OversizedBody,
    /// Half a request, then its write side shut.
    HalfClosed,
    /// Half a request, then gone.
    Vanishing,
}

impl Client {
    const ALL: [Client; 6] = [
        Client::Slow,
        Client::Garbage,
        Client::OversizedHead,
        Client::OversizedBody,
        Client::HalfClosed,
        Client::Vanishing,
    ];

    /// Connects and misbehaves; returns the stream if an answer is to be read from it.
    fn run(&self, sock: &Path) -> Option<UnixStream> {
        let mut stream = connect(sock);
        // The server may answer and close before the client is done sending: ignore EPIPE.
        let mut send = |bytes: &[u8]| {
            let _ = stream.write_all(bytes);
        };
        match *self {
            Client::Slow => send(b"PUT /machine-config HTTP/1.1\r\nContent-Le"),
            Client::Garbage => send(b"\x00\xff\x16\x03\x01 not http at all\r\n\r\n"),
            Client::OversizedHead => {
                send(b"GET / HTTP/1.1\r\n");
                send(&b"X-Filler: yes\r\n".repeat(8 << 10));
            }
            Client::OversizedBody => {
                send(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n");
                send(&[b'{'; 1 << 20]);
            }
            Client::HalfClosed => {
                send(b"GET / HTTP/1.1\r\nHo");
                let _ = stream.shutdown(Shutdown::Write);
            }
            Client::Vanishing => {
                send(b"GET / HTTP/1.1\r\nHo");
                return None;
            }
        }
        Some(stream)
    }

    /// Whether `reply` is the refusal this client should get.
    fn refused_rightly(&self, reply: &str) -> bool {
        let status = status_of(reply);
        match *self {
            Client::Slow => status == Some(408),
            Client::Vanishing => true,
            _ => status.is_some_and(|s| (400..500).contains(&s)),
        }
    }
}

/// The two half requests of the flood that once killed Kiln (glibc's allocator, trimming the API
/// thread's heap when the flood left, made a call the API filter lacked).
const HALF_REQUESTS: [&[u8]; 2] = [
    b"GET / HTTP/1.1\r\nHo",
    b"PUT /machine-config HTTP/1.1\r\nContent-Le",
];

#[test]
fn a_flood_past_the_connection_limit_is_refused_and_kiln_serves_once_it_is_gone() {
    let dir = scratch_dir("faults-flood");
    let mut kiln = Kiln::start(&dir, &[], None, Stdio::null());
    // A few slow clients that stay for the whole test: their requests time out with 408.
    let started = Instant::now();
    let slow: Vec<UnixStream> = (0..8)
        .filter_map(|_| Client::Slow.run(&kiln.sock))
        .collect();

    // Floods of half requests, larger and smaller than the connection table, that leave all at
    // once: the ones past the limit get 503 at once; Kiln serves after each flood.
    for flood in [320, 100, 600, MAX_CONNECTIONS + 1] {
        let mut clients = Vec::new();
        for i in 0..flood {
            let Ok(mut stream) = UnixStream::connect(&kiln.sock) else {
                kiln.assert_alive(&format!("client {i} of a flood of {flood}"));
                panic!("Kiln runs but refuses client {i} of a flood of {flood}");
            };
            let _ = stream.write_all(HALF_REQUESTS[i % 2]);
            clients.push(stream);
        }
        thread::sleep(Duration::from_millis(200));
        kiln.assert_alive(&format!("a flood of {flood}"));
        let refused = &mut clients[MAX_CONNECTIONS.min(flood)..];
        for stream in refused.iter_mut() {
            let reply = read_all(stream);
            assert_eq!(status_of(&reply), Some(503), "{reply}");
            assert!(reply.contains("fault_message"), "{reply}");
        }
        drop(clients);
        thread::sleep(Duration::from_millis(200));
        kiln.assert_serving(&format!("after a flood of {flood}"));
    }

    // Every other kind of bad client, many times over and in parallel.
    let socket = kiln.sock.clone();
    let bad: Vec<_> = (0..4)
        .map(|_| {
            let sock = socket.clone();
            thread::spawn(move || {
                for _ in 0..8 {
                    // (The slow ones are the clients kept from the start.)
                    for client in &Client::ALL[1..] {
                        if let Some(mut stream) = client.run(&sock) {
                            let reply = read_all(&mut stream);
                            assert!(client.refused_rightly(&reply), "{client:?}: {reply:?}");
                        }
                    }
                }
            })
        })
        .collect();
    for worker in bad {
        worker.join().expect("a bad client saw a wrong answer");
    }
    kiln.assert_alive("after the bad clients");

    for mut stream in slow {
        let reply = read_all(&mut stream);
        assert_eq!(status_of(&reply), Some(408), "{reply}");
    }
    assert!(started.elapsed() >= REQUEST_TIMEOUT - Duration::from_secs(5));
    kiln.assert_serving("once the flood is gone");
    // A whole request over several writes is still served.
    let mut stream = connect(&kiln.sock);
    for part in [
        &b"GET / HT"[..],
        b"TP/1.1\r\nHost: x\r\nConne",
        b"ction: close\r\n\r\n",
    ] {
        stream.write_all(part).unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_of(&read_all(&mut stream)), Some(200));
    kiln.stop();
}

#[test]
fn accept_failing_for_want_of_fds_pauses_and_kiln_serves_again() {
    let dir = scratch_dir("faults-emfile");
    let log = dir.join("kiln.log");
    std::fs::write(&log, b"").unwrap();
    // Room for what Kiln opens itself (KVM, epoll, eventfds, the socket, the log) and a few
    // clients; the rest of the clients find the fd table full.
    let mut kiln = Kiln::start(
        &dir,
        &["--log-path", log.to_str().unwrap()],
        Some(40),
        Stdio::null(),
    );
    // Kiln itself holds fewer than 40 fds: the clients past that find the table full (they
    // wait in the socket's backlog, which is larger).
    let clients: Vec<UnixStream> = (0..100).map(|_| connect(&kiln.sock)).collect();
    wait_until(DEADLINE, "accept to fail", || {
        kiln.assert_alive("with the fd table full");
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("api: accept failed")
    });
    thread::sleep(Duration::from_millis(300));
    kiln.assert_alive("with the fd table full");
    drop(clients);
    // The backlog's dead connections are accepted and dropped, then a new client is served.
    let start = Instant::now();
    loop {
        let mut stream = connect(&kiln.sock);
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        let reply = read_all(&mut stream);
        if status_of(&reply) == Some(200) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "never served again: {reply:?}");
        kiln.assert_alive("while the table drains");
        thread::sleep(Duration::from_millis(100));
    }
    kiln.stop();
}

/// Enough API traffic, logged at Debug, to fill a pipe's buffer several times over, plus a
/// metrics flush (which writes the metrics sink).
fn busy_api(kiln: &mut Kiln, when: &str) {
    for i in 0..300 {
        let sock = kiln.sock.clone();
        let answer =
            std::panic::catch_unwind(move || api_call(&sock, "GET", "/machine-config", "").0);
        match answer {
            Ok(status) => assert_eq!(status, 200, "{when}: request {i}"),
            Err(_) => {
                kiln.assert_alive(&format!("{when}: request {i} failed"));
                panic!("{when}: request {i} failed with Kiln alive");
            }
        }
    }
    let (status, body) = api_call(
        &kiln.sock,
        "PUT",
        "/actions",
        r#"{"action_type":"FlushMetrics"}"#,
    );
    assert!(status == 204 || status == 400, "{when}: {status} {body}");
    kiln.assert_serving(when);
}

#[test]
fn full_unread_closed_and_removed_sinks_never_stop_kiln() {
    let dir = scratch_dir("faults-sinks");
    let debug = ["--level", "Debug"];

    // A full disk: every log line and metrics write fails with ENOSPC.
    let mut kiln = Kiln::start(
        &dir,
        &[
            &debug[..],
            &["--log-path", "/dev/full", "--metrics-path", "/dev/full"],
        ]
        .concat(),
        None,
        Stdio::null(),
    );
    busy_api(&mut kiln, "log and metrics on /dev/full");
    kiln.stop();

    // A FIFO with a reader that never reads: the pipe fills, lines are dropped, Kiln goes on.
    let fifo = dir.join("log.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO's read end");
    let mut kiln = Kiln::start(
        &dir,
        &[&debug[..], &["--log-path", fifo.to_str().unwrap()]].concat(),
        None,
        Stdio::null(),
    );
    busy_api(&mut kiln, "log to an unread FIFO");
    // The reader goes: writes now fail with EPIPE.
    drop(reader);
    busy_api(&mut kiln, "log to a FIFO whose reader is gone");
    kiln.stop();

    // stderr a pipe whose reader is gone (EPIPE on every line), metrics to a file that is then
    // removed.
    let metrics = dir.join("metrics.json");
    let mut kiln = Kiln::start(
        &dir,
        &[&debug[..], &["--metrics-path", metrics.to_str().unwrap()]].concat(),
        None,
        Stdio::piped(),
    );
    drop(kiln.child.stderr.take());
    busy_api(&mut kiln, "stderr closed");
    std::fs::remove_file(&metrics).unwrap();
    busy_api(&mut kiln, "metrics file removed");
    kiln.stop();
}

/// Bytes the flooding guest writes to its console: more than a pipe holds.
const FLOOD_BYTES: u32 = 100_000;

/// A tiny kernel that writes [`FLOOD_BYTES`] bytes to the serial port, then resets.
fn flooding_elf() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.push(0xb9); // mov ecx, FLOOD_BYTES
    code.extend_from_slice(&FLOOD_BYTES.to_le_bytes());
    code.extend_from_slice(&[0xb0, b'x']); // mov al, 'x'
    code.extend_from_slice(&[0xee, 0xe2, 0xfd]); // out dx, al; loop back to the out
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]); // reset; hlt loop
    kiln_tests::tiny_elf(kiln_tests::TINY_LOAD_ADDR, &code)
}

#[test]
fn a_flooding_guest_outlives_full_unread_closed_and_removed_consoles() {
    if !kiln_tests::kvm_available() {
        return;
    }
    let dir = scratch_dir("faults-console");
    let kernel = kiln_tests::write_file(&dir, "flood.elf", &flooding_elf());
    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    // Each console fails its own way while the guest writes; the guest finishes its output and
    // resets, and Kiln exits 0: a console never stalls a vCPU or ends Kiln.
    let fifo = dir.join("console.fifo");
    let run = |what: &str, serial: Option<&Path>, stdout: Stdio, during: &dyn Fn(&mut Kiln)| {
        let log = dir.join("kiln.log");
        let mut kiln = Kiln::launch(
            &dir,
            &[],
            None,
            stdout,
            std::fs::File::create(&log).unwrap().into(),
            None,
        );
        expect(&mut kiln, "PUT", "/boot-source", &boot, 204);
        expect(
            &mut kiln,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":16}"#,
            204,
        );
        if let Some(path) = serial {
            let body = format!(r#"{{"serial_out_path":"{}"}}"#, path.display());
            expect(&mut kiln, "PUT", "/serial", &body, 204);
        }
        expect(
            &mut kiln,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
            204,
        );
        during(&mut kiln);
        let status = wait_for_exit(&mut kiln.child, DEADLINE);
        assert_eq!(
            status.code(),
            Some(0),
            "{what}: {status:?}; log:\n{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            seccomp_log::audit_note(kiln.child.id())
        );
        seccomp_log::report(kiln.child.id());
    };
    let nothing = |_: &mut Kiln| {};

    run(
        "console on /dev/full",
        Some(Path::new("/dev/full")),
        Stdio::null(),
        &nothing,
    );

    // A FIFO nobody opened for reading: Kiln holds its read end; the pipe fills.
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    run(
        "console into an unopened FIFO",
        Some(&fifo),
        Stdio::null(),
        &nothing,
    );

    // A reader that never reads, then one that goes away mid-flood (EPIPE).
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO's read end");
    run(
        "console into an unread FIFO",
        Some(&fifo),
        Stdio::null(),
        &nothing,
    );
    let reader = std::cell::RefCell::new(Some(reader));
    run(
        "console into a FIFO whose reader leaves",
        Some(&fifo),
        Stdio::null(),
        &|_| {
            thread::sleep(Duration::from_millis(200));
            drop(reader.borrow_mut().take());
        },
    );

    // The default console, stdout, a pipe whose reader is gone (EPIPE on every write).
    run(
        "console on a closed stdout pipe",
        None,
        Stdio::piped(),
        &|kiln| {
            drop(kiln.child.stdout.take());
        },
    );

    // Firecracker's serial rate limiter: a bucket of 1000 bytes that refills over an hour lets
    // the first 1000 through; the uart metrics count the rest as dropped.
    let limited = dir.join("limited.txt");
    let metrics = dir.join("metrics.json");
    let mut kiln = Kiln::start(&dir, &[], None, Stdio::null());
    expect(&mut kiln, "PUT", "/boot-source", &boot, 204);
    expect(
        &mut kiln,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":16}"#,
        204,
    );
    let serial = format!(
        r#"{{"serial_out_path":"{}","rate_limiter":{{"size":1000,"refill_time":3600000}}}}"#,
        limited.display()
    );
    expect(&mut kiln, "PUT", "/serial", &serial, 204);
    let metrics_body = format!(r#"{{"metrics_path":"{}"}}"#, metrics.display());
    expect(&mut kiln, "PUT", "/metrics", &metrics_body, 204);
    expect(
        &mut kiln,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
        204,
    );
    let status = wait_for_exit(&mut kiln.child, DEADLINE);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(std::fs::read(&limited).unwrap(), vec![b'x'; 1000]);
    let uart_total = |field: &str| -> u64 {
        kiln_tests::metrics_lines(&metrics)
            .iter()
            .filter_map(|line| line["uart"][field].as_u64())
            .sum()
    };
    assert_eq!(uart_total("write_count"), 1000);
    assert_eq!(
        uart_total("rate_limiter_dropped_bytes"),
        u64::from(FLOOD_BYTES) - 1000
    );

    // A console file removed while the guest writes to it.
    let file = dir.join("console.txt");
    run(
        "console into a removed file",
        Some(&file),
        Stdio::null(),
        &|_| {
            wait_until(DEADLINE, "the console file", || file.exists());
            std::fs::remove_file(&file).unwrap();
        },
    );
}

#[test]
fn signals_before_the_start_report_or_stop_with_their_status() {
    let dir = scratch_dir("faults-signals");
    // SIGUSR1 reports and goes on; each stop signal ends Kiln with 128+N, its socket removed,
    // also in the middle of a request that has sent only its head.
    for (signal, number) in [
        ("-INT", libc::SIGINT),
        ("-HUP", libc::SIGHUP),
        ("-TERM", libc::SIGTERM),
    ] {
        let mut kiln = Kiln::start(&dir, &[], None, Stdio::null());
        for _ in 0..3 {
            send_signal(&kiln.child, "-USR1");
            kiln.assert_serving("after SIGUSR1");
        }
        let _pending = half_sent(
            &kiln.sock,
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"vcpu",
        );
        send_signal(&kiln.child, signal);
        let status = wait_for_exit(&mut kiln.child, DEADLINE);
        assert_eq!(status.code(), Some(128 + number), "{signal}: {status:?}");
        assert!(!kiln.sock.exists(), "{signal}");
        seccomp_log::report(kiln.child.id());
    }
}

/// A tiny kernel that parks its vCPU: `hlt` with interrupts off, for good.
fn parked_elf() -> Vec<u8> {
    kiln_tests::tiny_elf(kiln_tests::TINY_LOAD_ADDR, &[0xfa, 0xf4, 0xeb, 0xfd]) // cli; hlt; jmp
}

fn expect(kiln: &mut Kiln, method: &str, path: &str, body: &str, status: u16) {
    let (got, answer) = api_call(&kiln.sock, method, path, body);
    assert_eq!(got, status, "{method} {path} {body}: {answer}");
    kiln.assert_alive(&format!("after {method} {path}"));
}

#[test]
fn a_running_vm_survives_signals_vanishing_vsock_peers_and_a_removed_socket() {
    if !kiln_tests::kvm_available() {
        return;
    }
    let dir = scratch_dir("faults-running");
    let kernel = kiln_tests::write_file(&dir, "parked.elf", &parked_elf());
    let disk = kiln_tests::write_file(&dir, "disk.img", &[0u8; 64 << 10]);
    let other = kiln_tests::write_file(&dir, "other.img", &[0u8; 64 << 10]);
    let vsock = dir.join("v.sock");
    let mut kiln = Kiln::start(&dir, &[], None, Stdio::null());
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0"}}"#,
        kernel.display()
    );
    expect(&mut kiln, "PUT", "/boot-source", &boot, 204);
    expect(
        &mut kiln,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":16}"#,
        204,
    );
    let drive = format!(
        r#"{{"drive_id":"d1","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
        disk.display()
    );
    expect(&mut kiln, "PUT", "/drives/d1", &drive, 204);
    let vsock_body = format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, vsock.display());
    expect(&mut kiln, "PUT", "/vsock", &vsock_body, 204);
    // SIGUSR1 before the start: a report, nothing more.
    send_signal(&kiln.child, "-USR1");
    expect(
        &mut kiln,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
        204,
    );
    send_signal(&kiln.child, "-USR1");
    kiln.assert_serving("running, after SIGUSR1");

    // Paused: a report, a drive swapped, a metrics flush; then resumed.
    expect(&mut kiln, "PATCH", "/vm", r#"{"state":"Paused"}"#, 204);
    send_signal(&kiln.child, "-USR1");
    let swap = format!(
        r#"{{"drive_id":"d1","path_on_host":"{}"}}"#,
        other.display()
    );
    expect(&mut kiln, "PATCH", "/drives/d1", &swap, 204);
    let missing = r#"{"drive_id":"d1","path_on_host":"/nonexistent/disk.img"}"#;
    expect(&mut kiln, "PATCH", "/drives/d1", missing, 400);
    expect(&mut kiln, "PATCH", "/vm", r#"{"state":"Resumed"}"#, 204);

    // vsock host peers that ask for a port nobody listens on, send garbage, stall half way,
    // flood, or vanish; many at once.
    let peers: Vec<UnixStream> = (0..64)
        .filter_map(|i| {
            let mut peer = UnixStream::connect(&vsock).ok()?;
            let _ = match i % 4 {
                0 => peer.write_all(b"CONNECT 1234\n"),
                1 => peer.write_all(b"\xff\x00garbage without a newline"),
                2 => peer.write_all(b"CONN"),
                _ => peer.write_all(&[b'A'; 1 << 16]),
            };
            (i % 8 != 7).then_some(peer)
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    kiln.assert_serving("with vsock peers");
    drop(peers);
    thread::sleep(Duration::from_millis(300));
    kiln.assert_serving("after the vsock peers left");

    // The vsock socket file removed: new peers cannot connect, Kiln runs on.
    std::fs::remove_file(&vsock).unwrap();
    assert!(UnixStream::connect(&vsock).is_err());
    kiln.assert_serving("with the vsock socket removed");

    // A stop signal in the middle of a request: 128+15, sockets removed.
    let _pending = half_sent(
        &kiln.sock,
        b"PATCH /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"st",
    );
    kiln.stop();
    // The drive files are as they were: nothing wrote them.
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0u8; 64 << 10]);
}

/// The API calls that configure a parked guest of `mem_mib` with two vCPUs and a drive.
fn configure_parked(kiln: &mut Kiln, kernel: &Path, disk: &Path, mem_mib: u32) {
    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    expect(kiln, "PUT", "/boot-source", &boot, 204);
    let machine = format!(r#"{{"vcpu_count":2,"mem_size_mib":{mem_mib}}}"#);
    expect(kiln, "PUT", "/machine-config", &machine, 204);
    let drive = format!(
        r#"{{"drive_id":"d1","path_on_host":"{}","is_root_device":false}}"#,
        disk.display()
    );
    expect(kiln, "PUT", "/drives/d1", &drive, 204);
}

/// Signals sent to a process round-robin, as fast as `kill` allows, from a thread; ended by
/// [`SignalStorm::end`] or by being dropped (a failing test must not leave it signalling a pid
/// that another process may get next).
struct SignalStorm {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<usize>>,
}

impl SignalStorm {
    fn start(pid: u32, signals: &'static [libc::c_int]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = Some(signal_storm(pid, signals, stop.clone()));
        SignalStorm { stop, thread }
    }

    /// Stops the storm; returns how many signals it sent.
    fn end(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().expect("storm"))
    }
}

impl Drop for SignalStorm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn signal_storm(
    pid: u32,
    signals: &'static [libc::c_int],
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            let signal = signals[sent % signals.len()];
            // SAFETY: kill with a pid this test spawned and a valid signal number.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
            sent += 1;
            // Room for the process to run between signals.
            thread::sleep(Duration::from_micros(50));
        }
        // Never leave Kiln stopped.
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        sent
    })
}

const INSTANCE_START: &[u8] =
    b"PUT /actions HTTP/1.1\r\nConnection: close\r\nContent-Length: 31\r\n\r\n\
      {\"action_type\":\"InstanceStart\"}";

#[test]
fn signals_during_the_build_neither_break_it_nor_get_lost() {
    if !kiln_tests::kvm_available() {
        return;
    }
    let dir = scratch_dir("faults-build-signals");
    let kernel = kiln_tests::write_file(&dir, "parked.elf", &parked_elf());
    let disk = kiln_tests::write_file(&dir, "disk.img", &[0u8; 64 << 10]);

    // Signals that report or that Kiln leaves at their default (ignore, stop, continue) land on
    // every thread while InstanceStart builds the VM (its handlers run on whichever thread the
    // kernel picks, vCPU threads with their filters included): the start succeeds and the VM runs.
    for round in 0..3 {
        let log = dir.join(format!("storm-{round}.log"));
        let mut kiln = Kiln::start(&dir, &[], None, std::fs::File::create(&log).unwrap().into());
        configure_parked(&mut kiln, &kernel, &disk, 1024);
        const HARMLESS: &[libc::c_int] = &[
            libc::SIGUSR1,
            libc::SIGWINCH,
            libc::SIGCHLD,
            libc::SIGURG,
            libc::SIGPIPE,
            libc::SIGSTOP,
            libc::SIGCONT,
            libc::SIGUSR1,
            libc::SIGWINCH,
            libc::SIGCHLD,
            libc::SIGURG,
        ];
        let began = Instant::now();
        let storm = SignalStorm::start(kiln.child.id(), HARMLESS);
        let mut start = connect(&kiln.sock);
        start.write_all(INSTANCE_START).expect("send InstanceStart");
        let reply = read_all(&mut start);
        if status_of(&reply) != Some(204) {
            drop(storm);
            let status = kiln.child.try_wait();
            panic!(
                "round {round}: InstanceStart answered {reply:?}; Kiln {status:?}, log:\n{}{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                seccomp_log::audit_note(kiln.child.id())
            );
        }
        wait_for_thread(kiln.child.id(), "kiln_vcpu 1", DEADLINE);
        // And on the running vCPUs a while.
        thread::sleep(Duration::from_millis(500));
        let sent = storm.end();
        eprintln!(
            "round {round}: started and running under {sent} signals in {:?}",
            began.elapsed()
        );
        kiln.assert_serving(&format!("round {round}, after {sent} signals"));
        let (status, info) = api_call(&kiln.sock, "GET", "/", "");
        assert_eq!(status, 200);
        assert!(info.contains(r#""state":"Running""#), "{info}");
        kiln.stop();
    }

    // A stop signal sent as InstanceStart goes out, before, during or after the build: Kiln
    // ends with 128+N and removes its socket, whatever the phase it landed in.
    for (delay_us, (signal, number)) in [0u64, 300, 1000, 3000, 10_000].into_iter().zip(
        [
            ("-TERM", libc::SIGTERM),
            ("-INT", libc::SIGINT),
            ("-HUP", libc::SIGHUP),
        ]
        .into_iter()
        .cycle(),
    ) {
        let mut kiln = Kiln::start(&dir, &[], None, Stdio::null());
        configure_parked(&mut kiln, &kernel, &disk, 1024);
        let mut start = connect(&kiln.sock);
        start.write_all(INSTANCE_START).expect("send InstanceStart");
        thread::sleep(Duration::from_micros(delay_us));
        send_signal(&kiln.child, signal);
        let status = wait_for_exit(&mut kiln.child, DEADLINE);
        assert_eq!(
            status.code(),
            Some(128 + number),
            "{signal} {delay_us} us into the start: {status:?}{}",
            seccomp_log::audit_note(kiln.child.id())
        );
        assert!(!kiln.sock.exists(), "{signal} {delay_us} us: socket left");
        // The start's answer, if it came before the end, was a success.
        let reply = read_all(&mut start);
        assert!(
            reply.is_empty() || status_of(&reply) == Some(204),
            "{signal} {delay_us} us: {reply}"
        );
        eprintln!(
            "{signal} {delay_us} us into the start: {status:?}, answer {:?}",
            status_of(&reply)
        );
        seccomp_log::report(kiln.child.id());
    }
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0u8; 64 << 10]);
}

/// The names in `dir`, sorted.
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The fds of this test process that refer to something under `dir` (the other tests of this
/// binary, running beside, open and close fds of their own all the time).
fn fds_into(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect()
}

/// The processes whose command line names something under `dir`.
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}

#[test]
fn a_hundred_vms_started_and_stopped_leave_nothing_behind() {
    if !kiln_tests::kvm_available() {
        return;
    }
    let dir = scratch_dir("faults-cycles");
    let hello = kiln_tests::write_file(&dir, "hello.elf", &kiln_tests::hello_elf());
    let parked = kiln_tests::write_file(&dir, "parked.elf", &parked_elf());
    let disk = kiln_tests::write_file(&dir, "disk.img", &[0u8; 64 << 10]);
    // Every VM has a TAP (the same one, in a namespace of the test's own), a read-write drive
    // (locked while in use: a lock left behind fails the next start) and vsock (its socket
    // removed at exit).
    const TAP: &str = "kilncyc0";
    let ns = NetNs::create(&format!("kiln-cycles-{}", std::process::id()));
    ns.run(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
    let tap_state = || {
        let out = ns
            .command(&["ip", "-o", "link", "show", TAP])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tap_before = tap_state();
    assert!(tap_before.contains(TAP), "{tap_before}");
    // In logging mode each start writes its filter file here; it is the test's, not a leak.
    let _ = seccomp_args(&dir);
    let before = (dir_names(&dir), fds_into(&dir), processes_using(&dir));
    let started = Instant::now();
    const CYCLES: usize = 100;
    for cycle in 0..CYCLES {
        // Even cycles: the guest resets itself (exit 0). Odd ones: it parks and SIGTERM ends it.
        let kernel = if cycle % 2 == 0 { &hello } else { &parked };
        let mut kiln = Kiln::launch(&dir, &[], None, Stdio::null(), Stdio::null(), Some(&ns));
        let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
        expect(&mut kiln, "PUT", "/boot-source", &boot, 204);
        expect(
            &mut kiln,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":16}"#,
            204,
        );
        let drive = format!(
            r#"{{"drive_id":"d1","path_on_host":"{}","is_root_device":false}}"#,
            disk.display()
        );
        expect(&mut kiln, "PUT", "/drives/d1", &drive, 204);
        let net = format!(r#"{{"iface_id":"eth0","host_dev_name":"{TAP}"}}"#);
        expect(&mut kiln, "PUT", "/network-interfaces/eth0", &net, 204);
        let vsock = format!(
            r#"{{"guest_cid":3,"uds_path":"{}"}}"#,
            dir.join("v.sock").display()
        );
        expect(&mut kiln, "PUT", "/vsock", &vsock, 204);
        let (status, body) = api_call(
            &kiln.sock,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        assert_eq!(status, 204, "cycle {cycle}: {body}");
        if cycle % 2 == 0 {
            let status = wait_for_exit(&mut kiln.child, DEADLINE);
            assert_eq!(status.code(), Some(0), "cycle {cycle}: {status:?}");
            assert!(!kiln.sock.exists(), "cycle {cycle}: socket left");
        } else {
            kiln.stop();
        }
        assert_eq!(
            (dir_names(&dir), fds_into(&dir), processes_using(&dir)),
            before,
            "cycle {cycle} left files or fds"
        );
        assert_eq!(tap_state(), tap_before, "cycle {cycle} changed the TAP");
    }
    drop(ns);
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{CYCLES} VM start/stop cycles in {elapsed:.1} s ({:.0} per minute)",
        CYCLES as f64 * 60.0 / elapsed
    );
}

#[test]
fn a_thousand_clients_and_a_minute_of_requests_are_served() {
    const LOAD: Duration = Duration::from_secs(60);
    const STREAMS: usize = 4;
    let dir = scratch_dir("faults-load");
    // Room for the clients (the other tests of this binary hold up to about 900 fds at once).
    let clients = (raise_fd_limit().saturating_sub(1000) as usize).min(1000);
    assert!(
        clients >= MAX_CONNECTIONS * 2,
        "fd limit too low for the load"
    );
    let mut kiln = Kiln::start(&dir, &[], None, Stdio::null());
    let started = Instant::now();
    // Sustained streams: one request per connection, back to back, timed.
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let sock = kiln.sock.clone();
            thread::spawn(move || {
                let mut served = Vec::new();
                let mut refused = 0usize;
                while started.elapsed() < LOAD {
                    let sent = Instant::now();
                    let mut stream = connect(&sock);
                    let _ = stream.write_all(
                        b"GET /machine-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    );
                    // A client turned away gets its 503, then an end of file, or a reset when
                    // its request arrived after Kiln had closed: read_all stops at either.
                    let reply = read_all(&mut stream);
                    match status_of(&reply) {
                        Some(200) => served.push(sent.elapsed()),
                        Some(503) => refused += 1,
                        _ => panic!("{reply:?}"),
                    }
                }
                (served, refused)
            })
        })
        .collect();
    // Waves of `clients` concurrent keep-alive clients, each with a whole request, that stay a
    // moment after their answer and go.
    let mut waves = 0;
    let (mut ok, mut busy) = (0usize, 0usize);
    while started.elapsed() < LOAD {
        let mut wave = Vec::with_capacity(clients);
        for i in 0..clients {
            let Ok(mut stream) = UnixStream::connect(&kiln.sock) else {
                kiln.assert_alive(&format!("client {i} of wave {waves}"));
                panic!("Kiln refused client {i} of wave {waves}");
            };
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            wave.push(stream);
        }
        for stream in &mut wave {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut head = [0u8; 12];
            let status = stream
                .read_exact(&mut head)
                .ok()
                .and_then(|()| status_of(&String::from_utf8_lossy(&head)));
            match status {
                Some(200) => ok += 1,
                Some(503) => busy += 1,
                other => panic!("wave {waves}: {other:?}"),
            }
        }
        thread::sleep(Duration::from_secs(2));
        drop(wave);
        waves += 1;
        kiln.assert_alive(&format!("after wave {waves}"));
    }
    let mut latencies = Vec::new();
    let mut refused = 0;
    for stream in streams {
        let (served, turned_away) = stream.join().expect("a stream saw a wrong answer");
        assert!(!served.is_empty(), "a stream was never served");
        latencies.extend(served);
        refused += turned_away;
    }
    latencies.sort();
    eprintln!(
        "load: {waves} waves of {clients} clients ({ok} answered, {busy} refused with 503); \
         {STREAMS} streams: {} served, {refused} refused, p50 {:?}, p99 {:?}",
        latencies.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 99)
    );
    assert!(
        ok >= waves * MAX_CONNECTIONS / 2,
        "too few of the waves' clients served"
    );
    kiln.assert_serving("after the load");
    kiln.stop();
}
