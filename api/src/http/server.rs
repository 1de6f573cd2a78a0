//! The API server: one epoll loop on the `kiln_api` thread.
//!
//! The loop accepts clients on the API socket, reads and writes them without blocking, and calls
//! the request handler for each complete request, one at a time on this thread (the VMM handles
//! requests one by one anyway). No client can stall it: reads and writes never block, every
//! connection has a deadline, buffers are bounded, and connections beyond the limit are turned
//! away with a 503 fault.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::{send_without_sigpipe, Connection};
use super::parser::DEFAULT_MAX_PAYLOAD_BYTES;
use super::{HttpError, HttpRequest, HttpResponse};

/// The name of the server thread.
pub const API_THREAD_NAME: &str = "kiln_api";

/// How long accepting pauses after `accept` fails for lack of resources (e.g. `EMFILE`).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const EVENTS_PER_WAIT: usize = 64;
const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;
const FIRST_CONNECTION_TOKEN: u64 = 2;

/// What the API layer calls for each complete request.
pub type RequestHandler = Arc<dyn Fn(HttpRequest) -> HttpResponse + Send + Sync>;

/// Limits of the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest accepted request body, in bytes (Firecracker's `--http-api-max-payload-size`).
    pub max_payload: usize,
    /// Most connections open at once; more are answered 503 and closed. 0 refuses every client.
    pub max_connections: usize,
    /// Time a client has to send a complete request, counted from when it connected or got its
    /// previous response; also the time it has to read a response, and the time an idle
    /// keep-alive connection is kept.
    pub request_timeout: Duration,
    /// After a fault response, how long the rest of the client's input is read and dropped before
    /// the connection is closed.
    pub linger_timeout: Duration,
    /// At the connection limit, a connection idle between requests (nothing received or owed)
    /// for at least this long is closed to make room for the new client, which would otherwise be
    /// turned away: idle connections cannot keep the API from the clients that use it.
    pub idle_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_payload: DEFAULT_MAX_PAYLOAD_BYTES,
            max_connections: 256,
            request_timeout: Duration::from_secs(30),
            linger_timeout: Duration::from_secs(2),
            idle_grace: Duration::from_secs(1),
        }
    }
}

/// The one log line per request, at info level: `kiln: api: GET /path -> 200 in 123 us` (the
/// logger adds `kiln: `). Faults found before a request was parsed are logged with `-` for method
/// and path.
pub fn log_request(method: &str, path: &str, status: u16, elapsed: Duration) {
    log::info!("{}", request_log_line(method, path, status, elapsed));
}

fn request_log_line(method: &str, path: &str, status: u16, elapsed: Duration) -> String {
    format!(
        "api: {method} {path} -> {status} in {} us",
        elapsed.as_micros()
    )
}

/// Starts serving `listener` on a new `kiln_api` thread; the thread ends when `stop` is written
/// to. The listener is made nonblocking. Errors are those of setting up epoll or the thread.
pub fn serve(
    listener: UnixListener,
    config: ServerConfig,
    handler: RequestHandler,
    stop: EventFd,
    spawn: ThreadSpawner,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    let mut event_loop = EventLoop {
        epoll,
        listener,
        _stop: stop,
        config,
        handler,
        connections: HashMap::new(),
        next_token: FIRST_CONNECTION_TOKEN,
        accept_paused_until: None,
    };
    spawn(API_THREAD_NAME, Box::new(move || event_loop.run()))
}

/// Starts a named thread that runs a body. The VMM passes one that confines the thread with its
/// seccomp filter before the body runs; the error is the caller's to phrase.
pub type ThreadSpawner =
    Box<dyn FnOnce(&str, Box<dyn FnOnce() + Send>) -> io::Result<JoinHandle<()>>>;

/// A [`ThreadSpawner`] that starts a plain thread.
pub fn plain_thread() -> ThreadSpawner {
    Box::new(|name, body| thread::Builder::new().name(name.to_owned()).spawn(body))
}

