//! Tenants as a hostile one (or a careless admin) meets them, over HTTP on
//! the built-in model: a deleted tenant leaves nothing to the next tenant
//! of its name, even with a job running at deletion or a crash mid-way;
//! a gate-rejected version is never served until promoted by hand; job
//! queues, storage and feedback are bounded per tenant, and usage shows
//! it; `/metrics` can require a token and hide tenant names; a short
//! admin key refuses to start.

mod common;

use std::time::{Duration, Instant};

use common::{multipart_body, peft_adapter, response_json, TestServer, BUILTIN_LAYERS, BUILTIN_SITES};
use serde_json::{json, Value};

const ADMIN: &str = "hostile-tenants-admin-key-0123456789abcdef";
const B: &str = "tenants-boundary";

/// A client with a key (None: no Authorization header).
struct Client<'a> {
    s: &'a TestServer,
    key: Option<String>,
}

impl Client<'_> {
    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = ureq::request(method, &format!("{}{path}", self.s.base)).timeout(Duration::from_secs(120));
        match &self.key {
            Some(k) => r.set("authorization", &format!("Bearer {k}")),
            None => r,
        }
    }
    fn get(&self, path: &str) -> (u16, Value) {
        response_json(self.req("GET", path).call())
    }
    fn send(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        response_json(self.req(method, path).send_json(body))
    }
    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, body)
    }
    fn raw(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        response_json(self.req("POST", path).set("content-type", content_type).send_bytes(body))
    }
    fn multipart(&self, path: &str, parts: &[(&str, Option<&str>, &[u8])]) -> (u16, Value) {
        self.raw(path, &format!("multipart/form-data; boundary={B}"), &multipart_body(B, parts))
    }
    fn upload_adapter(&self, name: &str, rank: usize) -> (u16, Value) {
        let (c, w) = peft_adapter(BUILTIN_LAYERS, &BUILTIN_SITES[..1], rank, json!({}), &|_, _| {});
        self.multipart("/v1/adapters", &[("name", None, name.as_bytes()), ("config", None, &c), ("weights", None, &w)])
    }
    fn upload_file(&self, content: &[u8]) -> (u16, Value) {
        self.multipart("/v1/files", &[("purpose", None, b"fine-tune"), ("file", Some("train.jsonl"), content)])
    }
    fn data(&self, path: &str) -> Vec<Value> {
        let (status, v) = self.get(path);
        assert_eq!(status, 200, "{path}: {v}");
        v["data"].as_array().cloned().unwrap_or_default()
    }
}

fn admin(s: &TestServer) -> Client<'_> {
    Client { s, key: Some(ADMIN.to_string()) }
}

fn create_tenant<'a>(s: &'a TestServer, name: &str) -> Client<'a> {
    let (status, v) = admin(s).post("/v1/tenants", json!({"name": name}));
    assert_eq!(status, 201, "{v}");
    Client { s, key: Some(v["api_key"].as_str().unwrap().to_string()) }
}

/// Fine-tuning JSONL of `n` prompt/completion lines.
fn training_lines(n: usize) -> Vec<u8> {
    (0..n).map(|i| format!("{{\"prompt\": \"question {i}?\", \"completion\": \" answer {i}.\"}}\n")).collect::<String>().into_bytes()
}

