//! The API's HTTP/1.1 request parser on a byte stream that arrives in chunks, as from a socket:
//! request line, headers, `Content-Length` framing, `Expect: 100-continue`, pipelining, the head
//! and payload limits. Each complete request then goes through the router and body parsing, as
//! the server does. Checks the parser's documented invariants (progress, path shape, body
//! length) besides "never panics".
//!
//! Input: one byte of chunk size (0 means 1), then the stream.

#![no_main]

use api::http::{Parsed, RequestParser, DEFAULT_MAX_PAYLOAD_BYTES};
use api::routes::parse_request;
use kiln_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let chunk = usize::from(input.u8()).max(1);
    let mut parser = RequestParser::new(DEFAULT_MAX_PAYLOAD_BYTES);
    let mut buf = Vec::new();
    loop {
        match parser.parse(&buf) {
            Ok(Parsed::Incomplete) => {
                if input.is_empty() {
                    break;
                }
                buf.extend_from_slice(input.bytes(chunk));
            }
            // The parser reports it once; the next call carries on with the same buffer.
            Ok(Parsed::ExpectContinue) => {}
            Ok(Parsed::Complete(request, used)) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "took {used} of {}",
                    buf.len()
                );
                assert!(request.path.starts_with('/'), "path {:?}", request.path);
                assert!(
                    request.path.bytes().all(|b| b.is_ascii_graphic()),
                    "path {:?}",
                    request.path
                );
                assert!(request.body.len() <= DEFAULT_MAX_PAYLOAD_BYTES);
                match parse_request(request.method.as_str(), &request.path, &request.body) {
                    Ok(_) => {}
                    Err(e) => {
                        let _ = e.to_api_error();
                    }
                }
                buf.drain(..used);
            }
            Err(e) => {
                let _ = e.to_response().to_bytes(false);
                break;
            }
        }
    }
});
