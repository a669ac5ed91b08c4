//! Tenants and keys: with an admin key every /v1 route needs a key; each
//! tenant sees and uses only its own adapters; the admin acts as any tenant;
//! rotated and deleted keys stop working.

mod common;

use common::{assert_openai_error, response_json, TestServer};
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-for-tests-0123456789abcdef";

fn call(s: &TestServer, method: &str, path: &str, key: Option<&str>, tenant: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut r = ureq::request(method, &format!("{}{path}", s.base));
    if let Some(k) = key {
        r = r.set("authorization", &format!("Bearer {k}"));
    }
    if let Some(t) = tenant {
        r = r.set("x-lifelora-tenant", t);
    }
    response_json(match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    })
}

fn upload(s: &TestServer, key: &str, name: &str) -> (u16, Value) {
    let dir = common::fixtures_dir().join("adapters/q_v_r8");
    let mut body = Vec::new();
    for (part, file) in [("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")] {
        body.extend_from_slice(format!("--b\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{file}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(&std::fs::read(dir.join(file)).unwrap());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n--b--\r\n").as_bytes());
    response_json(
        ureq::post(&format!("{}/v1/adapters", s.base))
            .set("authorization", &format!("Bearer {key}"))
            .set("content-type", "multipart/form-data; boundary=b")
            .send_bytes(&body),
    )
}

#[test]
fn keys_isolate_tenants_and_the_admin_manages_them() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN)]);
    // No key, a wrong key: 401 in OpenAI's shape; health stays open.
    let (st, v) = call(&s, "GET", "/v1/models", None, None, None);
    assert_openai_error(st, &v, 401);
    let (st, v) = call(&s, "POST", "/v1/completions", Some("wrong"), None, Some(json!({"model": s.model, "prompt": "x"})));
    assert_openai_error(st, &v, 401);
    assert_eq!(s.get("/health").0, 200);

    let (st, acme) = call(&s, "POST", "/v1/tenants", Some(ADMIN), None, Some(json!({"name": "acme"})));
    assert_eq!(st, 201, "{acme}");
    let acme_key = acme["api_key"].as_str().unwrap().to_string();
    let (_, globex) = call(&s, "POST", "/v1/tenants", Some(ADMIN), None, Some(json!({"name": "globex"})));
    let globex_key = globex["api_key"].as_str().unwrap().to_string();
    let (st, v) = call(&s, "POST", "/v1/tenants", Some(ADMIN), None, Some(json!({"name": "acme"})));
    assert_openai_error(st, &v, 409);
    let (st, v) = call(&s, "POST", "/v1/tenants", Some(&acme_key), None, Some(json!({"name": "evil"})));
    assert_openai_error(st, &v, 403);
    let (st, v) = call(&s, "POST", "/v1/tenants", Some(ADMIN), None, Some(json!({"name": "../etc"})));
    assert_openai_error(st, &v, 400);

    assert_eq!(upload(&s, &acme_key, "support").0, 201);
    // acme sees and uses it; globex gets exactly the 404 of a missing adapter.
    let (_, models) = call(&s, "GET", "/v1/models", Some(&acme_key), None, None);
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
    let (_, models) = call(&s, "GET", "/v1/models", Some(&globex_key), None, None);
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let req = json!({"model": "support", "prompt": "Once", "max_tokens": 3});
    assert_eq!(call(&s, "POST", "/v1/completions", Some(&acme_key), None, Some(req.clone())).0, 200);
    let (st, theirs) = call(&s, "POST", "/v1/completions", Some(&globex_key), None, Some(req.clone()));
    let (_, missing) = call(&s, "POST", "/v1/completions", Some(&globex_key), None, Some(json!({"model": "nothing", "prompt": "Once"})));
    assert_openai_error(st, &theirs, 404);
    assert_eq!(theirs["error"]["code"], missing["error"]["code"]);
    let (st, v) = call(&s, "GET", "/v1/adapters/support", Some(&globex_key), None, None);
    assert_openai_error(st, &v, 404);
    // The admin acts as a tenant through the header.
    assert_eq!(call(&s, "POST", "/v1/completions", Some(ADMIN), Some("acme"), Some(req.clone())).0, 200);
    let mut with_field = req.clone();
    with_field["tenant"] = json!("acme");
    assert_eq!(call(&s, "POST", "/v1/completions", Some(ADMIN), None, Some(with_field.clone())).0, 200);
    let (st, v) = call(&s, "POST", "/v1/completions", Some(&globex_key), None, Some(with_field));
    assert_openai_error(st, &v, 403);
    let (st, v) = call(&s, "POST", "/v1/completions", Some(ADMIN), None, Some(req.clone()));
    assert_openai_error(st, &v, 400);
    let (st, v) = call(&s, "POST", "/v1/completions", Some(ADMIN), Some("nobody"), Some(req.clone()));
    assert_openai_error(st, &v, 404);
    // Rotation: the old key stops working, the new one works.
    let (_, rotated) = call(&s, "POST", "/v1/tenants/acme/rotate_key", Some(ADMIN), None, Some(json!({})));
    let new_key = rotated["api_key"].as_str().unwrap();
    assert_eq!(call(&s, "GET", "/v1/models", Some(&acme_key), None, None).0, 401);
    assert_eq!(call(&s, "POST", "/v1/completions", Some(new_key), None, Some(req.clone())).0, 200);
    // Listing and deletion (with the tenant's adapters).
    let (_, list) = call(&s, "GET", "/v1/tenants", Some(ADMIN), None, None);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(call(&s, "DELETE", "/v1/tenants/acme", Some(ADMIN), None, None).0, 200);
    assert_eq!(call(&s, "GET", "/v1/models", Some(new_key), None, None).0, 401);
    assert!(!s.root.join("adapters/acme/support").exists());
}