fn wait_status(c: &Client, job: &str, wanted: &[&str], timeout: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, v) = c.get(&format!("/v1/fine_tuning/jobs/{job}"));
        assert_eq!(status, 200, "{v}");
        if wanted.contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(started.elapsed() < timeout, "job {job} still {} after {timeout:?}", v["status"]);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_learner_ready(s: &TestServer) {
    let started = Instant::now();
    while !s.get("/health").1.contains("\"learner\":\"ready\"") {
        assert!(started.elapsed() < Duration::from_secs(120), "the learner never got ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything a tenant could have stored, created through the API.
struct Footprint {
    completion: String,
    file: String,
    job: String,
}

fn leave_a_footprint(s: &TestServer, t: &Client) -> Footprint {
    assert_eq!(t.upload_adapter("bot", 2).0, 201);
    let (status, c) = t.post("/v1/completions", json!({"model": "bot", "prompt": "hello", "max_tokens": 4}));
    assert_eq!(status, 200, "{c}");
    let completion = c["id"].as_str().unwrap().to_string();
    let (status, v) = t.post("/v1/feedback", json!({"completion_id": completion, "rating": -1, "correction": "a secret answer"}));
    assert_eq!(status, 202, "{v}");
    let (status, f) = t.upload_file(&training_lines(40));
    assert_eq!(status, 200, "{f}");
    let file = f["id"].as_str().unwrap().to_string();
    let (status, v) = t.raw("/v1/adapters/main/examples", "application/jsonl", &training_lines(3));
    assert_eq!(status, 200, "{v}");
    for adapter in ["bot", "main"] {
        let (status, v) = t.send("PUT", &format!("/v1/adapters/{adapter}/policy"), json!({"steps": 7}));
        assert_eq!(status, 200, "{v}");
    }
    // A long job from the file, running when the tenant is deleted.
    wait_learner_ready(s);
    let (status, j) = t.post("/v1/fine_tuning/jobs", json!({"model": s.model, "training_file": file, "suffix": "grown", "hyperparameters": {"n_epochs": 20}}));
    assert_eq!(status, 200, "{j}");
    let job = j["id"].as_str().unwrap().to_string();
    wait_status(t, &job, &["running"], Duration::from_secs(60));
    Footprint { completion, file, job }
}

/// A tenant that must see nothing: every endpoint that lists or reads.
fn assert_sees_nothing(s: &TestServer, t: &Client, old: &Footprint) {
    for path in ["/v1/adapters", "/v1/files", "/v1/feedback", "/v1/fine_tuning/jobs"] {
        assert_eq!(t.data(path), Vec::<Value>::new(), "{path}");
    }
    assert_eq!(t.data("/v1/models").len(), 1, "only the base model");
    for path in [
        "/v1/adapters/bot".to_string(),
        "/v1/adapters/bot/versions".to_string(),
        "/v1/adapters/bot/versions/1/download".to_string(),
        "/v1/adapters/grown".to_string(),
        "/v1/adapters/bot/policy".to_string(),
        format!("/v1/files/{}", old.file),
        format!("/v1/files/{}/content", old.file),
        format!("/v1/fine_tuning/jobs/{}", old.job),
        format!("/v1/fine_tuning/jobs/{}/events", old.job),
        format!("/v1/fine_tuning/jobs/{}/checkpoints", old.job),
    ] {
        assert_eq!(t.get(&path).0, 404, "{path}");
    }
    let (_, policy) = t.get("/v1/adapters/main/policy");
    assert_eq!(policy["overrides"], json!({}), "the old tenant's policy: {policy}");
    let (status, v) = t.post("/v1/feedback", json!({"completion_id": old.completion, "rating": 1}));
    assert_eq!(status, 404, "{v}");
    for model in ["bot", "grown", "main"] {
        let (status, _) = t.post("/v1/completions", json!({"model": model, "prompt": "x", "max_tokens": 1}));
        assert_eq!(status, 404, "{model}");
    }
    let (_, usage) = t.get("/v1/usage");
    assert_eq!(usage["storage_bytes"]["used"], 0, "{usage}");
    assert_eq!(usage["queued_jobs"]["used"], 0, "{usage}");
    let _ = s;
}

#[test]
fn a_deleted_tenant_leaves_nothing_to_the_next_tenant_of_its_name() {
    let s = TestServer::start(None, &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN)]);
    let neighbour = create_tenant(&s, "globex");
    assert_eq!(neighbour.upload_adapter("kept", 2).0, 201);
    let acme = create_tenant(&s, "acme");
    let old = leave_a_footprint(&s, &acme);

    let started = Instant::now();
    let (status, v) = admin(&s).send("DELETE", "/v1/tenants/acme", json!(null));
    assert_eq!(status, 200, "{v}");
    eprintln!("deleted a tenant with a running job in {:.0} ms: {}", started.elapsed().as_secs_f64() * 1e3, v["removed"]);
    assert_eq!(v["removed"]["files"], 1, "{v}");
    assert_eq!(acme.get("/v1/models").0, 401, "the old key stops working");
    let again = create_tenant(&s, "acme");
    assert_sees_nothing(&s, &again, &old);
    // The old job stops at its next step and writes nothing afterwards.
    std::thread::sleep(Duration::from_secs(3));
    assert_sees_nothing(&s, &again, &old);
    let stored: Vec<String> = std::fs::read_dir(s.root.join("adapters/acme"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "the old tenant's adapters are on disk: {stored:?}");
    // The neighbour keeps everything; the audit log keeps the deletion.
    assert_eq!(neighbour.data("/v1/adapters").len(), 1);
    let audit = admin(&s).data("/v1/audit?tenant=acme&action=tenant.deleted");
    assert_eq!(audit.len(), 1, "{audit:?}");
}

#[test]
fn a_deletion_interrupted_by_a_crash_is_finished_at_the_next_start() {
    let root = tempfile::tempdir().unwrap();
    let env = [("LIFELORA_AUTH__ADMIN_KEY", ADMIN)];
    let s = TestServer::start_in(root.path(), None, &env);
    let acme = create_tenant(&s, "acme");
    assert_eq!(acme.upload_adapter("bot", 2).0, 201);
    let (status, f) = acme.upload_file(&training_lines(5));
    assert_eq!(status, 200, "{f}");
    let file = f["id"].as_str().unwrap().to_string();
    s.kill();
    // The crash came right after the deletion was recorded: the tenant is
    // gone from the tenants file and marked as being deleted, its data not yet removed.
    let path = root.path().join("tenants.json");
    let mut tenants: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tenants["tenants"].as_object_mut().unwrap().remove("acme");
    tenants["deleting"] = json!(["acme"]);
    std::fs::write(&path, tenants.to_string()).unwrap();
    let s = TestServer::start_in(root.path(), None, &env);
    assert!(admin(&s).data("/v1/tenants").is_empty());
    let again = create_tenant(&s, "acme");
    assert!(again.data("/v1/adapters").is_empty());
    assert!(again.data("/v1/files").is_empty());
    assert_eq!(again.get(&format!("/v1/files/{file}")).0, 404);
}

#[test]
fn a_version_the_gate_rejected_answers_409_until_promoted_by_hand() {
    // No drift at all is allowed: every candidate is rejected.
    let s = TestServer::start(
        None,
        &[("LIFELORA_LEARNING__MIN_NEW_FEEDBACK", "0"), ("LIFELORA_LEARNING__MAX_BASE_DRIFT", "0.0"), ("LIFELORA_LEARNING__STEPS", "3")],
    );
    let t = Client { s: &s, key: None };
    wait_learner_ready(&s);
    let (status, v) = t.raw("/v1/adapters/main/examples", "application/jsonl", &training_lines(6));
    assert_eq!(status, 200, "{v}");
    let (status, job) = t.post("/v1/adapters/main/train", json!({"hyperparameters": {"n_steps": 3}}));
    assert_eq!(status, 200, "{job}");
    let job = wait_status(&t, job["id"].as_str().unwrap(), &["succeeded", "failed"], Duration::from_secs(120));
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["result_version"], 1, "{job}");
    let (status, v) = t.post("/v1/completions", json!({"model": "main@v1", "prompt": "x", "max_tokens": 1}));
    common::assert_openai_error(status, &v, 409);
    assert_eq!(v["error"]["code"], "adapter_version_rejected");
    assert!(v["error"]["message"].as_str().unwrap().contains("drift"), "{v}");
    assert_eq!(t.post("/v1/completions", json!({"model": "main", "prompt": "x", "max_tokens": 1})).0, 404, "nothing is current");
    let versions = t.data("/v1/adapters/main/versions");
    assert_eq!(versions[0]["status"], "rejected", "{versions:?}");
    assert!(versions[0]["rejection_reasons"].as_array().is_some_and(|r| !r.is_empty()));
    // Promoted explicitly: served from then on, pinned or not.
    let (status, v) = t.post("/v1/adapters/main/versions/1/promote", json!(null));
    assert_eq!(status, 200, "{v}");
    for model in ["main", "main@v1"] {
        let (status, v) = t.post("/v1/completions", json!({"model": model, "prompt": "x", "max_tokens": 1}));
        assert_eq!(status, 200, "{model}: {v}");
    }
    assert_eq!(t.data("/v1/adapters/main/versions")[0]["status"], "released");
}

#[test]
fn jobs_are_capped_per_tenant_bounded_in_size_and_taken_round_robin() {
    let s = TestServer::start(None, &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN), ("LIFELORA_LEARNING__MAX_QUEUED_JOBS_PER_TENANT", "2")]);
    let flood = create_tenant(&s, "flood");
    let quiet = create_tenant(&s, "quiet");
    wait_learner_ready(&s);
    let file = |c: &Client| c.upload_file(&training_lines(40)).1["id"].as_str().unwrap().to_string();
    let (ff, qf) = (file(&flood), file(&quiet));
    let job = |c: &Client, f: &str, epochs: u32| c.post("/v1/fine_tuning/jobs", json!({"model": s.model, "training_file": f, "hyperparameters": {"n_epochs": epochs}}));
    // Bounded by the settings: epochs and steps.
    let (status, v) = job(&flood, &ff, 21);
    common::assert_openai_error(status, &v, 400);
    assert_eq!(v["error"]["param"], "hyperparameters.n_epochs");
    let (status, v) = flood.post("/v1/adapters/main/train", json!({"hyperparameters": {"n_steps": 1001}}));
    common::assert_openai_error(status, &v, 400);
    // The first runs; two more queue; the rest are refused 429 at once.
    let (_, first) = job(&flood, &ff, 20);
    wait_status(&flood, first["id"].as_str().unwrap(), &["running"], Duration::from_secs(60));
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..10 {
        let (status, v) = job(&flood, &ff, 20);
        if status == 429 {
            assert_eq!(v["error"]["code"], "too_many_queued_jobs", "{v}");
        }
        statuses.push(status);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(statuses.iter().filter(|&&x| x == 200).count(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&x| x == 429).count(), 8, "{statuses:?}");
    let (_, usage) = flood.get("/v1/usage");
    assert_eq!(usage["queued_jobs"], json!({"used": 2, "limit": 2}), "{usage}");
    // Another tenant's job goes next, ahead of the flood's queued ones.
    let (status, q) = job(&quiet, &qf, 1);
    assert_eq!(status, 200, "{q}");
    let (status, _) = flood.post(&format!("/v1/fine_tuning/jobs/{}/cancel", first["id"].as_str().unwrap()), json!(null));
    assert_eq!(status, 200);
    let q = wait_status(&quiet, q["id"].as_str().unwrap(), &["running", "succeeded", "failed"], Duration::from_secs(60));
    let flood_jobs = flood.data("/v1/fine_tuning/jobs");
    let flood_running = flood_jobs.iter().filter(|j| j["status"] == "running" || j["status"] == "succeeded").count();
    assert_eq!(flood_running, 0, "the flood's next job started before the quiet tenant's: quiet is {}", q["status"]);
}

