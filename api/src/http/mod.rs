//! Kiln's HTTP/1.1 layer: just enough of the protocol to speak Firecracker's REST API on a Unix
//! socket, and no more.
//!
//! - [`parser`] turns bytes from a client into [`HttpRequest`]s, bounded in size, incrementally.
//! - [`connection`] is one client's state: its buffers, its deadline, what happens on EOF.
//! - [`server`] is the epoll loop on the `kiln_api` thread that accepts clients and calls the
//!   request handler, one request at a time.
//! - [`socket`] creates the API socket file (0600, never through a symlink) and removes it again.
//!
//! Everything a client can get wrong is an [`HttpError`], which maps to a 4xx/5xx status and a
//! Firecracker-style `{"fault_message": "..."}` body; nothing here panics on what a client sent.

mod connection;
pub mod parser;
pub mod server;
pub mod socket;

use std::fmt;

pub use parser::{Parsed, RequestParser, DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEAD_BYTES};
pub use server::{
    log_request, plain_thread, serve, ApiServer, RequestHandler, ServerConfig, ThreadSpawner,
};
pub use socket::{bind_api_socket, BindError, SocketGuard};

/// The interim response sent to a client that asked `Expect: 100-continue` before its body.
pub const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The longest piece of client-sent text quoted back in a fault message.
const MAX_QUOTED_CHARS: usize = 64;

/// A request method. The API routes on `Get`, `Put` and `Patch`; anything else is kept by name so
/// the router can answer 405 with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`, which reads a resource.
    Get,
    /// `PUT`, which creates or replaces a resource.
    Put,
    /// `PATCH`, which updates part of a resource.
    Patch,
    /// Any other method token, as sent (methods are case-sensitive).
    Other(String),
}

impl Method {
    /// The method for a token already checked to be an RFC 9110 `token`.
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_owned()),
        }
    }

    /// The method as it appears on the request line.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Other(name) => name,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol versions Kiln accepts; anything else is refused with 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0: the connection closes after the response unless `Connection: keep-alive`.
    Http10,
    /// HTTP/1.1: the connection stays open unless `Connection: close`.
    Http11,
}

/// One complete request, as the handler sees it.
///
/// Invariants (established by the parser): `path` starts with `/` and holds only visible ASCII;
/// `query` is what followed the first `?` (Firecracker ignores it, so does Kiln's router);
/// `body.len()` equals the request's `Content-Length` (0 when the header was absent) and is at most
/// the server's payload limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// The request method.
    pub method: Method,
    /// The target's path, without the query or an absolute-form `http://host` prefix.
    pub path: String,
    /// What followed the first `?` in the target, if there was one.
    pub query: Option<String>,
    /// The protocol version from the request line.
    pub version: HttpVersion,
    /// The `Content-Type` header, if sent (not validated: the router decides what it accepts).
    pub content_type: Option<String>,
    /// Whether the connection stays open after the response: HTTP/1.1 unless `Connection: close`,
    /// HTTP/1.0 only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// The body: exactly `Content-Length` bytes, empty when the header was absent.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The request's `Content-Length` (the body is always exactly that long).
    pub fn content_length(&self) -> usize {
        self.body.len()
    }
}

/// A response: a status and an optional JSON body. Kiln sends no other headers than the fixed
/// `Server`, `Connection`, `Content-Type` and `Content-Length`.
///
/// Invariants: `status` is in 200..=599; statuses that cannot carry a body (204, 304) have none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    status: u16,
    body: Option<Vec<u8>>,
}

impl HttpResponse {
    /// 204 No Content: the answer to a successful `PUT`/`PATCH`.
    pub fn no_content() -> HttpResponse {
        HttpResponse {
            status: 204,
            body: None,
        }
    }

    /// A response with `body`, which must already be JSON. A status outside 200..=599 becomes 500
    /// (it is a bug in the caller, not something to send); 204 and 304 drop the body, which they
    /// cannot carry.
    pub fn json(status: u16, body: Vec<u8>) -> HttpResponse {
        let status = if (200..=599).contains(&status) {
            status
        } else {
            500
        };
        let body = if status_allows_body(status) {
            Some(body)
        } else {
            None
        };
        HttpResponse { status, body }
    }

    /// A Firecracker-style error: `{"fault_message": "<message>"}`, JSON-escaped.
    pub fn fault(status: u16, message: &str) -> HttpResponse {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        HttpResponse::json(status, body.into_bytes())
    }

    /// The status code, in 200..=599.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The JSON body, if the response has one.
    pub fn body(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }

