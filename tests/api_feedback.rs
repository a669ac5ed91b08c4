//! The completion log and feedback, black-box over HTTP on the built-in
//! model: completions are logged (plain and streamed) unless `store: false`,
//! feedback on them is acknowledged with 202 once durable and survives a
//! SIGKILL, only the owning tenant may give or see it, and bad feedback is
//! refused with OpenAI-shaped errors.

mod common;

use common::{assert_openai_error, response_json, TestServer};
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-for-feedback-tests-0123456789";

fn call(s: &TestServer, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut r = ureq::request(method, &format!("{}{path}", s.base));
    if let Some(k) = key {
        r = r.set("authorization", &format!("Bearer {k}"));
    }
    response_json(match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    })
}

fn chat(s: &TestServer, key: Option<&str>, extra: Value) -> Value {
    let mut body = json!({"model": s.model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = call(s, "POST", "/v1/chat/completions", key, Some(body));
    assert_eq!(status, 200, "{v}");
    v
}

fn streamed_completion_id(s: &TestServer) -> (String, String) {
    let lines = s.stream("/v1/completions", &json!({"model": s.model, "prompt": "once upon", "max_tokens": 6, "stream": true, "temperature": 0}));
    let mut id = String::new();
    let mut text = String::new();
    for data in lines {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        id = v["id"].as_str().unwrap().to_string();
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    (id, text)
}

#[test]
fn feedback_on_logged_completions_is_accepted_listed_and_survives_a_kill() {
    let root = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(root.path(), None, &[]);
    let c = chat(&s, None, json!({}));
    let id = c["id"].as_str().unwrap();
    let (status, fb) = s.post("/v1/feedback", &json!({"completion_id": id, "rating": -1, "correction": "Hello! How can I help?"}));
    assert_eq!(status, 202, "{fb}");
    assert!(fb["id"].as_str().unwrap().starts_with("fb-"));
    assert_eq!(fb["object"], "feedback");
    assert_eq!(fb["adapter"], Value::Null, "a completion of the base model");

    let (sid, _) = streamed_completion_id(&s);
    let (status, v) = s.post("/v1/feedback", &json!({"completion_id": sid, "rating": "up"}));
    assert_eq!(status, 202, "streamed completions are logged too: {v}");

    // store: false keeps a completion out of the log, so there is nothing to rate.
    let hidden = chat(&s, None, json!({"store": false}));
    let (status, v) = s.post("/v1/feedback", &json!({"completion_id": hidden["id"], "rating": 1}));
    assert_openai_error(status, &v, 404);

    let (_, listing) = s.get("/v1/feedback?adapter=");
    let listing: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["data"].as_array().unwrap().len(), 2);
    assert_eq!(listing["data"][0]["correction"], "Hello! How can I help?");
    let (_, page) = s.get(&format!("/v1/feedback?limit=1&after={}", fb["id"].as_str().unwrap()));
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["data"][0]["rating"], 1);
    assert_eq!(page["has_more"], false);

    // Acknowledged means durable: kill -9 and restart over the same files.
    s.kill();
    let s = TestServer::start_in(root.path(), None, &[]);
    let (_, after) = s.get("/v1/feedback");
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after["data"].as_array().unwrap().len(), 2, "{after}");
}

#[test]
fn only_the_owning_tenant_may_give_or_see_feedback() {
    let s = TestServer::start(None, &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN)]);
    let key = |name: &str| {
        let (status, v) = call(&s, "POST", "/v1/tenants", Some(ADMIN), Some(json!({"name": name})));
        assert_eq!(status, 201, "{v}");
        v["api_key"].as_str().unwrap().to_string()
    };
    let (acme, globex) = (key("acme"), key("globex"));
    let c = chat(&s, Some(&acme), json!({}));
    let body = json!({"completion_id": c["id"], "rating": 1});
    let (status, v) = call(&s, "POST", "/v1/feedback", Some(&globex), Some(body.clone()));
    assert_openai_error(status, &v, 404);
    let (status, v) = call(&s, "POST", "/v1/feedback", None, Some(body.clone()));
    assert_openai_error(status, &v, 401);
    assert_eq!(call(&s, "POST", "/v1/feedback", Some(&acme), Some(body)).0, 202);
    let (_, theirs) = call(&s, "GET", "/v1/feedback", Some(&globex), None);
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
    let (_, ours) = call(&s, "GET", "/v1/feedback", Some(&acme), None);
    assert_eq!(ours["data"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_feedback_gets_openai_errors_and_stores_nothing() {
    let s = TestServer::start(None, &[]);
    let c = chat(&s, None, json!({"n": 2, "temperature": 1.0, "seed": 3}));
    let id = c["id"].as_str().unwrap();
    let huge = "x".repeat(40 * 1024);
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"rating": 1}), 400, "completion_id"),
        (json!({"completion_id": id}), 400, "rating"),
        (json!({"completion_id": id, "rating": 5}), 400, "rating"),
        (json!({"completion_id": id, "rating": "meh"}), 400, "rating"),
        (json!({"completion_id": id, "rating": 0.5}), 400, "rating"),
        (json!({"completion_id": id, "correction": ""}), 400, "correction"),
        (json!({"completion_id": id, "correction": "   "}), 400, "correction"),
        (json!({"completion_id": id, "correction": 42}), 400, "correction"),
        (json!({"completion_id": id, "correction": huge}), 400, "correction"),
        (json!({"completion_id": id, "rating": 1, "comment": huge}), 400, "comment"),
        (json!({"completion_id": id, "rating": 1, "choice_index": 2}), 400, "choice_index"),
        (json!({"completion_id": id, "rating": 1, "choice_index": -1}), 400, "choice_index"),
        (json!({"completion_id": id, "rating": 1, "surprise": true}), 400, "surprise"),
        (json!({"completion_id": "", "rating": 1}), 400, "completion_id"),
        (json!({"completion_id": "chatcmpl-doesnotexist", "rating": 1}), 404, "does not exist"),
    ];
    for (body, status_want, word) in cases {
        let (status, v) = s.post("/v1/feedback", &body);
        assert_openai_error(status, &v, status_want);
        let msg = v["error"]["message"].as_str().unwrap().to_string() + v["error"]["param"].as_str().unwrap_or("");
        assert!(msg.contains(word), "{body}: {v}");
    }
    let (status, v) = s.post_raw("/v1/feedback", "{not json");
    assert_openai_error(status, &v, 400);
    for query in ["limit=abc", "limit=0", "surprise=1"] {
        let (status, v) = call(&s, "GET", &format!("/v1/feedback?{query}"), None, None);
        assert_openai_error(status, &v, 400);
    }
    let (status, v) = call(&s, "POST", "/v1/chat/completions", None, Some(json!({"model": s.model, "messages": [{"role": "user", "content": "x"}], "store": "yes"})));
    assert_openai_error(status, &v, 400);
    let (_, listing) = s.get("/v1/feedback");
    assert_eq!(serde_json::from_str::<Value>(&listing).unwrap()["data"].as_array().unwrap().len(), 0, "nothing was stored");
    // The second choice can be rated.
    assert_eq!(s.post("/v1/feedback", &json!({"completion_id": id, "rating": 1, "choice_index": 1})).0, 202);
}