/// A running API server. Dropping it asks the thread to stop without waiting for it;
/// [`stop`](Self::stop) also waits.
pub struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `listener` on a new `kiln_api` thread (see [`serve`]).
    pub fn start(
        listener: UnixListener,
        config: ServerConfig,
        handler: RequestHandler,
    ) -> io::Result<ApiServer> {
        Self::start_with(listener, config, handler, plain_thread())
    }

    /// Like [`Self::start`], with the thread started by `spawn`.
    pub fn start_with(
        listener: UnixListener,
        config: ServerConfig,
        handler: RequestHandler,
        spawn: ThreadSpawner,
    ) -> io::Result<ApiServer> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let thread = serve(listener, config, handler, stop.try_clone()?, spawn)?;
        Ok(ApiServer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the server and waits for its thread; open connections are closed without an answer.
    /// Returns the thread's panic, if it panicked.
    pub fn stop(mut self) -> thread::Result<()> {
        self.signal_stop();
        match self.thread.take() {
            Some(thread) => thread.join(),
            None => Ok(()),
        }
    }

    fn signal_stop(&self) {
        // Fails only if the counter would overflow, when a stop is pending anyway.
        let _ = self.stop.write(1);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// The state of the `kiln_api` thread.
struct EventLoop {
    epoll: Epoll,
    listener: UnixListener,
    /// Kept open so its epoll registration stays valid; only its readiness is used.
    _stop: EventFd,
    config: ServerConfig,
    handler: RequestHandler,
    /// Open connections and the events each is registered for.
    connections: HashMap<u64, (Connection, EventSet)>,
    next_token: u64,
    /// Set while the listener is out of epoll after `accept` ran out of resources.
    accept_paused_until: Option<Instant>,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            let timeout = self.wait_timeout_ms(Instant::now());
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("api: epoll_wait failed: {e}; the API server stops");
                    return;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    STOP_TOKEN => return,
                    LISTENER_TOKEN => self.accept_clients(),
                    token => self.on_connection_event(token, event.event_set()),
                }
            }
            let now = Instant::now();
            self.expire_deadlines(now);
            self.resume_accepting_if_due(now);
        }
    }

    /// Milliseconds until the earliest deadline (rounded up, so the loop does not wake early and
    /// spin), or -1 when nothing has one.
    fn wait_timeout_ms(&self, now: Instant) -> i32 {
        let earliest = self
            .connections
            .values()
            .map(|(connection, _)| connection.deadline())
            .chain(self.accept_paused_until)
            .min();
        match earliest {
            None => -1,
            Some(deadline) => {
                let nanos = deadline.saturating_duration_since(now).as_nanos();
                i32::try_from(nanos.div_ceil(1_000_000)).unwrap_or(i32::MAX)
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_client(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of fds or memory: level-triggered epoll would report the listener again
                    // at once, so take it out for a moment.
                    log::warn!(
                        "api: accept failed: {e}; pausing for {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn resume_accepting_if_due(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            let registered = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            );
            match registered {
                Ok(()) => self.accept_paused_until = None,
                Err(e) => {
                    log::warn!("api: cannot watch the API socket again: {e}; retrying");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn add_client(&mut self, stream: UnixStream) {
        if self.connections.len() >= self.config.max_connections && !self.close_idlest() {
            turn_away(&stream, self.config.max_connections);
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let connection = Connection::new(stream, &self.config, Instant::now());
        let Some(interest) = connection.interest() else {
            return;
        };
        let registered = self.epoll.ctl(
            ControlOperation::Add,
            connection.raw_fd(),
            EpollEvent::new(interest, token),
        );
        if registered.is_ok() {
            self.connections.insert(token, (connection, interest));
        }
    }

    fn on_connection_event(&mut self, token: u64, events: EventSet) {
        let now = Instant::now();
        let handler = &*self.handler;
        let Some((connection, _)) = self.connections.get_mut(&token) else {
            return;
        };
        let problem = EventSet::ERROR | EventSet::HANG_UP;
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | problem) {
            connection.on_readable(handler, now);
        }
        if events.intersects(EventSet::OUT | problem) {
            connection.on_writable(handler, now);
        }
        self.update_registration(token);
    }

    fn expire_deadlines(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, (connection, _))| connection.deadline() <= now)
            .map(|(&token, _)| token)
            .collect();
        for token in due {
            if let Some((connection, _)) = self.connections.get_mut(&token) {
                connection.on_deadline(&*self.handler, now);
            }
            self.update_registration(token);
        }
    }

    /// Brings the epoll registration in line with what the connection waits for, dropping it
    /// when it is finished.
    fn update_registration(&mut self, token: u64) {
        let Some((connection, registered)) = self.connections.get_mut(&token) else {
            return;
        };
        let wanted = if connection.is_closed() {
            None
        } else {
            connection.interest()
        };
        match wanted {
            Some(interest) if interest == *registered => {}
            Some(interest) => {
                let modified = self.epoll.ctl(
                    ControlOperation::Modify,
                    connection.raw_fd(),
                    EpollEvent::new(interest, token),
                );
                if modified.is_ok() {
                    *registered = interest;
                } else {
                    self.drop_connection(token);
                }
            }
            None => self.drop_connection(token),
        }
    }

    /// Closes the connection idle longest, if it has been idle at least `idle_grace`; returns
    /// whether one was closed. (A scan of at most `max_connections`, made only at the limit.)
    fn close_idlest(&mut self) -> bool {
        let now = Instant::now();
        let idlest = self
            .connections
            .iter()
            .filter_map(|(&token, (connection, _))| Some((connection.idle_since()?, token)))
            .filter(|&(since, _)| now.saturating_duration_since(since) >= self.config.idle_grace)
            .min();
        match idlest {
            Some((_, token)) => {
                self.drop_connection(token);
                true
            }
            None => false,
        }
    }

    fn drop_connection(&mut self, token: u64) {
        if let Some((connection, _)) = self.connections.remove(&token) {
            // Closing the fd would remove it from epoll too; this just makes it explicit.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                connection.raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}

/// Answers a client beyond the connection limit with a 503 fault (best effort, never blocking)
/// and lets it go.
fn turn_away(stream: &UnixStream, limit: usize) {
    let response = HttpError::TooManyConnections { limit }.to_response();
    log_request("-", "-", response.status(), Duration::ZERO);
    if stream.set_nonblocking(true).is_ok() {
        let _ = send_without_sigpipe(stream, &response.to_bytes(false));
        discard_pending(stream);
    }
}

/// Reads and drops what a turned-away client has sent so far (at most a few KiB): a Unix socket
/// closed with unread data makes its peer's next read fail with ECONNRESET once the refusal is
/// read, where a client expects an end of file.
fn discard_pending(stream: &UnixStream) {
    let mut scrap = [0u8; 4096];
    for _ in 0..4 {
        match (&*stream).read(&mut scrap) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::http::socket::{bind_api_socket, SocketGuard};
    use crate::http::Method;

    /// Generous: only reached when something is broken.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

    fn socket_path(test: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("kiln-api-{}-{test}-{n}.sock", std::process::id()))
    }

    /// Answers `{"method":..,"path":..,"body_len":..}`; `PUT /panic` panics.
    fn echo_handler() -> RequestHandler {
        Arc::new(|request: HttpRequest| {
            if request.method == Method::Put && request.path == "/panic" {
                panic!("handler bug (expected by test)");
            }
            let body = serde_json::json!({
                "method": request.method.as_str(),
                "path": request.path,
                "body_len": request.body.len(),
            });
            HttpResponse::json(200, body.to_string().into_bytes())
        })
    }

    struct TestServer {
        path: PathBuf,
        server: Option<ApiServer>,
        _guard: SocketGuard,
    }

    impl TestServer {
        fn start(test: &str, config: ServerConfig) -> TestServer {
            let path = socket_path(test);
            let listener = bind_api_socket(&path).unwrap();
            let guard = SocketGuard::new(&path);
            let server = ApiServer::start(listener, config, echo_handler()).unwrap();
            TestServer {
                path,
                server: Some(server),
                _guard: guard,
            }
        }

        fn connect(&self) -> UnixStream {
            let stream = UnixStream::connect(&self.path).unwrap();
            stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
            stream
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            if let Some(server) = self.server.take() {
                server.stop().unwrap();
            }
        }
    }

    struct Reply {
        status: u16,
        head: String,
        body: Vec<u8>,
    }

    impl Reply {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    /// Reads one response (headers, then `Content-Length` bytes of body).
    fn read_reply(stream: &mut UnixStream) -> Reply {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).unwrap();
            assert_eq!(n, 1, "EOF after {:?}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let status = head[9..12].parse().unwrap();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        Reply { status, head, body }
    }

    fn request(stream: &mut UnixStream, bytes: &[u8]) -> Reply {
        stream.write_all(bytes).unwrap();
        read_reply(stream)
    }

    fn get(server: &TestServer, path: &str) -> Reply {
        let mut stream = server.connect();
        request(
            &mut stream,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        )
    }

    #[test]
    fn get_returns_handlers_response() {
        let server = TestServer::start("get", ServerConfig::default());
        let reply = get(&server, "/machine-config?x=1");
        assert_eq!(reply.status, 200);
        assert!(
            reply.head.contains("Server: Kiln API\r\n"),
            "{}",
            reply.head
        );
        assert!(reply.head.contains("Content-Type: application/json\r\n"));
        let json = reply.json();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], "/machine-config");
    }

    #[test]
    fn fifty_concurrent_clients_are_all_served() {
        let server = TestServer::start("fifty", ServerConfig::default());
        let mut clients: Vec<UnixStream> = (0..50).map(|_| server.connect()).collect();
        for (i, client) in clients.iter_mut().enumerate() {
            let body = "x".repeat(i);
            let bytes = format!("PUT /c/{i} HTTP/1.1\r\nContent-Length: {i}\r\n\r\n{body}");
            client.write_all(bytes.as_bytes()).unwrap();
        }
        for (i, client) in clients.iter_mut().enumerate() {
            let reply = read_reply(client);
            assert_eq!(reply.status, 200);
            assert_eq!(reply.json()["path"], format!("/c/{i}"));
            assert_eq!(reply.json()["body_len"], i);
        }
    }

    #[test]
    fn slow_client_does_not_block_others() {
        let server = TestServer::start("slow", ServerConfig::default());
        let mut slow = server.connect();
        slow.write_all(b"PUT /slow HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        for _ in 0..3 {
            assert_eq!(get(&server, "/fast").status, 200);
        }
        let reply = request(&mut slow, b"defghij");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["body_len"], 10);
    }

    #[test]
    fn half_closed_client_gets_fault_and_server_keeps_serving() {
        let server = TestServer::start("halfclosed", ServerConfig::default());
        let mut client = server.connect();
        client
            .write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
            .unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let reply = read_reply(&mut client);
        assert_eq!(reply.status, 400);
        assert!(reply.head.contains("Connection: close\r\n"));
        let message = reply.json()["fault_message"].as_str().unwrap().to_owned();
        assert!(message.contains("incomplete request"), "{message}");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(get(&server, "/after").status, 200);
    }

    #[test]
    fn client_closing_after_full_request_still_gets_answer() {
        let server = TestServer::start("closeafter", ServerConfig::default());
        let mut client = server.connect();
        client.write_all(b"GET /once HTTP/1.1\r\n\r\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_reply(&mut client).status, 200);
    }

    #[test]
    fn over_limit_body_gets_400_with_firecrackers_message() {
        let config = ServerConfig {
            max_payload: 1000,
            ..ServerConfig::default()
        };
        let server = TestServer::start("overlimit", config);
        let mut client = server.connect();
        let mut bytes = b"PUT /drives/root HTTP/1.1\r\nContent-Length: 5000\r\n\r\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'{', 5000));
        let reply = request(&mut client, &bytes);
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.json()["fault_message"],
            "Request payload with size 5000 is larger than the limit of 1000 allowed by server."
        );
        assert_eq!(get(&server, "/after").status, 200);
    }

    #[test]
    fn keep_alive_serves_sequential_and_pipelined_requests() {
        let server = TestServer::start("keepalive", ServerConfig::default());
        let mut client = server.connect();
        assert_eq!(
            request(&mut client, b"GET /one HTTP/1.1\r\n\r\n").json()["path"],
            "/one"
        );
        assert_eq!(
            request(&mut client, b"GET /two HTTP/1.1\r\n\r\n").json()["path"],
            "/two"
        );
        client
            .write_all(
                b"PUT /three HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /four HTTP/1.1\r\n\r\n",
            )
            .unwrap();
        assert_eq!(read_reply(&mut client).json()["path"], "/three");
        assert_eq!(read_reply(&mut client).json()["path"], "/four");
    }

    #[test]
    fn expect_continue_gets_interim_response() {
        let server = TestServer::start("continue", ServerConfig::default());
        let mut client = server.connect();
        client
            .write_all(b"PUT /big HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .unwrap();
        let mut interim = vec![0; crate::http::CONTINUE_RESPONSE.len()];
        client.read_exact(&mut interim).unwrap();
        assert_eq!(interim, crate::http::CONTINUE_RESPONSE);
        let reply = request(&mut client, b"data");
        assert_eq!(reply.json()["body_len"], 4);
    }

    #[test]
    fn request_timeout_gets_408() {
        let config = ServerConfig {
            request_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        };
        let server = TestServer::start("timeout", config);
        let mut client = server.connect();
        client
            .write_all(b"GET /never-finished HTTP/1.1\r\n")
            .unwrap();
        let reply = read_reply(&mut client);
        assert_eq!(reply.status, 408);
        assert_eq!(get(&server, "/after").status, 200);
    }

    #[test]
    fn clients_beyond_the_limit_get_503() {
        let config = ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        };
        let server = TestServer::start("limit", config);
        let mut first = server.connect();
        let mut second = server.connect();
        // Answered requests prove both are accepted before the third connects.
        assert_eq!(request(&mut first, b"GET /1 HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(request(&mut second, b"GET /2 HTTP/1.1\r\n\r\n").status, 200);
        let mut third = server.connect();
        let reply = read_reply(&mut third);
        assert_eq!(reply.status, 503);
        assert!(reply.json()["fault_message"]
            .as_str()
            .unwrap()
            .contains("limit 2"));
        drop(first);
        // The slot frees once the server sees the close; retry until it has.
        let mut served = false;
        for _ in 0..100 {
            let mut client = server.connect();
            // A client still turned away may find the connection closed before its write.
            let _ = client.write_all(b"GET /3 HTTP/1.1\r\n\r\n");
            if read_reply(&mut client).status == 200 {
                served = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(served);
    }

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room() {
        let config = ServerConfig {
            max_connections: 2,
            idle_grace: Duration::from_millis(500),
            ..ServerConfig::default()
        };
        let server = TestServer::start("idle", config);
        // Idle since they connected; one with half a request is busy, never closed for room.
        let mut idle = server.connect();
        assert_eq!(request(&mut idle, b"GET /1 HTTP/1.1\r\n\r\n").status, 200);
        let mut busy = server.connect();
        busy.write_all(b"GET /half HTTP/1.1\r\nHo").unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let mut newcomer = server.connect();
        assert_eq!(
            request(&mut newcomer, b"GET /new HTTP/1.1\r\n\r\n").status,
            200
        );
        // The idle one was closed: an end of file, no bytes.
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // The busy one is still served.
        busy.write_all(b"st: x\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut busy).status, 200);
        // Nothing idle long enough now: the next client is turned away.
        let mut late = server.connect();
        assert_eq!(read_reply(&mut late).status, 503);
    }

    #[test]
    fn panicking_handler_gets_500_and_server_keeps_serving() {
        let server = TestServer::start("panic", ServerConfig::default());
        let mut client = server.connect();
        assert_eq!(
            request(&mut client, b"PUT /panic HTTP/1.1\r\n\r\n").status,
            500
        );
        assert_eq!(
            request(&mut client, b"GET /ok HTTP/1.1\r\n\r\n").status,
            200
        );
    }

    #[test]
    fn garbage_gets_400_and_connection_closes() {
        let server = TestServer::start("garbage", ServerConfig::default());
        let mut client = server.connect();
        let reply = request(&mut client, b"\x16\x03\x01 hello\r\n\r\n");
        assert_eq!(reply.status, 400);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn http10_request_is_answered_and_closed() {
        let server = TestServer::start("http10", ServerConfig::default());
        let mut client = server.connect();
        let reply = request(&mut client, b"GET /old HTTP/1.0\r\n\r\n");
        assert_eq!(reply.status, 200);
        assert!(reply.head.contains("Connection: close\r\n"));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn socket_is_private_and_removed_with_guard() {
        let server = TestServer::start("mode", ServerConfig::default());
        let path = server.path.clone();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(server);
        assert!(std::fs::symlink_metadata(&path).is_err());
    }

    #[test]
    fn stop_ends_the_thread() {
        let path = socket_path("stop");
        let listener = bind_api_socket(&path).unwrap();
        let _guard = SocketGuard::new(&path);
        let server = ApiServer::start(listener, ServerConfig::default(), echo_handler()).unwrap();
        let _idle_client = UnixStream::connect(&path).unwrap();
        server.stop().unwrap();
    }

    #[test]
    fn log_line_format_is_stable() {
        assert_eq!(
            request_log_line("PUT", "/actions", 204, Duration::from_micros(1234)),
            "api: PUT /actions -> 204 in 1234 us"
        );
    }
}