    /// The response as it goes on the wire. `keep_alive` picks the `Connection` header: the server
    /// passes `false` when it closes the connection after this response.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        self.serialize(keep_alive, true)
    }

    /// Like [`to_bytes`](Self::to_bytes); `send_body` is false for a `HEAD` request, whose
    /// response has the headers of the full response but no body.
    pub(crate) fn serialize(&self, keep_alive: bool, send_body: bool) -> Vec<u8> {
        let body_len = self.body.as_ref().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(160 + body_len);
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\nServer: Kiln API\r\nConnection: {}\r\n",
                self.status,
                reason_phrase(self.status),
                if keep_alive { "keep-alive" } else { "close" }
            )
            .as_bytes(),
        );
        if status_allows_body(self.status) {
            if self.body.is_some() {
                out.extend_from_slice(b"Content-Type: application/json\r\n");
            }
            out.extend_from_slice(format!("Content-Length: {body_len}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if send_body {
            if let Some(body) = &self.body {
                out.extend_from_slice(body);
            }
        }
        out
    }
}

/// Whether a response with this status may carry a body (and so a `Content-Length`).
fn status_allows_body(status: u16) -> bool {
    !matches!(status, 100..=199 | 204 | 304)
}

/// The reason phrase for a status; statuses Kiln does not name get their class's generic phrase.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => match status / 100 {
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

/// Everything that goes wrong with a client at the HTTP level. Each variant is one answer: a status
/// ([`status`](Self::status)) and the message that becomes the fault body (the `Display` text).
/// After any of them the server closes the connection, since it can no longer tell where the next
/// request would start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No end of the header section within [`MAX_HEAD_BYTES`].
    #[error(
        "Request line and headers are larger than the limit of {limit} bytes allowed by server."
    )]
    HeadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// `Content-Length` above the server's payload limit; sent before any of the body is read.
    #[error(
        "Request payload with size {len} is larger than the limit of {max} allowed by server."
    )]
    PayloadTooLarge {
        /// The request's `Content-Length`, in bytes.
        len: u64,
        /// The server's payload limit, in bytes.
        max: usize,
    },
    /// The request line is not `METHOD SP target SP version` in visible ASCII.
    #[error("Invalid request line: expected `METHOD /path HTTP/1.1`.")]
    InvalidRequestLine,
    /// The method is not an RFC 9110 token.
    #[error("Invalid request method `{method}`.")]
    InvalidMethod {
        /// The method as the client sent it (shortened for quoting).
        method: String,
    },
    /// The target is neither an absolute path nor an `http://host/path` URI.
    #[error(
        "Invalid request target `{target}`: expected an absolute path such as `/machine-config`."
    )]
    InvalidTarget {
        /// The target as the client sent it (shortened for quoting).
        target: String,
    },
    /// The request line names a version other than HTTP/1.0 or HTTP/1.1.
    #[error("Unsupported HTTP version `{version}`: use HTTP/1.0 or HTTP/1.1.")]
    UnsupportedVersion {
        /// The version as the client sent it (shortened for quoting).
        version: String,
    },
    /// A header line that is not `name: value` with a token name and a value without control
    /// characters (folded lines included). `line` counts from 1 at the first header.
    #[error("Invalid header on line {line} of the header section.")]
    InvalidHeader {
        /// The offending header line's number, counting from 1.
        line: usize,
    },
    /// A `Content-Length` that is not a plain decimal number or does not fit in a `u64`.
    #[error("Invalid Content-Length `{value}`: expected a decimal number of bytes.")]
    InvalidContentLength {
        /// The value as the client sent it (shortened for quoting).
        value: String,
    },
    /// Several `Content-Length` headers with different values.
    #[error("Conflicting Content-Length headers.")]
    ConflictingContentLength,
    /// Chunked (or any other) transfer coding: the API takes bodies with a `Content-Length` only.
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length header.")]
    TransferEncodingNotSupported,
    /// An `Expect` header other than `100-continue` (answered 417).
    #[error("Unsupported expectation `{value}`: only `Expect: 100-continue` is supported.")]
    UnsupportedExpectation {
        /// The value as the client sent it (shortened for quoting).
        value: String,
    },
    /// The client closed its side of the connection in the middle of a request.
    #[error("Connection closed after {received} bytes of an incomplete request.")]
    IncompleteRequest {
        /// Bytes of the unfinished request received before the close.
        received: usize,
    },
    /// The client did not complete its request within the server's timeout.
    #[error("Request not completed within {timeout:?}; closing the connection.")]
    RequestTimeout {
        /// The server's request timeout.
        timeout: std::time::Duration,
    },
    /// The server already has its maximum number of open connections.
    #[error("Too many open API connections (limit {limit}); close one and retry.")]
    TooManyConnections {
        /// The maximum number of open connections.
        limit: usize,
    },
    /// The request handler panicked; the API keeps serving.
    #[error("Internal error while handling the request.")]
    HandlerPanicked,
}

