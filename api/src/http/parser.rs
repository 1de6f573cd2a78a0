//! Incremental, bounded HTTP/1.x request parser.
//!
//! The caller keeps one growing buffer per connection and calls [`RequestParser::parse`] on it
//! each time bytes arrive; on [`Parsed::Complete`] it removes the consumed prefix and carries on
//! with what is left (pipelined requests). The header section is found and parsed once, then only
//! the body length is checked on later calls, so feeding a request byte by byte costs linear time.
//!
//! Limits: the request line and headers together are at most [`MAX_HEAD_BYTES`]; the body at most
//! the `max_payload` given to [`RequestParser::new`], checked against `Content-Length` before any
//! of the body is read. Bodies are framed by `Content-Length` only (no `Transfer-Encoding`); a
//! request without it has no body. Lines end in CRLF.

use super::{quote_client_text, HttpError, HttpRequest, HttpVersion, Method};

/// Most bytes of request line plus headers (including the blank line that ends them).
pub const MAX_HEAD_BYTES: usize = 8192;

/// Firecracker's default limit on a request body (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 51200;

const HEAD_TERMINATOR: &[u8] = b"\r\n\r\n";

/// What [`RequestParser::parse`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// The headers are complete and the client asked `Expect: 100-continue`: it waits for
    /// [`CONTINUE_RESPONSE`](super::CONTINUE_RESPONSE) before sending the body. Reported once per
    /// request; keep feeding the buffer as before.
    ExpectContinue,
    /// A whole request, which took the first `usize` bytes of the buffer.
    Complete(HttpRequest, usize),
}

/// The parsed header section of the request being received.
#[derive(Debug)]
struct RequestHead {
    method: Method,
    path: String,
    query: Option<String>,
    version: HttpVersion,
    content_type: Option<String>,
    keep_alive: bool,
    expects_continue: bool,
    /// Bytes of request line and headers, blank line included.
    head_len: usize,
    /// At most the parser's `max_payload`.
    content_length: usize,
}

/// Parses one request at a time out of a connection's buffer.
///
/// Invariant: between a call that returned `Incomplete` or `ExpectContinue` and the next call, the
/// caller only appends to the buffer. After `Complete(_, n)` the caller drops the first `n` bytes;
/// after an error the parser starts afresh (the caller should close the connection).
#[derive(Debug)]
pub struct RequestParser {
    max_payload: usize,
    /// The header section, once it has been found in the buffer.
    head: Option<RequestHead>,
    /// Bytes at the start of the buffer already searched for the end of the headers.
    scanned: usize,
    continue_reported: bool,
}

impl RequestParser {
    /// A parser that refuses bodies longer than `max_payload` bytes.
    pub fn new(max_payload: usize) -> RequestParser {
        RequestParser {
            max_payload,
            head: None,
            scanned: 0,
            continue_reported: false,
        }
    }

    /// Looks for the next request at the start of `buf` (see the type's invariant).
    pub fn parse(&mut self, buf: &[u8]) -> Result<Parsed, HttpError> {
        let result = self.parse_inner(buf);
        if !matches!(result, Ok(Parsed::Incomplete | Parsed::ExpectContinue)) {
            self.reset();
        }
        result
    }

    /// Whether a request has started (bytes were seen) but is not complete: what an EOF or a
    /// timeout at this point would cut off.
    pub fn in_progress(&self, buf: &[u8]) -> bool {
        !buf.is_empty() || self.head.is_some()
    }

    fn reset(&mut self) {
        self.head = None;
        self.scanned = 0;
        self.continue_reported = false;
    }