#[test]
fn storage_versions_and_feedback_are_bounded_per_tenant_and_usage_shows_them() {
    let s = TestServer::start(
        None,
        &[
            ("LIFELORA_AUTH__ADMIN_KEY", ADMIN),
            ("LIFELORA_LIMITS__TENANT_STORAGE_BYTES", "300000"),
            ("LIFELORA_LIMITS__MAX_VERSIONS_PER_ADAPTER", "2"),
            ("LIFELORA_LIMITS__MAX_FEEDBACK_PER_COMPLETION", "2"),
        ],
    );
    let t = create_tenant(&s, "acme");
    // Versions per adapter.
    assert_eq!(t.upload_adapter("bot", 2).0, 201);
    assert_eq!(t.upload_adapter("bot", 2).0, 201);
    let (status, v) = t.upload_adapter("bot", 2);
    common::assert_openai_error(status, &v, 429);
    assert_eq!(v["error"]["code"], "version_limit_reached");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_versions_per_adapter"), "{v}");
    assert_eq!(t.send("DELETE", "/v1/adapters/bot/versions/2", json!(null)).0, 409, "the current version stays");
    assert_eq!(t.send("DELETE", "/v1/adapters/bot/versions/1", json!(null)).0, 200);
    assert_eq!(t.upload_adapter("bot", 2).0, 201, "room again");
    // Bytes of files (and everything else) against the quota.
    let file = vec![b' '; 120_000];
    let mut line = training_lines(1);
    line.extend_from_slice(&file);
    assert_eq!(t.upload_file(&line).0, 200);
    assert_eq!(t.upload_file(&line).0, 200);
    let (status, v) = t.upload_file(&line);
    common::assert_openai_error(status, &v, 413);
    assert_eq!(v["error"]["code"], "storage_quota_exceeded");
    // Feedback per completion.
    let (_, c) = t.post("/v1/completions", json!({"model": s.model, "prompt": "x", "max_tokens": 2}));
    let id = c["id"].as_str().unwrap();
    for expected in [202, 202, 429] {
        let (status, v) = t.post("/v1/feedback", json!({"completion_id": id, "rating": 1, "comment": "x".repeat(4000)}));
        assert_eq!(status, expected, "{v}");
    }
    // Use against every quota, for the tenant and for the admin.
    let (status, usage) = t.get("/v1/usage");
    assert_eq!(status, 200, "{usage}");
    let used = usage["storage_bytes"]["used"].as_u64().unwrap();
    assert!((240_000..=300_000).contains(&used), "{usage}");
    assert_eq!(usage["storage_bytes"]["limit"], 300_000);
    assert_eq!(usage["adapters"], json!([{"name": "bot", "versions": 2, "limit": 2}]));
    assert_eq!(usage["max_feedback_per_completion"], 2);
    let (status, tenant) = admin(&s).get("/v1/tenants/acme");
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(tenant["usage"]["storage_bytes"], usage["storage_bytes"]);
    assert_eq!(admin(&s).get("/v1/tenants/nobody").0, 404);
}