impl HttpError {
    /// The status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::UnsupportedExpectation { .. } => 417,
            HttpError::RequestTimeout { .. } => 408,
            HttpError::TooManyConnections { .. } => 503,
            HttpError::HandlerPanicked => 500,
            _ => 400,
        }
    }

    /// The fault response for this error.
    pub fn to_response(&self) -> HttpResponse {
        HttpResponse::fault(self.status(), &self.to_string())
    }
}

/// Client-sent bytes made safe to quote in a fault message: lossy UTF-8, control characters
/// replaced, at most [`MAX_QUOTED_CHARS`] characters.
fn quote_client_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut quoted: String = text
        .chars()
        .take(MAX_QUOTED_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(MAX_QUOTED_CHARS).is_some() {
        quoted.push_str("...");
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_response_has_fixed_headers_and_length() {
        let response = HttpResponse::json(200, br#"{"a":1}"#.to_vec());
        assert_eq!(
            text(&response.to_bytes(true)),
            "HTTP/1.1 200 OK\r\nServer: Kiln API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn no_content_has_no_length_or_type() {
        assert_eq!(
            text(&HttpResponse::no_content().to_bytes(false)),
            "HTTP/1.1 204 No Content\r\nServer: Kiln API\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn json_with_204_drops_the_body() {
        assert_eq!(
            HttpResponse::json(204, b"{}".to_vec()),
            HttpResponse::no_content()
        );
    }

    #[test]
    fn invalid_status_becomes_500() {
        assert_eq!(HttpResponse::json(42, b"{}".to_vec()).status(), 500);
        assert_eq!(HttpResponse::json(600, b"{}".to_vec()).status(), 500);
    }

    #[test]
    fn fault_message_is_json_escaped() {
        let response = HttpResponse::fault(400, "bad \"quote\"\n\\ here");
        let value: serde_json::Value = serde_json::from_slice(response.body().unwrap()).unwrap();
        assert_eq!(value["fault_message"], "bad \"quote\"\n\\ here");
        assert_eq!(value.as_object().unwrap().len(), 1);
    }

    #[test]
    fn head_response_keeps_length_but_omits_body() {
        let response = HttpResponse::fault(405, "no");
        let bytes = response.serialize(true, false);
        let wire = text(&bytes);
        assert!(wire.ends_with("\r\n\r\n"));
        let expected_len = response.body().unwrap().len();
        assert!(wire.contains(&format!("Content-Length: {expected_len}\r\n")));
    }

    #[test]
    fn payload_error_message_is_firecrackers() {
        let error = HttpError::PayloadTooLarge {
            len: 51201,
            max: 51200,
        };
        assert_eq!(
            error.to_string(),
            "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
        );
        assert_eq!(error.status(), 400);
    }

    #[test]
    fn every_error_is_a_client_or_server_error() {
        let errors = [
            HttpError::HeadTooLarge { limit: 1 },
            HttpError::InvalidRequestLine,
            HttpError::TransferEncodingNotSupported,
            HttpError::UnsupportedExpectation { value: "x".into() },
            HttpError::IncompleteRequest { received: 3 },
            HttpError::RequestTimeout {
                timeout: std::time::Duration::from_secs(30),
            },
            HttpError::TooManyConnections { limit: 256 },
            HttpError::HandlerPanicked,
        ];
        for error in errors {
            let response = error.to_response();
            assert!((400..=599).contains(&response.status()), "{error:?}");
            assert!(response.body().is_some());
        }
    }

    #[test]
    fn quoted_client_text_is_bounded_and_printable() {
        assert_eq!(quote_client_text(b"a\x01b\xff"), "a?b\u{fffd}");
        let long = quote_client_text(&[b'x'; 200]);
        assert_eq!(long.len(), MAX_QUOTED_CHARS + 3);
    }

    #[test]
    fn methods_round_trip() {
        for token in ["GET", "PUT", "PATCH", "DELETE", "get"] {
            assert_eq!(Method::from_token(token).as_str(), token);
        }
        assert_eq!(Method::from_token("get"), Method::Other("get".into()));
    }
}