#[test]
fn admin_actions_are_audited_with_who_and_when_and_only_the_admin_reads_the_log() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN)]);
    let (_, acme) = call(&s, "POST", "/v1/tenants", Some(ADMIN), None, Some(json!({"name": "acme"})));
    let key = acme["api_key"].as_str().unwrap().to_string();
    assert_eq!(upload(&s, &key, "bot").0, 201);
    assert_eq!(upload(&s, &key, "bot").0, 201);
    assert_eq!(call(&s, "POST", "/v1/adapters/bot/rollback", Some(&key), None, None).0, 200);
    assert_eq!(call(&s, "POST", "/v1/adapters/bot/versions/2/promote", Some(ADMIN), Some("acme"), None).0, 200);
    assert_eq!(call(&s, "DELETE", "/v1/adapters/bot", Some(&key), None, None).0, 200);
    let (_, rotated) = call(&s, "POST", "/v1/tenants/acme/rotate_key", Some(ADMIN), None, None);
    let new_key = rotated["api_key"].as_str().unwrap().to_string();
    assert_eq!(call(&s, "DELETE", "/v1/tenants/acme", Some(ADMIN), None, None).0, 200);

    // A tenant key cannot read the log (403), nor could a deleted one (401).
    let (_, other) = call(&s, "POST", "/v1/tenants", Some(ADMIN), None, Some(json!({"name": "globex"})));
    let (st, v) = call(&s, "GET", "/v1/audit", other["api_key"].as_str(), None, None);
    assert_openai_error(st, &v, 403);

    let (st, log) = call(&s, "GET", "/v1/audit?tenant=acme", Some(ADMIN), None, None);
    assert_eq!(st, 200, "{log}");
    let entries = log["data"].as_array().unwrap();
    let seen: Vec<(&str, &str, &str)> =
        entries.iter().map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap(), e["actor"].as_str().unwrap())).collect();
    assert_eq!(
        seen,
        vec![
            ("tenant.created", "acme", "admin"),
            ("adapter.uploaded", "bot@v1", "tenant:acme"),
            ("adapter.uploaded", "bot@v2", "tenant:acme"),
            ("adapter.rolled_back", "bot@v1", "tenant:acme"),
            ("adapter.promoted", "bot@v2", "admin"),
            ("adapter.deleted", "bot", "tenant:acme"),
            ("tenant.key_rotated", "acme", "admin"),
            ("tenant.deleted", "acme", "admin"),
        ]
    );
    assert!(entries.iter().all(|e| e["created_at"].as_u64().unwrap() > 1_700_000_000));
    // Keys never appear in the log.
    let text = log.to_string();
    assert!(!text.contains(&key) && !text.contains(&new_key) && !text.contains(ADMIN));
    // Paging and filters.
    let (_, page) = call(&s, "GET", "/v1/audit?tenant=acme&limit=3", Some(ADMIN), None, None);
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    assert_eq!(page["has_more"], true);
    let after = page["last_id"].as_str().unwrap();
    let (_, next) = call(&s, "GET", &format!("/v1/audit?tenant=acme&after={after}"), Some(ADMIN), None, None);
    assert_eq!(next["data"][0]["action"], "adapter.rolled_back");
    let (_, only) = call(&s, "GET", "/v1/audit?action=tenant.created", Some(ADMIN), None, None);
    assert_eq!(only["data"].as_array().unwrap().len(), 2);
    let (st, v) = call(&s, "GET", "/v1/audit?limit=0", Some(ADMIN), None, None);
    assert_openai_error(st, &v, 400);
}