#[test]
fn metrics_need_their_token_and_can_hide_tenant_names() {
    let token = "metrics-scrape-token-0123456789abcdef";
    let s = TestServer::start(
        None,
        &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN), ("LIFELORA_METRICS__BEARER_TOKEN", token), ("LIFELORA_METRICS__TENANT_LABELS", "false")],
    );
    let t = create_tenant(&s, "secretcorp");
    assert_eq!(t.post("/v1/completions", json!({"model": s.model, "prompt": "x", "max_tokens": 2})).0, 200);
    assert_eq!(s.get("/metrics").0, 401);
    let wrong = ureq::get(&format!("{}/metrics", s.base)).set("authorization", "Bearer nope").call();
    assert!(matches!(wrong, Err(ureq::Error::Status(401, _))));
    let text = ureq::get(&format!("{}/metrics", s.base)).set("authorization", &format!("Bearer {token}")).call().unwrap().into_string().unwrap();
    assert!(text.contains("lifelora_adapter_requests_total"), "{text}");
    assert!(!text.contains("secretcorp"), "a tenant's name is exposed");
}

#[test]
fn short_secrets_refuse_to_start() {
    for (key, value) in [("LIFELORA_AUTH__ADMIN_KEY", "short-admin-key"), ("LIFELORA_METRICS__BEARER_TOKEN", "short-token")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifelora"))
            .args(["serve", "--port", "0"])
            .env(key, value)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("32"), "{key}: {stderr}");
    }
}
