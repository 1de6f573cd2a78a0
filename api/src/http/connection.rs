//! One API client: its buffers, its deadline, and what happens on EOF, timeouts and errors.
//!
//! A connection answers one request at a time: the next request is parsed only once the previous
//! response has been written, so the output buffer holds at most one response and the input
//! buffer at most one request's worth of bytes ([`MAX_HEAD_BYTES`] + the payload limit) — a client
//! that pipelines without reading its answers stops being read.
//!
//! After a fault (bad request, EOF or timeout in the middle of a request) the fault response is
//! sent with `Connection: close`, the write side is shut, and the client's remaining input is
//! read and thrown away until it closes or a short linger deadline passes, so that it reads the
//! fault instead of a connection reset.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::parser::{Parsed, RequestParser, MAX_HEAD_BYTES};
use super::server::{log_request, ServerConfig};
use super::{HttpError, HttpRequest, HttpResponse, CONTINUE_RESPONSE};

/// Bytes read from the socket per `read` call.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Most bytes thrown away per readiness event while lingering, so one client cannot keep the loop.
const MAX_DISCARD_PER_EVENT: usize = 256 * 1024;

/// An idle connection's input buffer is shrunk back to this capacity.
const IDLE_BUFFER_CAPACITY: usize = 4096;

/// The request handler as the connection calls it.
pub(crate) type Handler<'a> = &'a dyn Fn(HttpRequest) -> HttpResponse;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading requests and answering them.
    Open,
    /// A last response is queued; once it is written the connection lingers.
    Closing,
    /// The last response was written and the write side shut; input is discarded until EOF or the
    /// deadline.
    Lingering,
    /// Finished: the server drops the connection.
    Closed,
}

/// One accepted client.
///
/// Invariants: `input.len() <= max_input`; `written <= output.len()`; when `peer_closed` the
/// phase is not `Open` with an empty output (the connection would wait for input that cannot
/// come).
pub(crate) struct Connection {
    stream: UnixStream,
    parser: RequestParser,
    input: Vec<u8>,
    max_input: usize,
    output: Vec<u8>,
    /// Bytes of `output` already sent.
    written: usize,
    phase: Phase,
    /// The client shut its write side (`read` returned 0).
    peer_closed: bool,
    /// When the current stage must be over: the request complete in `Open`, the last response
    /// written in `Closing`, the client gone in `Lingering`.
    deadline: Instant,
    request_timeout: Duration,
    linger_timeout: Duration,
    /// When the client last sent something or the socket last took output.
    last_activity: Instant,
}

impl Connection {
    /// A connection for a freshly accepted, nonblocking `stream`.
    pub(crate) fn new(stream: UnixStream, config: &ServerConfig, now: Instant) -> Connection {
        Connection {
            stream,
            parser: RequestParser::new(config.max_payload),
            input: Vec::new(),
            max_input: MAX_HEAD_BYTES.saturating_add(config.max_payload),
            output: Vec::new(),
            written: 0,
            phase: Phase::Open,
            peer_closed: false,
            deadline: now + config.request_timeout,
            request_timeout: config.request_timeout,
            linger_timeout: config.linger_timeout,
            last_activity: now,
        }
    }

    /// Since when the connection has been idle between requests (nothing of a request received,
    /// no response owed), if it is; such a connection may be closed at any time.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        let idle = self.phase == Phase::Open && self.input.is_empty() && self.output.is_empty();
        idle.then_some(self.last_activity)
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The epoll events this connection waits for; `None` once it is finished.
    pub(crate) fn interest(&self) -> Option<EventSet> {
        match self.phase {
            Phase::Closed => None,
            _ if self.written < self.output.len() => Some(EventSet::OUT),
            Phase::Open | Phase::Lingering => Some(EventSet::IN | EventSet::READ_HANG_UP),
            // Unreachable: `Closing` with everything written moves on to `Lingering` at once.
            Phase::Closing => Some(EventSet::OUT),
        }
    }

    /// The socket has input, an EOF or an error.
    pub(crate) fn on_readable(&mut self, handler: Handler<'_>, now: Instant) {
        self.last_activity = now;
        match self.phase {
            Phase::Open => {
                self.read_input();
                self.advance(handler, now);
            }
            Phase::Lingering => self.discard_input(),
            Phase::Closing | Phase::Closed => {}
        }
    }

    /// The socket can take output (or has an error).
    pub(crate) fn on_writable(&mut self, handler: Handler<'_>, now: Instant) {
        self.last_activity = now;
        if self.phase != Phase::Closed {
            self.advance(handler, now);
        }
    }