    fn parse_inner(&mut self, buf: &[u8]) -> Result<Parsed, HttpError> {
        if self.head.is_none() {
            let searchable = &buf[..buf.len().min(MAX_HEAD_BYTES)];
            let from = self.scanned.saturating_sub(HEAD_TERMINATOR.len() - 1);
            match find(&searchable[from..], HEAD_TERMINATOR) {
                Some(at) => {
                    let head_len = from + at + HEAD_TERMINATOR.len();
                    let head = parse_head(&buf[..head_len - HEAD_TERMINATOR.len()], head_len)?;
                    self.head = Some(self.checked(head)?);
                }
                None if buf.len() >= MAX_HEAD_BYTES => {
                    return Err(HttpError::HeadTooLarge {
                        limit: MAX_HEAD_BYTES,
                    })
                }
                None => {
                    self.scanned = buf.len();
                    return Ok(Parsed::Incomplete);
                }
            }
        }
        let Some(head) = self.head.as_ref() else {
            return Ok(Parsed::Incomplete);
        };
        let total = head.head_len + head.content_length;
        if buf.len() < total {
            if head.expects_continue && !self.continue_reported {
                self.continue_reported = true;
                return Ok(Parsed::ExpectContinue);
            }
            return Ok(Parsed::Incomplete);
        }
        let Some(head) = self.head.take() else {
            return Ok(Parsed::Incomplete);
        };
        let request = HttpRequest {
            method: head.method,
            path: head.path,
            query: head.query,
            version: head.version,
            content_type: head.content_type,
            keep_alive: head.keep_alive,
            body: buf[head.head_len..total].to_vec(),
        };
        Ok(Parsed::Complete(request, total))
    }

    /// Applies the payload limit, before any of the body is read.
    fn checked(&self, head: UncheckedHead) -> Result<RequestHead, HttpError> {
        let too_large = HttpError::PayloadTooLarge {
            len: head.content_length,
            max: self.max_payload,
        };
        let content_length = usize::try_from(head.content_length).map_err(|_| too_large.clone())?;
        if content_length > self.max_payload {
            return Err(too_large);
        }
        Ok(RequestHead {
            method: head.method,
            path: head.path,
            query: head.query,
            version: head.version,
            content_type: head.content_type,
            keep_alive: head.keep_alive,
            // RFC 9110 10.1.1: ignore the expectation from HTTP/1.0 clients and for empty bodies.
            expects_continue: head.expects_continue
                && head.version == HttpVersion::Http11
                && content_length > 0,
            head_len: head.head_len,
            content_length,
        })
    }
}

/// A header section before the payload limit was applied.
struct UncheckedHead {
    method: Method,
    path: String,
    query: Option<String>,
    version: HttpVersion,
    content_type: Option<String>,
    keep_alive: bool,
    expects_continue: bool,
    head_len: usize,
    content_length: u64,
}

/// Parses the request line and headers: `head` is everything before the blank line.
fn parse_head(head: &[u8], head_len: usize) -> Result<UncheckedHead, HttpError> {
    let mut lines = split_crlf(head);
    let request_line = lines.next().unwrap_or_default();
    let (method, path, query, version) = parse_request_line(request_line)?;

    let mut content_length: Option<u64> = None;
    let mut content_type = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expects_continue = false;
    for (index, line) in lines.enumerate() {
        let (name, value) =
            parse_header_line(line).ok_or(HttpError::InvalidHeader { line: index + 1 })?;
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(HttpError::ConflictingContentLength);
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case(b"content-type") {
            let value = String::from_utf8(value.to_vec())
                .map_err(|_| HttpError::InvalidHeader { line: index + 1 })?;
            content_type = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(HttpError::TransferEncodingNotSupported);
        } else if name.eq_ignore_ascii_case(b"expect") {
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err(HttpError::UnsupportedExpectation {
                    value: quote_client_text(value),
                });
            }
            expects_continue = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(trim_whitespace) {
                connection_close |= option.eq_ignore_ascii_case(b"close");
                connection_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let keep_alive = match version {
        HttpVersion::Http11 => !connection_close,
        HttpVersion::Http10 => connection_keep_alive && !connection_close,
    };
    Ok(UncheckedHead {
        method,
        path,
        query,
        version,
        content_type,
        keep_alive,
        expects_continue,
        head_len,
        content_length: content_length.unwrap_or(0),
    })
}

fn parse_request_line(
    line: &[u8],
) -> Result<(Method, String, Option<String>, HttpVersion), HttpError> {
    if !line.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Err(HttpError::InvalidRequestLine);
    }
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::InvalidRequestLine);
    };
    if method.is_empty() || !method.iter().copied().all(is_token_byte) {
        return Err(HttpError::InvalidMethod {
            method: quote_client_text(method),
        });
    }
    let version = match version {
        b"HTTP/1.1" => HttpVersion::Http11,
        b"HTTP/1.0" => HttpVersion::Http10,
        other => {
            return Err(HttpError::UnsupportedVersion {
                version: quote_client_text(other),
            })
        }
    };
    let (path, query) = parse_target(target)?;
    // The whole line is ASCII (checked above), so these conversions cannot lose anything.
    let method = Method::from_token(&String::from_utf8_lossy(method));
    Ok((method, path, query, version))
}

