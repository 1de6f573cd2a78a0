//! The guest's HTTP/1.x requests to MMDS, and the answers, as Firecracker gives them.
//!
//! Everything here is guest input: the request head is at most [`MAX_HEAD_BYTES`], a body (MMDS
//! requests have none, but a client may send one) at most [`MAX_BODY_BYTES`], and anything that
//! is not a well-formed request gets a 400 and the connection's end, never a panic.

use std::time::Instant;

use super::store::{MmdsStore, MmdsVersion, OutputFormat, StoreError};

/// The longest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8192;
/// The longest request body taken (and ignored).
pub const MAX_BODY_BYTES: usize = 8192;
/// Where version 2 hands out tokens.
pub const TOKEN_PATH: &str = "/latest/api/token";

const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];
/// Token requests through a proxy are refused (EC2's and Firecracker's rule against SSRF).
const REJECTED_HEADER: &str = "x-forwarded-for";

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without scheme, host or query (`/latest/meta-data`).
    pub path: String,
    /// The request's HTTP minor version (`HTTP/1.0` or `HTTP/1.1`).
    pub minor_version: u8,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, names: &[&str]) -> Option<&str> {
        self.headers
            .iter()
            .find(|(name, _)| names.contains(&name.as_str()))
            .map(|(_, value)| value.as_str())
    }
}

/// What the bytes received so far make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// A request, and how many bytes it took.
    Complete(Request, usize),
    /// Not a request: answer 400 with this reason and close.
    Invalid(&'static str),
}

/// Parses the start of `buf` as one request.
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES {
            Parsed::Invalid("Request headers too long.")
        } else {
            Parsed::Incomplete
        };
    };
    if head_end > MAX_HEAD_BYTES {
        return Parsed::Invalid("Request headers too long.");
    }
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parsed::Invalid("Invalid request.");
    };
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(uri), Some(version), None) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Parsed::Invalid("Invalid request.");
    };
    let minor_version = match version {
        "HTTP/1.0" => 0,
        "HTTP/1.1" => 1,
        _ => return Parsed::Invalid("Unsupported HTTP version."),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Parsed::Invalid("Invalid request.");
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Invalid("Invalid header.");
        };
        if name.is_empty() || name.contains(' ') {
            return Parsed::Invalid("Invalid header.");
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let body_len = match headers.iter().find(|(name, _)| name == "content-length") {
        None => 0,
        Some((_, value)) => match value.parse::<usize>() {
            Ok(n) if n <= MAX_BODY_BYTES => n,
            Ok(_) => return Parsed::Invalid("Request body too long."),
            Err(_) => return Parsed::Invalid("Invalid Content-Length."),
        },
    };
    let total = head_end + 4 + body_len;
    if buf.len() < total {
        return Parsed::Incomplete;
    }
    Parsed::Complete(
        Request {
            method: method.to_string(),
            path: request_path(uri),
            minor_version,
            headers,
        },
        total,
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `http://169.254.169.254/a/b?x` → `/a/b`; `/a/b` stays.
fn request_path(uri: &str) -> String {
    let without_scheme = uri
        .strip_prefix("http://")
        .map(|rest| rest.find('/').map_or("", |slash| &rest[slash..]))
        .unwrap_or(uri);
    let path = without_scheme.split(['?', '#']).next().unwrap_or_default();
    path.to_string()
}

/// An answer to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: String,
    /// `application/json` or `text/plain`.
    pub content_type: &'static str,
    /// The methods allowed, for a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            content_type: "application/json",
            allow: None,
        }
    }

    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            content_type: "text/plain",
            ..Self::new(status, body)
        }
    }

    /// A 400 for bytes that are not a request.
    pub fn bad_request(reason: &str) -> Self {
        Self::new(400, reason)
    }

    /// The response as it goes on the wire; the connection closes after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            501 => "Not Implemented",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nServer: Kiln MMDS\r\nConnection: close\r\n\
             Content-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// Answers `request` from `store` (Firecracker's rules for each version).
pub fn respond(store: &mut MmdsStore, request: &Request, now: Instant) -> Response {
    if request.path.is_empty() {
        return Response::new(400, "Invalid URI.");
    }
    match (store.version(), request.method.as_str()) {
        (MmdsVersion::V1, "GET") => get(store, request),
        (MmdsVersion::V1, _) => Response {
            allow: Some("GET"),
            ..Response::new(405, "Not allowed HTTP method.")
        },
        (MmdsVersion::V2, "GET") => {
            let Some(token) = request.header(&TOKEN_HEADERS) else {
                return Response::new(
                    401,
                    "No MMDS token provided. Use `X-metadata-token` header to specify the \
                     session token.",
                );
            };
            if !store.token_is_valid(token, now) {
                return Response::new(401, "MMDS token not valid.");
            }
            get(store, request)
        }
        (MmdsVersion::V2, "PUT") => put_token(store, request, now),
        (MmdsVersion::V2, _) => Response {
            allow: Some("GET, PUT"),
            ..Response::new(405, "Not allowed HTTP method.")
        },
    }
}

fn get(store: &MmdsStore, request: &Request) -> Response {
    let wants_json = request
        .header(&["accept"])
        .is_some_and(|accept| accept.contains("application/json"));
    let format = if wants_json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match store.lookup(&request.path, format) {
        Ok(body) if format == OutputFormat::Json && !store.imds_compat() => {
            Response::new(200, body)
        }
        Ok(body) => Response::text(200, body),
        Err(StoreError::NotFound) => {
            Response::new(404, format!("Resource not found: {}.", request.path))
        }
        Err(e @ StoreError::UnsupportedValueType) => Response::new(501, e.to_string()),
        Err(e) => Response::new(400, e.to_string()),
    }
}

