//! Hostile and broken input across every endpoint and file reader: each
//! case is answered with the right 4xx status and an OpenAI error object,
//! the server stays healthy, and nothing is written (no adapter, file,
//! feedback, job or logged completion appears).

mod common;

use common::TestServer;
use serde_json::{json, Value};

const B: &str = "bad-input-boundary";

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    common::multipart_body(B, parts)
}

enum Body {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

fn send(s: &TestServer, method: &str, path: &str, body: Body) -> (u16, Value) {
    let r = ureq::request(method, &format!("{}{path}", s.base));
    let r = match body {
        Body::None => r.call(),
        Body::Json(v) => r.send_json(v),
        Body::Raw(ct, bytes) => r.set("content-type", ct).send_bytes(&bytes),
    };
    common::response_json(r)
}

fn json_body(s: &str) -> Body {
    Body::Raw("application/json", s.as_bytes().to_vec())
}

fn upload(parts: &[(&str, Option<&str>, &[u8])]) -> Body {
    Body::Raw("multipart/form-data; boundary=bad-input-boundary", multipart(parts))
}

fn safetensors_header(header: &str) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v
}

#[test]
fn a_hundred_bad_requests_get_openai_errors_and_change_nothing() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[("LIFELORA_LIMITS__MAX_PROMPT_TOKENS", "200")]);
    let m = s.model.clone();
    let fixture = common::fixtures_dir().join("adapters/q_v_r8");
    let good_config = std::fs::read(fixture.join("adapter_config.json")).unwrap();
    let good_weights = std::fs::read(fixture.join("adapter_model.safetensors")).unwrap();
    let config_with = |patch: Value| {
        let mut c: Value = serde_json::from_slice(&good_config).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        serde_json::to_vec(&c).unwrap()
    };
    let dora = config_with(json!({"use_dora": true}));
    let save = config_with(json!({"modules_to_save": ["lm_head"]}));
    let head = config_with(json!({"target_modules": ["lm_head"]}));
    let bias = config_with(json!({"bias": "all"}));
    let rank = config_with(json!({"r": 4096}));
    let unknown_module = config_with(json!({"target_modules": ["nope_proj"]}));
    let huge_header = {
        let mut v = (u64::MAX / 2).to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        v
    };
    let bad_shape = safetensors_header(r#"{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[8,3],"data_offsets":[0,96]}}"#);
    let bad_dtype = safetensors_header(r#"{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{"dtype":"I64","shape":[8,64],"data_offsets":[0,4096]}}"#);
    let short_data = safetensors_header(r#"{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[8,64],"data_offsets":[0,2048]}}"#);
    let bad_layer = safetensors_header(r#"{"base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[8,64],"data_offsets":[0,0]}}"#);

    let cases: Vec<(&str, String, Body, u16)> = vec![
        // Completions: body shape and fields.
        ("POST", "/v1/completions".into(), json_body(""), 400),
        ("POST", "/v1/completions".into(), json_body("{"), 400),
        ("POST", "/v1/completions".into(), json_body("[]"), 400),
        ("POST", "/v1/completions".into(), json_body("null"), 400),
        ("POST", "/v1/completions".into(), json_body("\"text\""), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"prompt": "x"})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "n": 2.5})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": 5, "prompt": "x"})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": "nope", "prompt": "x"})), 404),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": "../../etc/passwd", "prompt": "x"})), 404),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": "a@vX", "prompt": "x"})), 404),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": []})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": [[]]})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": [1, 99999999]})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": [-1]})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": {"a": 1}})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x".repeat(5000)})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "max_tokens": -1})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "max_tokens": 1e12})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "max_tokens": "ten"})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "temperature": 3})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "temperature": -1})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "top_p": 0})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "top_p": 1.5})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "n": 0})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "n": 10000})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "presence_penalty": 5})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "frequency_penalty": -5})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "stop": [""]})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "stop": "s".repeat(1000)})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "stop": 7})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "logprobs": 50})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "logprobs": -1})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "best_of": 3})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "suffix": "y"})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "stream_options": {"include_usage": true}})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "stream": "yes"})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "store": "no"})), 400),
        ("POST", "/v1/completions".into(), Body::Json(json!({"model": m, "prompt": "x", "seed": "abc"})), 400),
        ("POST", "/v1/completions".into(), Body::Raw("application/json", b"{\"model\": \"\xff\xfe\"}".to_vec()), 400),
        ("POST", "/v1/completions".into(), Body::Raw("application/json", vec![b'['; 100_000]), 400),
        ("POST", "/v1/completions".into(), Body::Raw("application/json", vec![b' '; 5_000_000]), 413),
        // Chat.
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": []})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": "hi"})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"role": "wizard", "content": "x"}]})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"content": "x"}]})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"role": "user", "content": 5}]})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 50})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": m, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0})), 400),
        ("POST", "/v1/chat/completions".into(), Body::Json(json!({"model": "ghost", "messages": [{"role": "user", "content": "x"}]})), 404),
        // Feedback.
        ("POST", "/v1/feedback".into(), Body::Json(json!({})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-none", "rating": 1})), 404),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": 5, "rating": 1})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "", "rating": 1})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "x".repeat(500), "rating": 1})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "rating": 2})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "rating": "meh"})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x"})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "correction": "  "})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "correction": "x".repeat(40_000)})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "rating": 1, "comment": "x".repeat(5000)})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "rating": 1, "choice_index": -1})), 400),
        ("POST", "/v1/feedback".into(), Body::Json(json!({"completion_id": "cmpl-x", "rating": 1, "extra": true})), 400),
        ("GET", "/v1/feedback?limit=0".into(), Body::None, 400),
        ("GET", "/v1/feedback?limit=abc".into(), Body::None, 400),
        ("GET", "/v1/feedback?bogus=1".into(), Body::None, 400),
        // Adapters: uploads and the PEFT reader.
        ("POST", "/v1/adapters".into(), Body::Json(json!({"name": "x"})), 400),
        ("POST", "/v1/adapters".into(), upload(&[("config", None, &good_config), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"../evil"), ("config", None, &good_config), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"/abs"), ("config", None, &good_config), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, "bo\u{0442}".as_bytes()), ("config", None, &good_config), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"a\0b"), ("config", None, &good_config), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, "n".repeat(300).as_bytes()), ("config", None, &good_config), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, b"not json"), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, b"[]"), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &dora), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &save), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &head), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &bias), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &rank), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &unknown_module), ("weights", None, &good_weights)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config), ("weights", None, b"garbage")]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config), ("weights", None, &huge_header)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config), ("weights", None, &bad_shape)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config), ("weights", None, &bad_dtype)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config), ("weights", None, &short_data)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("config", None, &good_config), ("weights", None, &bad_layer)]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("archive", None, b"not a tarball")]), 400),
        ("POST", "/v1/adapters".into(), upload(&[("name", None, b"bot"), ("archive", None, b"x"), ("config", None, &good_config)]), 400),
        ("POST", "/v1/adapters".into(), Body::Raw("multipart/form-data; boundary=bad-input-boundary", b"--bad-input-boundary\r\ngarbage".to_vec()), 400),
        ("GET", "/v1/adapters/ghost".into(), Body::None, 404),
        ("GET", "/v1/adapters/..%2F..%2Fetc".into(), Body::None, 404),
        ("GET", "/v1/adapters/ghost/versions".into(), Body::None, 404),
        ("DELETE", "/v1/adapters/ghost".into(), Body::None, 404),
        ("POST", "/v1/adapters/ghost/rollback".into(), Body::None, 404),
        ("POST", "/v1/adapters/ghost/versions/1/promote".into(), Body::None, 404),
        ("POST", "/v1/adapters/ghost/versions/one/promote".into(), Body::None, 404),
        ("GET", "/v1/adapters/ghost/versions/one/download".into(), Body::None, 400),
        ("GET", "/v1/adapters/ghost/versions/1/download".into(), Body::None, 404),
        ("PUT", "/v1/adapters/ghost/policy".into(), Body::Json(json!({"steps": 3})), 404),
        ("PUT", "/v1/adapters/main/policy".into(), Body::Json(json!({"steps": -3})), 400),
        ("PUT", "/v1/adapters/main/policy".into(), Body::Json(json!({"threads": 3})), 400),
        // Learning.
        ("POST", "/v1/adapters/ghost/train".into(), Body::Json(json!({})), 404),
        ("POST", "/v1/adapters/main/train".into(), Body::Json(json!({"hyperparameters": {"n_steps": 0}})), 400),
        ("POST", "/v1/adapters/main/examples".into(), json_body("not jsonl"), 400),
        ("POST", "/v1/adapters/main/examples".into(), json_body("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}"), 400),
        ("POST", "/v1/fine_tuning/jobs".into(), Body::Json(json!({})), 400),
        ("POST", "/v1/fine_tuning/jobs".into(), Body::Json(json!({"model": m, "training_file": "file-none"})), 400),
        ("POST", "/v1/fine_tuning/jobs".into(), Body::Json(json!({"model": m, "training_file": 7})), 400),
        ("POST", "/v1/fine_tuning/jobs".into(), Body::Json(json!({"model": m, "training_file": "f", "suffix": "../x"})), 400),
        ("GET", "/v1/fine_tuning/jobs/ftjob-none".into(), Body::None, 404),
        ("GET", "/v1/fine_tuning/jobs/ftjob-none/events".into(), Body::None, 404),
        ("POST", "/v1/fine_tuning/jobs/ftjob-none/cancel".into(), Body::None, 404),
        ("GET", "/v1/fine_tuning/jobs?limit=1000".into(), Body::None, 400),
        ("POST", "/v1/files".into(), Body::Json(json!({})), 400),
        ("POST", "/v1/files".into(), upload(&[("purpose", None, b"fine-tune")]), 400),
        ("POST", "/v1/files".into(), upload(&[("purpose", None, b"batch"), ("file", Some("a.jsonl"), b"{}")]), 400),
        ("POST", "/v1/files".into(), upload(&[("purpose", None, b"fine-tune"), ("file", Some("a.jsonl"), b"\xff\xfe")]), 400),
        ("POST", "/v1/files".into(), upload(&[("purpose", None, b"fine-tune"), ("file", Some("a.jsonl"), b"1\n2")]), 400),
        ("GET", "/v1/files/file-none".into(), Body::None, 404),
        ("GET", "/v1/files/file-none/content".into(), Body::None, 404),
        ("DELETE", "/v1/files/file-none".into(), Body::None, 404),
        // Tenants on an open server, unknown routes and methods.
        ("POST", "/v1/tenants".into(), Body::Json(json!({"name": "acme"})), 400),
        ("GET", "/v1/nothing".into(), Body::None, 404),
        ("PATCH", "/v1/completions".into(), Body::None, 404),
        ("GET", "/v1/audit?limit=0".into(), Body::None, 400),
    ];
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for (i, (method, path, body, expected)) in cases.into_iter().enumerate() {
        let (status, v) = send(&s, method, &path, body);
        let shaped = v["error"]["message"].as_str().is_some_and(|m| !m.is_empty())
            && v["error"]["type"].is_string()
            && v["error"].get("param").is_some()
            && v["error"].get("code").is_some();
        if status != expected || !shaped {
            let text = v.to_string();
            wrong.push(format!("case {i}: {method} {path}: {status} (want {expected}): {}", &text[..text.len().min(160)]));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Healthy, and nothing was written.
    assert_eq!(s.get("/health").0, 200);
    let empty = |path: &str| {
        let (status, body) = s.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"], json!([]), "{path} is not empty: {body}");
    };
    for path in ["/v1/adapters", "/v1/files", "/v1/feedback", "/v1/fine_tuning/jobs", "/v1/audit"] {
        empty(path);
    }
    let adapters_dir = s.root.join("adapters");
    let stored: Vec<_> = std::fs::read_dir(&adapters_dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(stored.is_empty(), "the adapter store holds {stored:?}");
    let (status, v) = s.post("/v1/completions", &json!({"model": m, "prompt": [1, 482], "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
}