    /// Called when `now` may be past [`deadline`](Self::deadline).
    ///
    /// The loop may have been busy in the handler for longer than the timeout, so what the client
    /// sent or could take meanwhile is handled first; only then does the deadline count.
    pub(crate) fn on_deadline(&mut self, handler: Handler<'_>, now: Instant) {
        if now < self.deadline {
            return;
        }
        match self.phase {
            Phase::Open => {
                self.read_input();
                self.advance(handler, now);
            }
            Phase::Closing => self.advance(handler, now),
            Phase::Lingering | Phase::Closed => {}
        }
        if now < self.deadline {
            return;
        }
        match self.phase {
            // The client does not read its response: nothing more can be said to it.
            Phase::Open if self.written < self.output.len() => self.phase = Phase::Closed,
            Phase::Open if self.parser.in_progress(&self.input) => {
                self.fail(
                    HttpError::RequestTimeout {
                        timeout: self.request_timeout,
                    },
                    now,
                );
                self.advance(handler, now);
            }
            // Idle between requests.
            Phase::Open => self.phase = Phase::Closed,
            Phase::Closing | Phase::Lingering | Phase::Closed => self.phase = Phase::Closed,
        }
    }

    /// Reads what the socket has, up to the input limit.
    fn read_input(&mut self) {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        while !self.peer_closed {
            let room = self.max_input - self.input.len();
            if room == 0 {
                return;
            }
            match self.stream.read(&mut chunk[..room.min(READ_CHUNK_BYTES)]) {
                Ok(0) => self.peer_closed = true,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Closed;
                    return;
                }
            }
        }
    }

    /// Answers what can be answered and writes what can be written.
    fn advance(&mut self, handler: Handler<'_>, now: Instant) {
        loop {
            let had_output = !self.output.is_empty();
            let queued =
                self.phase == Phase::Open && !had_output && self.answer_next_request(handler, now);
            if !self.flush() {
                return;
            }
            match self.phase {
                Phase::Closing => {
                    // The client may already be gone; nothing to do about a failed shutdown.
                    let _ = self.stream.shutdown(Shutdown::Write);
                    self.phase = Phase::Lingering;
                    self.deadline = now + self.linger_timeout;
                    self.discard_input();
                    return;
                }
                // A response went out: the next pipelined request may already be buffered.
                Phase::Open if queued || had_output => {
                    self.deadline = now + self.request_timeout;
                }
                _ => return,
            }
        }
    }

    /// Parses the next request and queues its answer (or a fault, or `100 Continue`). Returns
    /// whether anything was queued.
    fn answer_next_request(&mut self, handler: Handler<'_>, now: Instant) -> bool {
        match self.parser.parse(&self.input) {
            Ok(Parsed::Incomplete) | Ok(Parsed::ExpectContinue) if self.peer_closed => {
                if self.parser.in_progress(&self.input) {
                    let received = self.input.len();
                    self.fail(HttpError::IncompleteRequest { received }, now);
                    true
                } else {
                    self.phase = Phase::Closed;
                    false
                }
            }
            Ok(Parsed::Incomplete) => {
                if self.input.len() >= self.max_input {
                    // Cannot happen: a full buffer holds a complete request or a parse error.
                    self.phase = Phase::Closed;
                }
                if self.input.is_empty() && self.input.capacity() > IDLE_BUFFER_CAPACITY {
                    self.input.shrink_to(IDLE_BUFFER_CAPACITY);
                }
                false
            }
            Ok(Parsed::ExpectContinue) => {
                self.output.extend_from_slice(CONTINUE_RESPONSE);
                true
            }
            Ok(Parsed::Complete(request, consumed)) => {
                self.input.drain(..consumed);
                let keep_alive = request.keep_alive;
                let send_body = request.method.as_str() != "HEAD";
                let response = call_handler(handler, request);
                self.output = response.serialize(keep_alive, send_body);
                self.written = 0;
                self.deadline = now + self.request_timeout;
                if !keep_alive {
                    self.phase = Phase::Closing;
                }
                true
            }
            Err(error) => {
                self.fail(error, now);
                true
            }
        }
    }

    /// Queues the fault for `error` as the connection's last response.
    fn fail(&mut self, error: HttpError, now: Instant) {
        let response = error.to_response();
        log_request("-", "-", response.status(), Duration::ZERO);
        self.output = response.to_bytes(false);
        self.written = 0;
        self.phase = Phase::Closing;
        self.deadline = now + self.linger_timeout;
    }

    /// Writes queued output. Returns true when all of it is written; false when the socket is
    /// full (wait for `EPOLLOUT`) or broken (the phase is then `Closed`).
    fn flush(&mut self) -> bool {
        while self.written < self.output.len() {
            match send_without_sigpipe(&self.stream, &self.output[self.written..]) {
                Ok(0) => {
                    self.phase = Phase::Closed;
                    return false;
                }
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Closed;
                    return false;
                }
            }
        }
        self.output.clear();
        self.written = 0;
        true
    }

    /// Reads and drops input while lingering; the connection is done at EOF.
    fn discard_input(&mut self) {
        if self.peer_closed {
            self.phase = Phase::Closed;
            return;
        }
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let mut discarded = 0;
        while discarded < MAX_DISCARD_PER_EVENT {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.phase = Phase::Closed;
                    return;
                }
                Ok(n) => discarded += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Closed;
                    return;
                }
            }
        }
    }

    /// Whether the server should drop this connection.
    pub(crate) fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }
}