fn put_token(store: &mut MmdsStore, request: &Request, now: Instant) -> Response {
    if request.header(&[REJECTED_HEADER]).is_some() {
        return Response::new(400, "Unsupported header name. Key: X-Forwarded-For.");
    }
    if request.path.replace("//", "/").trim_end_matches('/') != TOKEN_PATH {
        return Response::new(404, format!("Resource not found: {}.", request.path));
    }
    let Some(ttl) = request.header(&TTL_HEADERS) else {
        return Response::new(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header \
             to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = ttl.parse::<u32>() else {
        return Response::new(
            400,
            format!("Invalid value. Key:X-metadata-token-ttl-seconds; Value:{ttl}"),
        );
    };
    match store.new_token(ttl, now) {
        Ok(token) => Response::text(200, token),
        Err(e) => Response::new(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(raw: &str) -> Request {
        match parse(raw.as_bytes()) {
            Parsed::Complete(request, len) => {
                assert_eq!(len, raw.len());
                request
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn store(version: MmdsVersion) -> MmdsStore {
        let mut store = MmdsStore::new(4096);
        store
            .put(json!({"latest": {"meta-data": {"id": "i-1"}, "n": 5}}))
            .unwrap();
        store.configure(version, false);
        store
    }

    #[test]
    fn parsing_is_bounded_and_strict() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Incomplete);
        let r = request(
            "GET http://169.254.169.254/latest?x=1 HTTP/1.0\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(r.path, "/latest");
        assert_eq!(r.minor_version, 0);
        assert_eq!(
            r.headers,
            [("accept".to_string(), "application/json".to_string())]
        );
        assert_eq!(
            request("GET http://169.254.169.254 HTTP/1.1\r\n\r\n").path,
            ""
        );
        let with_body = "PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(request(with_body).method, "PUT");
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"),
            Parsed::Incomplete
        );
        for bad in [
            "GET / HTTP/2\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "get / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad.as_bytes()), Parsed::Invalid(_)),
                "{bad:?}"
            );
        }
        let endless = vec![b'a'; MAX_HEAD_BYTES + 1];
        assert!(matches!(parse(&endless), Parsed::Invalid(_)));
        assert!(matches!(
            parse(&[0xff, 0xfe, b'\r', b'\n', b'\r', b'\n']),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn version_1_serves_gets_only() {
        let mut s = store(MmdsVersion::V1);
        let now = Instant::now();
        let r = respond(
            &mut s,
            &request("GET /latest/meta-data/id HTTP/1.1\r\n\r\n"),
            now,
        );
        assert_eq!(
            (r.status, r.body.as_str(), r.content_type),
            (200, "i-1", "text/plain")
        );
        let r = respond(
            &mut s,
            &request("GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n"),
            now,
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body, r#"{"meta-data":{"id":"i-1"},"n":5}"#);
        let r = respond(&mut s, &request("GET /latest/n HTTP/1.1\r\n\r\n"), now);
        assert_eq!(r.status, 501);
        let r = respond(&mut s, &request("GET /nope HTTP/1.1\r\n\r\n"), now);
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "Resource not found: /nope.")
        );
        let r = respond(
            &mut s,
            &request("PUT /latest/api/token HTTP/1.1\r\n\r\n"),
            now,
        );
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        let r = respond(&mut s, &request("GET http://x HTTP/1.1\r\n\r\n"), now);
        assert_eq!((r.status, r.body.as_str()), (400, "Invalid URI."));
    }

    #[test]
    fn version_2_wants_a_live_token() {
        let mut s = store(MmdsVersion::V2);
        let now = Instant::now();
        let get = "GET /latest/meta-data/id HTTP/1.1\r\n\r\n";
        let r = respond(&mut s, &request(get), now);
        assert_eq!(r.status, 401);
        assert!(r.body.starts_with("No MMDS token provided"), "{}", r.body);
        let r = respond(
            &mut s,
            &request("PUT /latest/api/token HTTP/1.1\r\n\r\n"),
            now,
        );
        assert_eq!(r.status, 400);
        assert!(r.body.starts_with("Token time to live value not found"));
        let ask = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n";
        let proxied = format!("{}X-Forwarded-For: 1.2.3.4\r\n\r\n", &ask[..ask.len() - 2]);
        assert_eq!(respond(&mut s, &request(&proxied), now).status, 400);
        let r = respond(
            &mut s,
            &request("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n"),
            now,
        );
        assert_eq!(r.status, 400);
        assert!(
            r.body.starts_with("Invalid time to live value"),
            "{}",
            r.body
        );
        let token = respond(&mut s, &request(ask), now);
        assert_eq!((token.status, token.content_type), (200, "text/plain"));
        let with = |token: &str| {
            format!("GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n")
        };
        let r = respond(&mut s, &request(&with(&token.body)), now);
        assert_eq!((r.status, r.body.as_str()), (200, "i-1"));
        let r = respond(&mut s, &request(&with("bogus")), now);
        assert_eq!((r.status, r.body.as_str()), (401, "MMDS token not valid."));
        let later = now + std::time::Duration::from_secs(61);
        assert_eq!(
            respond(&mut s, &request(&with(&token.body)), later).status,
            401
        );
        let aws = format!(
            "GET /latest/meta-data/id HTTP/1.1\r\nX-aws-ec2-metadata-token: {}\r\n\r\n",
            token.body
        );
        assert_eq!(respond(&mut s, &request(&aws), now).status, 200);
        let r = respond(&mut s, &request("DELETE / HTTP/1.1\r\n\r\n"), now);
        assert_eq!((r.status, r.allow), (405, Some("GET, PUT")));
    }

    #[test]
    fn responses_on_the_wire() {
        let bytes = Response::text(200, "abc").to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nabc"), "{text}");
    }
}