/// Splits an origin-form target (`/path?query`) or an absolute-form one (`http://host/path?query`,
/// which RFC 9112 3.2.2 requires servers to accept) into path and query.
fn parse_target(target: &[u8]) -> Result<(String, Option<String>), HttpError> {
    let invalid = || HttpError::InvalidTarget {
        target: quote_client_text(target),
    };
    let origin_form: &[u8] = if target.starts_with(b"/") {
        target
    } else {
        let scheme_len = if starts_with_ignore_case(target, b"http://") {
            "http://".len()
        } else if starts_with_ignore_case(target, b"https://") {
            "https://".len()
        } else {
            return Err(invalid());
        };
        let after_scheme = &target[scheme_len..];
        let authority_len = after_scheme
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(after_scheme.len());
        if authority_len == 0 {
            return Err(invalid());
        }
        // What is left is empty, `/path...` or `?query`.
        &after_scheme[authority_len..]
    };
    let (path, query) = match origin_form.iter().position(|&b| b == b'?') {
        Some(at) => (&origin_form[..at], Some(&origin_form[at + 1..])),
        None => (origin_form, None),
    };
    // An absolute-form target with an empty path means `/` (RFC 9112 3.2.2).
    let path: &[u8] = if path.is_empty() { b"/" } else { path };
    if path.contains(&b'#') {
        return Err(invalid());
    }
    // The request line is visible ASCII, so these are lossless.
    Ok((
        String::from_utf8_lossy(path).into_owned(),
        query.map(|q| String::from_utf8_lossy(q).into_owned()),
    ))
}