/// Calls the handler, logs the request, and turns a panic into a 500 fault so the API keeps
/// serving (in a `panic = "abort"` build the process ends instead).
fn call_handler(handler: Handler<'_>, request: HttpRequest) -> HttpResponse {
    let method = request.method.clone();
    let path = request.path.clone();
    let started = Instant::now();
    let response = catch_unwind(AssertUnwindSafe(|| handler(request)))
        .unwrap_or_else(|_| HttpError::HandlerPanicked.to_response());
    log_request(method.as_str(), &path, response.status(), started.elapsed());
    response
}

/// Writes to a socket with `MSG_NOSIGNAL`, so a client that went away is an `EPIPE` error rather
/// than a `SIGPIPE` that would kill the process.
pub(crate) fn send_without_sigpipe(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `bytes`, which outlives the call; the fd is owned by
    // `stream`, which is borrowed for the call.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn echo_path(request: HttpRequest) -> HttpResponse {
        HttpResponse::json(200, format!("\"{}\"", request.path).into_bytes())
    }

    fn pair(config: &ServerConfig) -> (Connection, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        (Connection::new(server, config, Instant::now()), client)
    }

    fn read_available(client: &mut UnixStream) -> String {
        client.set_nonblocking(true).unwrap();
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match client.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn answers_pipelined_requests_in_order() {
        let (mut connection, mut client) = pair(&ServerConfig::default());
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .unwrap();
        connection.on_readable(&echo_path, Instant::now());
        let replies = read_available(&mut client);
        let a = replies.find("\"/a\"").unwrap();
        let b = replies.find("\"/b\"").unwrap();
        assert!(a < b, "{replies}");
        assert_eq!(
            connection.interest(),
            Some(EventSet::IN | EventSet::READ_HANG_UP)
        );
    }

    #[test]
    fn eof_mid_request_sends_fault_then_closes() {
        let (mut connection, mut client) = pair(&ServerConfig::default());
        client.write_all(b"PUT /x HTTP/1.1\r\nContent-Le").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        connection.on_readable(&echo_path, Instant::now());
        let reply = read_available(&mut client);
        assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
        assert!(reply.contains("Connection: close"), "{reply}");
        assert!(reply.contains("incomplete request"), "{reply}");
        assert!(connection.is_closed());
    }

    #[test]
    fn eof_between_requests_closes_quietly() {
        let (mut connection, mut client) = pair(&ServerConfig::default());
        client.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        connection.on_readable(&echo_path, Instant::now());
        let reply = read_available(&mut client);
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
        assert!(connection.is_closed());
    }

    #[test]
    fn deadline_mid_request_sends_408() {
        let config = ServerConfig::default();
        let (mut connection, mut client) = pair(&config);
        client.write_all(b"GET /a HTTP/1.1\r\n").unwrap();
        let start = Instant::now();
        connection.on_readable(&echo_path, start);
        connection.on_deadline(&echo_path, start + config.request_timeout * 2);
        let reply = read_available(&mut client);
        assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
        assert_eq!(
            connection.interest(),
            Some(EventSet::IN | EventSet::READ_HANG_UP)
        );
        connection.on_deadline(&echo_path, start + config.request_timeout * 4);
        assert!(connection.is_closed());
    }

    #[test]
    fn request_that_arrived_while_loop_was_busy_is_answered_at_deadline() {
        let config = ServerConfig::default();
        let (mut connection, mut client) = pair(&config);
        client.write_all(b"GET /late HTTP/1.1\r\n\r\n").unwrap();
        let late = Instant::now() + config.request_timeout * 2;
        connection.on_deadline(&echo_path, late);
        let reply = read_available(&mut client);
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
        assert!(!connection.is_closed());
        assert!(connection.deadline() > late);
    }

    #[test]
    fn idle_deadline_closes_quietly() {
        let config = ServerConfig::default();
        let (mut connection, mut client) = pair(&config);
        connection.on_deadline(&echo_path, Instant::now() + config.request_timeout * 2);
        assert!(connection.is_closed());
        assert_eq!(read_available(&mut client), "");
    }

    #[test]
    fn panicking_handler_gets_500() {
        let (mut connection, mut client) = pair(&ServerConfig::default());
        client.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
        let panicking =
            |_: HttpRequest| -> HttpResponse { panic!("handler bug (expected by test)") };
        connection.on_readable(&panicking, Instant::now());
        let reply = read_available(&mut client);
        assert!(reply.starts_with("HTTP/1.1 500 "), "{reply}");
        assert!(!connection.is_closed());
    }

    #[test]
    fn head_request_gets_no_body() {
        let (mut connection, mut client) = pair(&ServerConfig::default());
        client.write_all(b"HEAD /a HTTP/1.1\r\n\r\n").unwrap();
        connection.on_readable(&echo_path, Instant::now());
        let reply = read_available(&mut client);
        assert!(reply.ends_with("\r\n\r\n"), "{reply}");
        assert!(reply.contains("Content-Length: 4\r\n"), "{reply}");
    }
}
