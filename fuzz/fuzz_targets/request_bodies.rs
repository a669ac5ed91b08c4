//! Every endpoint's request body on arbitrary bytes: parsing and validation
//! answer with an error, never a panic. Each body goes through the same
//! function its handler calls before it touches any state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifelora::api::body::parse_json;
use lifelora::api::types::{ChatRequest, CompletionRequest};
use lifelora::api::{chat, feedback, files, fine_tuning, tenants, validate};
use lifelora::config::Settings;
use lifelora::learner::dataset::{self, Method};
use lifelora::model::builtin::byte_tokenizer;
use lifelora::model::chat::ChatTemplate;
use lifelora::model::tokenizer::TextTokenizer;

struct Fixture {
    settings: Settings,
    tokenizer: TextTokenizer,
    chat: ChatTemplate,
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static FIXTURE: Fixture = Fixture {
            settings: Settings::load(None).expect("default settings"),
            tokenizer: TextTokenizer::new(byte_tokenizer().expect("byte tokenizer"), Some("<s>".into()), Some("</s>".into()), true, &[2]),
            chat: ChatTemplate::new(None, "<s>", "</s>").expect("default chat template"),
        };
    }
    FIXTURE.with(|f| {
        let s = &f.settings;
        // /v1/completions, /v1/chat/completions
        if let Ok(r) = parse_json::<CompletionRequest>(data) {
            let _ = validate::sampling(&r.sampling(), &s.engine, &s.limits);
        }
        if let Ok(r) = parse_json::<ChatRequest>(data) {
            let _ = validate::sampling(&r.sampling(), &s.engine, &s.limits);
            if let Ok(messages) = chat::to_template_messages(&r.messages) {
                let _ = f.chat.render(&messages);
            }
        }
        // /v1/feedback, /v1/tenants, /v1/adapters/{name}/train, /v1/fine_tuning/jobs
        let _ = feedback::parse_request(data);
        let _ = tenants::parse_create(data);
        let _ = fine_tuning::parse_train_request(data);
        let _ = fine_tuning::parse_job_request(data, "lifelora-builtin", "main");
        // /v1/adapters/{name}/policy
        if let Ok(v) = parse_json::<serde_json::Value>(data) {
            let _ = lifelora::learner::policy::apply(&s.learning, &v);
        }
        // /v1/adapters (archive upload; the `archive` target explores tar structure)
        let _ = lifelora::lora::archive::unpack_peft(data, 1 << 20);
        // /v1/files, /v1/adapters/{name}/examples, and the lines a job reads
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = files::check_jsonl(text.as_bytes());
            let _ = Method::parse(text);
            let _ = dataset::parse_jsonl(text, &f.tokenizer, &f.chat);
            let _ = dataset::parse_lessons(text, Method::Supervised, &f.tokenizer, &f.chat);
            let _ = dataset::parse_lessons(text, Method::Dpo, &f.tokenizer, &f.chat);
        }
    });
});
