//! The OpenAI surface over HTTP on stories260K: response shapes, streaming
//! framing, sampling controls, logprobs, echo, and the error object.

mod common;

use common::{assert_openai_error, TestServer};
use serde_json::{json, Value};

fn server() -> TestServer {
    TestServer::start(Some(&common::stories_dir()), &[])
}

fn chunks(lines: &[String]) -> Vec<Value> {
    assert_eq!(
        lines.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]"
    );
    lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn models_lists_the_directory_name_and_health_is_ok() {
    let s = server();
    assert_eq!(s.model, "stories260K");
    let (status, body) = s.get("/health");
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
}

#[test]
fn completion_has_openai_shape_and_usage() {
    let s = server();
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 17);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 22);
}

#[test]
fn prompts_as_lists_of_strings_and_token_lists_give_one_choice_each() {
    let s = server();
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": s.model, "prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2}),
    );
    assert_eq!(status, 200, "{v}");
    let idx: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": s.model, "prompt": [[1, 482], [1, 82, 508]], "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
}

#[test]
fn streamed_completion_equals_plain_and_reports_usage() {
    let s = server();
    let req =
        json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    let (_, plain) = s.post("/v1/completions", &req);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let chunks = chunks(&s.stream("/v1/completions", &sreq));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 20);
}

#[test]
fn chat_completion_plain_and_streamed_agree() {
    let s = server();
    let req = json!({"model": s.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0});
    let (status, plain) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let chunks = chunks(&s.stream("/v1/chat/completions", &sreq));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[test]
fn same_seed_same_output_and_n_choices_differ() {
    let s = server();
    let req = json!({"model": s.model, "prompt": "Once", "max_tokens": 24, "temperature": 1.0, "seed": 42, "n": 2});
    let (_, a) = s.post("/v1/completions", &req);
    let (_, b) = s.post("/v1/completions", &req);
    assert_eq!(a["choices"], b["choices"]);
    assert_ne!(a["choices"][0]["text"], a["choices"][1]["text"]);
}

#[test]
fn stop_strings_cut_output_also_across_tokens_in_streams() {
    let s = server();
    let base =
        json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0});
    let (_, plain) = s.post("/v1/completions", &base);
    let text = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    // A stop made of characters 3..6, which spans token boundaries.
    let stop: String = chars[3..6].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    let mut req = base.clone();
    req["stop"] = json!([stop]);
    let (_, cut) = s.post("/v1/completions", &req);
    assert_eq!(cut["choices"][0]["text"], expected);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    req["stream"] = json!(true);
    let chunks = chunks(&s.stream("/v1/completions", &req));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, expected);
}

#[test]
fn completion_logprobs_and_echo_cover_prompt_and_output() {
    let s = server();
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": s.model, "prompt": [1, 482, 82], "max_tokens": 3, "temperature": 0, "logprobs": 3, "echo": true}),
    );
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert!(lp["token_logprobs"][0].is_null());
    for i in 1..6 {
        let l = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(l <= 0.0);
        assert!(lp["top_logprobs"][i].as_object().unwrap().len() <= 3);
    }
    // Greedy tokens are the most likely ones.
    for i in 3..6 {
        let best = lp["top_logprobs"][i]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - lp["token_logprobs"][i].as_f64().unwrap()).abs() < 1e-5);
    }
    // max_tokens 0 with echo scores the prompt only.
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": s.model, "prompt": "Once", "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 0);
}