/// `name: value` with a token name (no space before the colon, RFC 9112 5.1) and a value of
/// visible characters, spaces, tabs and obs-text; returns the value without surrounding whitespace.
/// A line starting with whitespace (obsolete folding) has no token name and is refused.
fn parse_header_line(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().copied().all(is_token_byte) {
        return None;
    }
    let value_ok = value
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80);
    value_ok.then(|| (name, trim_whitespace(value)))
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    let invalid = || HttpError::InvalidContentLength {
        value: quote_client_text(value),
    };
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    value.iter().try_fold(0u64, |length, &digit| {
        length
            .checked_mul(10)
            .and_then(|l| l.checked_add(u64::from(digit - b'0')))
            .ok_or_else(invalid)
    })
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_whitespace(bytes: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ws(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Splits on CRLF. A bare CR or LF stays inside its line, where the line checks refuse it.
fn split_crlf(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        match find(current, b"\r\n") {
            Some(at) => {
                rest = Some(&current[at + 2..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Parsed, HttpError> {
        RequestParser::new(DEFAULT_MAX_PAYLOAD_BYTES).parse(bytes)
    }

    fn complete(bytes: &[u8]) -> (HttpRequest, usize) {
        match parse_all(bytes) {
            Ok(Parsed::Complete(request, consumed)) => (request, consumed),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let bytes = b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (request, consumed) = complete(bytes);
        assert_eq!(consumed, bytes.len());
        assert_eq!(request.method, Method::Get);
        assert_eq!(request.path, "/machine-config");
        assert_eq!(request.query, None);
        assert_eq!(request.version, HttpVersion::Http11);
        assert!(request.keep_alive);
        assert!(request.body.is_empty());
    }

    #[test]
    fn put_with_body() {
        let bytes = b"PUT /boot-source HTTP/1.1\r\nContent-Type: application/json\r\n\
                      Content-Length: 13\r\n\r\n{\"a\": \"b c\"}!";
        let (request, consumed) = complete(bytes);
        assert_eq!(consumed, bytes.len());
        assert_eq!(request.method, Method::Put);
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.body, b"{\"a\": \"b c\"}!");
        assert_eq!(request.content_length(), 13);
    }

    #[test]
    fn query_is_kept_apart_from_path() {
        let (request, _) = complete(b"GET /vm/config?pretty=1 HTTP/1.1\r\n\r\n");
        assert_eq!(request.path, "/vm/config");
        assert_eq!(request.query.as_deref(), Some("pretty=1"));
    }

    #[test]
    fn absolute_form_target_is_accepted() {
        let (request, _) = complete(b"PATCH http://localhost/vm?x HTTP/1.1\r\n\r\n");
        assert_eq!(request.method, Method::Patch);
        assert_eq!(request.path, "/vm");
        assert_eq!(request.query.as_deref(), Some("x"));
        let (request, _) = complete(b"GET http://localhost HTTP/1.1\r\n\r\n");
        assert_eq!(request.path, "/");
        let (request, _) = complete(b"GET http://localhost?q=1 HTTP/1.1\r\n\r\n");
        assert_eq!(request.path, "/");
        assert_eq!(request.query.as_deref(), Some("q=1"));
    }

    #[test]
    fn body_fed_byte_by_byte() {
        let bytes = b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let mut parser = RequestParser::new(DEFAULT_MAX_PAYLOAD_BYTES);
        for end in 0..bytes.len() {
            assert_eq!(
                parser.parse(&bytes[..end]),
                Ok(Parsed::Incomplete),
                "at {end}"
            );
        }
        match parser.parse(bytes) {
            Ok(Parsed::Complete(request, consumed)) => {
                assert_eq!(consumed, bytes.len());
                assert_eq!(request.body, b"hello");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pipelined_requests() {
        let first = b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".as_slice();
        let second = b"GET /b HTTP/1.1\r\n\r\n".as_slice();
        let mut buf = [first, second].concat();
        let mut parser = RequestParser::new(DEFAULT_MAX_PAYLOAD_BYTES);
        let Ok(Parsed::Complete(request, consumed)) = parser.parse(&buf) else {
            panic!("first request incomplete");
        };
        assert_eq!((request.path.as_str(), consumed), ("/a", first.len()));
        buf.drain(..consumed);
        let Ok(Parsed::Complete(request, consumed)) = parser.parse(&buf) else {
            panic!("second request incomplete");
        };
        assert_eq!((request.path.as_str(), consumed), ("/b", second.len()));
    }

    #[test]
    fn header_section_too_large() {
        let mut bytes = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        let mut parser = RequestParser::new(DEFAULT_MAX_PAYLOAD_BYTES);
        assert_eq!(parser.parse(&bytes[..100]), Ok(Parsed::Incomplete));
        let error = parser.parse(&bytes).unwrap_err();
        assert_eq!(
            error,
            HttpError::HeadTooLarge {
                limit: MAX_HEAD_BYTES
            }
        );
        assert_eq!(error.status(), 400);
        // Also when the terminator arrives, but past the limit, in one read.
        bytes.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            parse_all(&bytes),
            Err(HttpError::HeadTooLarge { .. })
        ));
    }

    #[test]
    fn head_exactly_at_limit_is_accepted() {
        let mut bytes = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        let filler = MAX_HEAD_BYTES - bytes.len() - 4;
        bytes.extend(std::iter::repeat_n(b'a', filler));
        bytes.extend_from_slice(b"\r\n\r\n");
        assert_eq!(bytes.len(), MAX_HEAD_BYTES);
        assert!(matches!(parse_all(&bytes), Ok(Parsed::Complete(_, _))));
    }

    #[test]
    fn payload_over_limit_refused_before_body() {
        let mut parser = RequestParser::new(100);
        let error = parser
            .parse(b"PUT /x HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "Request payload with size 101 is larger than the limit of 100 allowed by server."
        );
        assert_eq!(error.status(), 400);
        let huge = parse_all(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n");
        assert!(matches!(huge, Err(HttpError::InvalidContentLength { .. })));
    }

    #[test]
    fn payload_at_limit_accepted() {
        let mut parser = RequestParser::new(3);
        let result = parser.parse(b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert!(matches!(result, Ok(Parsed::Complete(_, _))));
    }

    #[test]
    fn chunked_refused() {
        let result =
            parse_all(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
        assert_eq!(result, Err(HttpError::TransferEncodingNotSupported));
    }

    #[test]
    fn bad_version_refused() {
        for line in [
            "GET / HTTP/2.0",
            "GET / HTTP/1.2",
            "GET / http/1.1",
            "GET / HTTP/1",
        ] {
            let result = parse_all(format!("{line}\r\n\r\n").as_bytes());
            assert!(
                matches!(result, Err(HttpError::UnsupportedVersion { .. })),
                "{line}: {result:?}"
            );
        }
        let error = parse_all(b"GET / HTTP/3\r\n\r\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "Unsupported HTTP version `HTTP/3`: use HTTP/1.0 or HTTP/1.1."
        );
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        let (request, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(request.version, HttpVersion::Http10);
        assert!(!request.keep_alive);
        let (request, _) = complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(request.keep_alive);
        let (request, _) = complete(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n");
        assert!(!request.keep_alive);
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let (request, _) = complete(
            b"PUT /x HTTP/1.1\r\ncontent-length: 2\r\ncOnTeNt-TyPe:  text/plain \r\n\r\nok",
        );
        assert_eq!(request.body, b"ok");
        assert_eq!(request.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn missing_content_length_means_no_body() {
        let bytes = b"PUT /x HTTP/1.1\r\n\r\n{}";
        let (request, consumed) = complete(bytes);
        assert!(request.body.is_empty());
        assert_eq!(consumed, bytes.len() - 2);
    }

    #[test]
    fn expect_continue_reported_once() {
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let mut buf = head.to_vec();
        let mut parser = RequestParser::new(DEFAULT_MAX_PAYLOAD_BYTES);
        assert_eq!(parser.parse(&buf[..10]), Ok(Parsed::Incomplete));
        assert_eq!(parser.parse(&buf), Ok(Parsed::ExpectContinue));
        assert_eq!(parser.parse(&buf), Ok(Parsed::Incomplete));
        buf.extend_from_slice(b"da");
        assert_eq!(parser.parse(&buf), Ok(Parsed::Incomplete));
        buf.extend_from_slice(b"ta");
        let Ok(Parsed::Complete(request, consumed)) = parser.parse(&buf) else {
            panic!("incomplete");
        };
        assert_eq!(
            (request.body.as_slice(), consumed),
            (b"data".as_slice(), buf.len())
        );
    }

    #[test]
    fn expect_continue_not_reported_when_body_is_there_or_empty() {
        let with_body = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}";
        assert!(matches!(parse_all(with_body), Ok(Parsed::Complete(_, _))));
        let empty = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n";
        assert!(matches!(parse_all(empty), Ok(Parsed::Complete(_, _))));
        let other = parse_all(b"PUT /x HTTP/1.1\r\nExpect: something\r\n\r\n").unwrap_err();
        assert_eq!(other.status(), 417);
    }

    #[test]
    fn malformed_requests_refused() {
        type IsExpected = fn(&HttpError) -> bool;
        let cases: &[(&[u8], IsExpected)] = &[
            (b"GET\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidRequestLine)
            }),
            (b"GET  / HTTP/1.1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidRequestLine)
            }),
            (b"GET / HTTP/1.1 x\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidRequestLine)
            }),
            (b"G(T / HTTP/1.1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidMethod { .. })
            }),
            (b"GET x HTTP/1.1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidTarget { .. })
            }),
            (b"GET * HTTP/1.1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidTarget { .. })
            }),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidRequestLine)
            }),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidHeader { line: 1 })
            }),
            (b"GET / HTTP/1.1\r\nA: b\r\nBad Name: x\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidHeader { line: 2 })
            }),
            (b"GET / HTTP/1.1\r\nName : x\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidHeader { .. })
            }),
            (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidHeader { .. })
            }),
            (b"GET / HTTP/1.1\r\nA: b\nB: c\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidHeader { .. })
            }),
            (b"GET / HTTP/1.1\r\nA: b\x00\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidHeader { .. })
            }),
            (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidContentLength { .. })
            }),
            (b"PUT / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", |e| {
                matches!(e, HttpError::InvalidContentLength { .. })
            }),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                |e| matches!(e, HttpError::ConflictingContentLength),
            ),
            (b"\r\n\r\n", |e| matches!(e, HttpError::InvalidRequestLine)),
        ];
        for (bytes, is_expected) in cases {
            let error = parse_all(bytes).expect_err(&String::from_utf8_lossy(bytes));
            assert!(
                is_expected(&error),
                "{:?}: {error:?}",
                String::from_utf8_lossy(bytes)
            );
            assert!((400..500).contains(&error.status()));
        }
    }

    #[test]
    fn repeated_equal_content_length_accepted() {
        let (request, _) =
            complete(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nz");
        assert_eq!(request.body, b"z");
    }

    #[test]
    fn parser_is_reusable_after_error() {
        let mut parser = RequestParser::new(10);
        assert!(parser.parse(b"BAD\r\n\r\n").is_err());
        assert!(matches!(
            parser.parse(b"GET / HTTP/1.1\r\n\r\n"),
            Ok(Parsed::Complete(_, _))
        ));
    }
}
