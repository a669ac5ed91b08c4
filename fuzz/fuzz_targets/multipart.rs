//! The multipart reader on arbitrary bodies, delivered in small chunks:
//! part counts, header sizes and body limits hold, and every refusal is an
//! error, never a panic.
#![no_main]

use actix_web::http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use actix_web::web::Bytes;
use libfuzzer_sys::fuzz_target;
use lifelora::api::body::{read_multipart_from, MultipartLimits};

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    }
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("multipart/form-data; boundary=fuzz"));
    let chunks: Vec<Result<Bytes, actix_web::error::PayloadError>> = data.chunks(7).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let body = futures_util::stream::iter(chunks);
    let limits = MultipartLimits { max_bytes: 1 << 16, max_parts: 8, max_header_bytes: 256, timeout: std::time::Duration::from_secs(5) };
    RUNTIME.with(|rt| {
        let local = tokio::task::LocalSet::new();
        let _ = local.block_on(rt, read_multipart_from(&headers, body, &limits, &["name", "config", "weights", "archive", "file", "purpose"]));
    });
});
