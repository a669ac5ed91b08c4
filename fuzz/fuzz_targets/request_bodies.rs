//! Every endpoint's request body on arbitrary bytes: parsing and validation
//! answer with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifelora::api::body::parse_json;
use lifelora::api::types::{ChatRequest, CompletionRequest};
use lifelora::api::validate;
use lifelora::config::Settings;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static SETTINGS: Settings = Settings::load(None).expect("default settings");
    }
    SETTINGS.with(|s| {
        if let Ok(r) = parse_json::<CompletionRequest>(data) {
            let _ = validate::sampling(&r.sampling(), &s.engine, &s.limits);
        }
        if let Ok(r) = parse_json::<ChatRequest>(data) {
            let _ = validate::sampling(&r.sampling(), &s.engine, &s.limits);
        }
        if let Ok(v) = parse_json::<serde_json::Value>(data) {
            let _ = lifelora::learner::policy::apply(&s.learning, &v);
        }
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = lifelora::api::files::check_jsonl(text.as_bytes());
            let _ = lifelora::learner::dataset::Method::parse(text);
        }
    });
});