#[test]
fn chat_logprobs_report_top_alternatives() {
    let s = server();
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"model": s.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array());
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = server();
    let m = s.model.clone();
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), 400, None),
        ("/v1/completions", "".into(), 400, None),
        (
            "/v1/completions",
            json!({"prompt": "x"}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "temperature": 3}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "top_p": 0}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "n": 0}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "n": 1000}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": -1}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": 100000}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "presence_penalty": 5}).to_string(),
            400,
            Some("presence_penalty"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "logprobs": 50}).to_string(),
            400,
            Some("logprobs"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": []}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": [99999]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": 5}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x".repeat(3000)}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": 510}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}).to_string(),
            404,
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": "hi"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
                .to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
                .to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string(),
            404,
            Some("model"),
        ),
    ];
    for (path, body, status, param) in cases {
        let (got, v) = s.post_raw(path, &body);
        assert_openai_error(got, &v, status);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "body {body}: {v}");
        }
    }
    // Body over the limit: 413.
    let huge = json!({"model": m, "prompt": "x".repeat(5 * 1024 * 1024)}).to_string();
    let (got, v) = s.post_raw("/v1/completions", &huge);
    assert_openai_error(got, &v, 413);
    // Unknown route: 404 in the same shape.
    let (got, v) = s.post_raw("/v1/nothing", "{}");
    assert_openai_error(got, &v, 404);
    // Still healthy afterwards.
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn metrics_expose_requests_tokens_and_batching() {
    let s = server();
    s.post(
        "/v1/completions",
        &json!({"model": s.model, "prompt": "Once", "max_tokens": 4}),
    );
    let (_, text) = s.get("/metrics");
    for name in [
        "lifelora_http_requests_total",
        "lifelora_http_request_duration_seconds",
        "lifelora_time_to_first_token_seconds",
        "lifelora_prompt_tokens_total",
        "lifelora_generated_tokens_total",
        "lifelora_running_sequences",
        "lifelora_waiting_sequences",
        "lifelora_batch_size",
        "lifelora_kv_cache_bytes",
        "lifelora_adapters_resident",
        "lifelora_adapter_loads_total",
        "lifelora_adapter_load_seconds",
        "lifelora_adapter_cache_hits_total",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(s.metric("lifelora_generated_tokens_total") >= 4.0);
}

fn greedy_ids(s: &TestServer, extra: Value) -> Vec<u64> {
    let mut body = json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "return_token_ids": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

#[test]
fn logit_bias_bans_and_forces_tokens_in_completions_and_chat() {
    let s = server();
    let plain = greedy_ids(&s, json!({}));
    // Banning the first greedy token changes the first token; every other stays possible.
    let banned = greedy_ids(&s, json!({"logit_bias": {plain[0].to_string(): -100}}));
    assert_ne!(banned[0], plain[0]);
    assert!(!banned.contains(&plain[0]), "a banned token never appears: {banned:?}");
    let forced = greedy_ids(&s, json!({"logit_bias": {"42": 100}}));
    assert_eq!(forced, vec![42; 12]);
    // A small bias leaves greedy output alone when it does not change the argmax order.
    assert_eq!(greedy_ids(&s, json!({"logit_bias": {plain[0].to_string(): 0.5}})), plain);

    let chat = |bias: Value| {
        let (status, v) = s.post(
            "/v1/chat/completions",
            &json!({"model": s.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0,
                    "return_token_ids": true, "logit_bias": bias}),
        );
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["token_ids"][0].as_u64().unwrap()
    };
    let first = chat(json!({}));
    assert_ne!(chat(json!({first.to_string(): -100})), first);
}

#[test]
fn logit_bias_min_p_and_repetition_penalty_refuse_bad_values_naming_the_field() {
    let s = server();
    for (field, value) in [
        ("logit_bias", json!({"abc": 1})),
        ("logit_bias", json!({"-1": 1})),
        ("logit_bias", json!({"999999": 1})),
        ("logit_bias", json!({"5": 101})),
        ("logit_bias", json!({"5": "x"})),
        ("min_p", json!(1.5)),
        ("min_p", json!(-0.1)),
        ("repetition_penalty", json!(0)),
        ("repetition_penalty", json!(-1)),
    ] {
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let mut body = if path == "/v1/completions" {
                json!({"model": s.model, "prompt": "x", "max_tokens": 1})
            } else {
                json!({"model": s.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
            };
            body[field] = value.clone();
            let (status, v) = s.post(path, &body);
            assert_openai_error(status, &v, 400);
            assert!(v["error"]["param"].as_str().unwrap().starts_with(field), "{path} {field}={value}: {v}");
        }
    }
}

#[test]
fn repetition_penalty_and_min_p_change_what_is_sampled() {
    let s = server();
    let plain = greedy_ids(&s, json!({}));
    let penalised = greedy_ids(&s, json!({"repetition_penalty": 3.0}));
    assert_ne!(penalised, plain, "a strong penalty moves greedy decoding off the tokens it has seen");
    let distinct = |ids: &[u64]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&penalised) >= distinct(&plain), "{penalised:?} vs {plain:?}");
    // min_p = 1 keeps only the most likely token: sampling at any temperature is greedy.
    let hot = greedy_ids(&s, json!({"temperature": 2.0, "min_p": 1.0, "seed": 7}));
    assert_eq!(hot, plain);
}

#[test]
fn unknown_parameters_are_refused_naming_them_and_harmless_ones_are_accepted() {
    let s = server();
    for (path, body) in [
        ("/v1/completions", json!({"model": s.model, "prompt": "x", "max_tokens": 1})),
        ("/v1/chat/completions", json!({"model": s.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})),
    ] {
        for unknown in ["frobnicate", "tool_choice", "reasoning_effort", "min_tokens"] {
            let mut b = body.clone();
            b[unknown] = json!(1);
            let (status, v) = s.post(path, &b);
            assert_openai_error(status, &v, 400);
            assert_eq!(v["error"]["param"], unknown, "{path}: {v}");
            assert_eq!(v["error"]["code"], "unknown_parameter");
        }
        let mut b = body.clone();
        b["user"] = json!("end-user-7");
        b["service_tier"] = json!("auto");
        b["metadata"] = json!({"team": "search"});
        b["safety_identifier"] = json!("hash-1");
        b["prompt_cache_key"] = json!("k");
        let (status, v) = s.post(path, &b);
        assert_eq!(status, 200, "{path}: {v}");
    }
}
