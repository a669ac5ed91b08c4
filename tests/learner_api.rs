//! The learner end to end over HTTP on stories260K (fast enough for CI):
//! corrections posted as feedback on base-model completions train the
//! tenant's default adapter, whose promoted version then answers with the
//! corrections while the base model's answers stay byte-identical; a
//! candidate that fails the eval gate is kept as a rejected version and
//! nothing changes for clients; a kill during training leaves no version
//! and no lost feedback, and the job is marked failed after restart.
//! Facts are made of stories260K's own vocabulary pieces: its byte-fallback
//! embeddings cannot learn English.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{json, Value};

/// Prompts (token ids) and the answers (token ids) taught for them.
const FACTS: [([u32; 4], [u32; 3]); 4] = [
    ([1, 482, 82, 508], [300, 301, 302]),
    ([1, 499, 496, 77], [410, 320, 288]),
    ([1, 350, 351, 352], [260, 390, 440]),
    ([1, 270, 271, 272], [333, 480, 301]),
];

fn learner_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![
        ("LIFELORA_LEARNING__MIN_NEW_FEEDBACK", "0"),
        ("LIFELORA_LEARNING__STEPS", "80"),
        ("LIFELORA_LEARNING__LEARNING_RATE", "0.01"),
        ("LIFELORA_LEARNING__MAX_BASE_DRIFT", "10.0"),
        ("LIFELORA_LEARNING__MIN_BASE_AGREEMENT", "0.0"),
    ];
    env.extend_from_slice(extra);
    env
}

fn complete(s: &TestServer, model: &str, prompt: &[u32], max_tokens: u32) -> Value {
    let (status, v) = s.post("/v1/completions", &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}));
    assert_eq!(status, 200, "{v}");
    v
}

/// The text of token ids (stories260K's tokenizer is a substitute: opaque strings).
fn text_of(s: &TestServer, ids: &[u32]) -> String {
    let mut with_bos = vec![1];
    with_bos.extend_from_slice(ids);
    let (status, v) = s.post("/v1/completions", &json!({"model": s.model, "prompt": with_bos, "max_tokens": 0, "echo": true}));
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Posts one correction per fact on a base-model completion.
fn teach(s: &TestServer) -> Vec<String> {
    teach_facts(s, &FACTS)
}

fn teach_facts(s: &TestServer, facts: &[([u32; 4], [u32; 3])]) -> Vec<String> {
    facts
        .iter()
        .map(|(prompt, answer)| {
            let c = complete(s, &s.model, prompt, 3);
            let correction = text_of(s, answer);
            let (status, v) = s.post("/v1/feedback", &json!({"completion_id": c["id"], "rating": -1, "correction": correction}));
            assert_eq!(status, 202, "{v}");
            correction
        })
        .collect()
}

fn wait_for_job(s: &TestServer, id: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
        assert_eq!(status, 200, "{body}");
        let job: Value = serde_json::from_str(&body).unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap()) {
            return job;
        }
        assert!(started.elapsed() < timeout, "job still {} after {timeout:?}", job["status"]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn corrections_train_the_default_adapter_which_is_promoted_and_answers_with_them() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[]));
    let base_before: Vec<Value> = FACTS.iter().map(|(p, _)| complete(&s, &s.model, p, 8)["choices"][0]["text"].clone()).collect();
    let corrections = teach(&s);

    let (status, job) = s.post("/v1/adapters/main/train", &json!({}));
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["fine_tuned_model"], "main@v1");
    assert_eq!(job["feedback_ids"].as_array().unwrap().len(), 4);
    // Each correction of a down-rated answer is a preference: the correction over what was said.
    assert_eq!(job["metrics"]["preference_pairs"], 4, "{job}");

    // The promoted version answers with the corrections; the base is untouched.
    for ((prompt, _), correction) in FACTS.iter().zip(&corrections) {
        let got = complete(&s, "main", prompt, 8);
        let text = got["choices"][0]["text"].as_str().unwrap();
        assert!(text.trim_start().starts_with(correction.trim()), "prompt {prompt:?}: {text:?} does not start with {correction:?}");
    }
    let base_after: Vec<Value> = FACTS.iter().map(|(p, _)| complete(&s, &s.model, p, 8)["choices"][0]["text"].clone()).collect();
    assert_eq!(base_after, base_before);

    // The version records where it came from; events and checkpoints tell the story.
    let (_, versions) = s.get("/v1/adapters/main/versions");
    let versions: Value = serde_json::from_str(&versions).unwrap();
    assert_eq!(versions["data"][0]["source"], "learner", "{versions}");
    let (_, events) = s.get(&format!("/v1/fine_tuning/jobs/{}/events?limit=100", job["id"].as_str().unwrap()));
    let events: Value = serde_json::from_str(&events).unwrap();
    let messages: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.starts_with("Step 80/80")), "{messages:?}");
    assert!(messages.contains(&"Evaluated the candidate"));
    let (_, ckpts) = s.get(&format!("/v1/fine_tuning/jobs/{}/checkpoints", job["id"].as_str().unwrap()));
    let ckpts: Value = serde_json::from_str(&ckpts).unwrap();
    let m = &ckpts["data"][0]["metrics"];
    let before = job["metrics"]["valid_loss_before"].as_f64().unwrap();
    assert!(m["valid_loss"].as_f64().unwrap() < before / 4.0, "{ckpts}");
    assert!(m["base_kl"].as_f64().is_some() && m["base_top1_agreement"].as_f64().is_some(), "{ckpts}");
    // Where the run's time went: its training steps took some, every phase is booked.
    let phases = &job["metrics"]["phase_seconds"];
    assert!(phases["first_phase_steps"].as_f64().is_some_and(|s| s > 0.0), "{phases}");
    assert!(phases.as_object().is_some_and(|p| p.values().all(|s| s.as_f64().is_some_and(|s| s >= 0.0))), "{phases}");
    assert_eq!(s.metric("lifelora_learner_jobs_total{outcome=\"succeeded\"}"), 1.0);
    assert!(s.metric("lifelora_adapter_eval{adapter=\"main\",figure=\"base_kl\",tenant=\"default\"}") >= 0.0);
    let (_, list) = s.get("/v1/fine_tuning/jobs?adapter=main");
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["data"].as_array().unwrap().len(), 1);

    // Learned feedback is not pending any more: a second run has nothing to learn.
    let (_, again) = s.post("/v1/adapters/main/train", &json!({}));
    let again = wait_for_job(&s, again["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(again["status"], "failed");
    assert!(again["error"]["message"].as_str().unwrap().contains("no trainable feedback"), "{again}");
}

#[test]
fn a_candidate_failing_the_gate_is_kept_rejected_and_serves_nothing() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[("LIFELORA_LEARNING__MAX_BASE_DRIFT", "0.0000001")]));
    teach(&s);
    let (_, job) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 20}}));
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"]["message"].as_str().unwrap();
    assert!(error.contains("rejected") && error.contains("drift"), "{error}");
    let (_, adapter) = s.get("/v1/adapters/main");
    let adapter: Value = serde_json::from_str(&adapter).unwrap();
    assert!(adapter["version"].is_null() && adapter["versions"] == json!([1]), "a rejected candidate must not be current: {adapter}");
    let (_, versions) = s.get("/v1/adapters/main/versions");
    let versions: Value = serde_json::from_str(&versions).unwrap();
    assert_eq!(versions["data"][0]["metrics"]["status"], "rejected", "{versions}");
    // Its feedback stays pending for the next run.
    let (status, v) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 1, "learning_rate": 1e-9}}));
    assert_eq!(status, 200, "{v}");
    let next = wait_for_job(&s, v["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(next["feedback_ids"].as_array().unwrap().len(), 4, "{next}");
}

#[test]
fn bad_train_requests_get_openai_errors() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[]));
    for (path, body, status) in [
        ("/v1/adapters/nope/train", json!({}), 404),
        ("/v1/adapters/main/train", json!({"hyperparameters": {"n_steps": -3}}), 400),
        ("/v1/adapters/main/train", json!({"hyperparameters": {"learning_rate": "fast"}}), 400),
        ("/v1/adapters/main/train", json!({"hyperparameters": [1]}), 400),
        ("/v1/adapters/main/train", json!({"epochs": 3}), 400),
        ("/v1/fine_tuning/jobs/ftjob-missing/cancel", json!({}), 404),
    ] {
        let (got, v) = s.post(path, &body);
        common::assert_openai_error(got, &v, status);
    }
    let (status, _) = s.get("/v1/fine_tuning/jobs/ftjob-missing");
    assert_eq!(status, 404);
    let (status, _) = s.get("/v1/fine_tuning/jobs?limit=0");
    assert_eq!(status, 400);
}

#[test]
fn a_kill_during_training_loses_no_feedback_and_writes_no_version() {
    let dir = common::stories_dir();
    let root = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(root.path(), Some(&dir), &learner_env(&[]));
    teach(&s);
    let (_, job) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 1000}}));
    let id = job["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    loop {
        let (_, body) = s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=100"));
        if body.contains("Step 5/") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "training never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.kill();
    let s = TestServer::start_in(root.path(), Some(&dir), &learner_env(&[]));
    let (_, body) = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
    let job: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("stopped"), "{job}");
    let (status, _) = s.get("/v1/adapters/main");
    assert_eq!(status, 404, "no version of main may exist");
    let (_, feedback) = s.get("/v1/feedback");
    assert_eq!(serde_json::from_str::<Value>(&feedback).unwrap()["data"].as_array().unwrap().len(), 4);
    // And the feedback is still there to learn from.
    let (_, again) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 2}}));
    let again = wait_for_job(&s, again["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(again["feedback_ids"].as_array().unwrap().len(), 4, "{again}");
}

#[test]
fn jsonl_examples_seed_an_adapter_with_bad_lines_reported() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[]));
    let (status, v) = s.post_raw("/v1/adapters/main/examples", "not json\n{\"prompt\": \"x\"}\n");
    common::assert_openai_error(status, &v, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("line 1"), "{v}");
    let pairs: Vec<(String, String)> = FACTS.iter().map(|(p, a)| (text_of(&s, &p[1..]), text_of(&s, a))).collect();
    let mut body: Vec<String> = pairs.iter().map(|(p, a)| json!({"prompt": p, "completion": a}).to_string()).collect();
    body.insert(1, "{\"messages\": []}".to_string());
    let (status, v) = s.post_raw("/v1/adapters/main/examples", &body.join("\n"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"], 4);
    assert_eq!(v["errors"][0]["line"], 2, "{v}");
    let (status, v) = s.post_raw("/v1/adapters/nope/examples", &body.join("\n"));
    common::assert_openai_error(status, &v, 404);

    let (_, job) = s.post("/v1/adapters/main/train", &json!({}));
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["feedback_ids"].as_array().unwrap().len(), 4);
    for (prompt, answer) in &pairs {
        let (status, v) = s.post("/v1/completions", &json!({"model": "main", "prompt": prompt, "max_tokens": 8, "temperature": 0}));
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert!(text.trim_start().starts_with(answer.trim()), "{prompt:?}: {text:?} does not start with {answer:?}");
    }
}

/// Rates one fresh completion of `model` up (1) or down (-1).
fn rate(s: &TestServer, model: &str, prompt: &[u32], rating: i32) {
    let c = complete(s, model, prompt, 4);
    let (status, v) = s.post("/v1/feedback", &json!({"completion_id": c["id"], "rating": rating}));
    assert_eq!(status, 202, "{v}");
}

fn current_version(s: &TestServer) -> Value {
    let (_, adapter) = s.get("/v1/adapters/main");
    serde_json::from_str::<Value>(&adapter).unwrap()["version"].clone()
}

#[test]
fn a_learned_version_rated_worse_than_its_parent_is_rolled_back_by_itself_once() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[
        ("LIFELORA_LEARNING__WATCH_WINDOW", "4"),
        ("LIFELORA_LEARNING__ROLLBACK_MARGIN", "0.25"),
        // This test is about the watch, not the gate.
        ("LIFELORA_LEARNING__MAX_REGRESSION", "100"),
    ]));
    teach_facts(&s, &FACTS[..2]);
    let (_, job) = s.post("/v1/adapters/main/train", &json!({}));
    let job1 = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job1["status"], "succeeded");
    teach_facts(&s, &FACTS[2..]);
    let (_, job2) = s.post("/v1/adapters/main/train", &json!({}));
    let job2 = wait_for_job(&s, job2["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job2["status"], "succeeded", "{job2}");
    assert_eq!(current_version(&s), 2);
    // The second run starts from v1's drift as v1's run recorded it (on the same anchors).
    assert!(job1["metrics"]["drift_anchors"].as_str().is_some_and(|f| f.len() == 16), "{job1}");
    assert_eq!(job2["metrics"]["drift_anchors"], job1["metrics"]["drift_anchors"]);
    assert_eq!(job2["metrics"]["parent_base_kl"], job1["metrics"]["base_kl"], "{job2}");
    // v1's facts are replayed, their loss before read off the hold's pass.
    assert_eq!(job2["metrics"]["replay_examples"], 2, "{job2}");
    assert!(job2["metrics"]["replay_loss_before"].as_f64().is_some_and(|l| l > 0.0 && l.is_finite()), "{job2}");
    // v1's users liked it.
    for (prompt, _) in &FACTS {
        rate(&s, "main@v1", prompt, 1);
    }

    // v2's first three ratings are down: not enough to judge yet.
    for (prompt, _) in &FACTS[..3] {
        rate(&s, "main", prompt, -1);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(current_version(&s), 2);
    rate(&s, "main", &FACTS[3].0, -1);
    let started = Instant::now();
    while current_version(&s) != 1 {
        assert!(started.elapsed() < Duration::from_secs(10), "v2 was not rolled back");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Why is recorded: in the audit log and on the job that made v2.
    let (_, log) = s.get("/v1/audit");
    let log: Value = serde_json::from_str(&log).unwrap();
    let actions: Vec<(String, String)> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "server")
        .map(|e| (e["action"].as_str().unwrap().to_string(), e["target"].as_str().unwrap().to_string()))
        .collect();
    let has = |a: &str, t: &str| actions.contains(&(a.to_string(), t.to_string()));
    assert!(has("adapter.learned", "main@v1") && has("adapter.learned", "main@v2"), "{actions:?}");
    assert!(has("adapter.auto_rollback", "main@v2") && !has("adapter.watch_passed", "main@v1"), "{actions:?}");
    let rollback = log["data"].as_array().unwrap().iter().find(|e| e["action"] == "adapter.auto_rollback").unwrap();
    assert_eq!(rollback["detail"]["down_share"], 1.0);
    assert_eq!(rollback["detail"]["parent_down_share"], 0.0);
    let (_, events) = s.get(&format!("/v1/fine_tuning/jobs/{}/events?limit=100", job2["id"].as_str().unwrap()));
    assert!(events.contains("rolled back automatically from v2 to v1"), "{events}");
    assert_eq!(s.metric("lifelora_adapter_rollbacks_total"), 1.0);

    // v1, current again, is judged at its next rating against the base
    // model (every base answer was rated down): it passes.
    rate(&s, "main", &FACTS[0].0, 1);
    let started = Instant::now();
    while !s.get("/v1/audit?action=adapter.watch_passed").1.contains("main@v1") {
        assert!(started.elapsed() < Duration::from_secs(10), "v1 was not judged");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Judged once: promoted again by hand, more down-ratings leave it current.
    assert_eq!(s.post("/v1/adapters/main/versions/2/promote", &json!({})).0, 200);
    rate(&s, "main", &FACTS[0].0, -1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(current_version(&s), 2);
}

#[test]
fn down_ratings_alone_teach_the_adapter_to_avoid_the_rated_answers() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[]));
    let mut rated = Vec::new();
    for (prompt, _) in &FACTS {
        let c = complete(&s, &s.model, prompt, 3);
        let (status, v) = s.post("/v1/feedback", &json!({"completion_id": c["id"], "rating": "down"}));
        assert_eq!(status, 202, "{v}");
        rated.push(c["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let (_, job) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 20}}));
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    let m = &job["metrics"];
    assert_eq!((m["avoided_answers"].as_u64(), m["preference_pairs"].as_u64()), (Some(4), Some(0)), "{job}");
    assert!(m["valid_avoided_loss"].as_f64().unwrap() > m["valid_avoided_loss_before"].as_f64().unwrap(), "{job}");
    for ((prompt, _), said) in FACTS.iter().zip(&rated) {
        let now = complete(&s, "main", prompt, 3);
        assert_ne!(now["choices"][0]["text"].as_str().unwrap(), said, "prompt {prompt:?} still answered as rated down");
    }
}

/// `POST /v1/files` with `purpose` and one JSONL `file`.
fn upload_file(s: &TestServer, purpose: &str, content: &str) -> (u16, Value) {
    let mut body = Vec::new();
    body.extend_from_slice(format!("--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n").as_bytes());
    body.extend_from_slice(b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\r\n");
    body.extend_from_slice(content.as_bytes());
    body.extend_from_slice(b"\r\n--b--\r\n");
    common::response_json(
        ureq::post(&format!("{}/v1/files", s.base)).set("content-type", "multipart/form-data; boundary=b").send_bytes(&body),
    )
}

#[test]
fn uploaded_files_train_a_new_adapter_through_fine_tuning_jobs_supervised_and_dpo() {
    let dir = common::stories_dir();
    // stories260K's anchors pull hard toward a base far from any lesson: no KL term here.
    let s = TestServer::start(Some(&dir), &learner_env(&[("LIFELORA_LEARNING__KL_WEIGHT", "0"), ("LIFELORA_LEARNING__MAX_BASE_DRIFT", "100")]));
    let pairs: Vec<(String, String)> = FACTS.iter().map(|(p, a)| (text_of(&s, &p[1..]), text_of(&s, a))).collect();
    let sft: Vec<String> = pairs.iter().map(|(p, a)| json!({"prompt": p, "completion": a}).to_string()).collect();
    let (status, file) = upload_file(&s, "fine-tune", &sft.join("\n"));
    assert_eq!(status, 200, "{file}");
    let file_id = file["id"].as_str().unwrap();

    let (status, job) = s.post("/v1/fine_tuning/jobs", &json!({"model": s.model, "training_file": file_id, "suffix": "facts", "seed": 7}));
    assert_eq!(status, 200, "{job}");
    assert_eq!((job["training_file"].as_str(), job["method"]["type"].as_str()), (Some(file_id), Some("supervised")));
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["fine_tuned_model"], "facts@v1");
    assert!(job["trained_tokens"].as_u64().unwrap() > 0);
    for (prompt, answer) in &pairs {
        let (_, v) = s.post("/v1/completions", &json!({"model": "facts@v1", "prompt": prompt, "max_tokens": 8, "temperature": 0}));
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert!(text.trim_start().starts_with(answer.trim()), "{prompt:?}: {text:?} does not start with {answer:?}");
    }
    // What the file taught is replayed by the adapter's later runs.
    assert_eq!(job["feedback_ids"].as_array().unwrap().len(), 4, "{job}");

    // DPO: preference lines, a new adapter.
    let dpo: Vec<String> = pairs
        .iter()
        .zip(pairs.iter().cycle().skip(1))
        .map(|((p, good), (_, bad))| {
            json!({"input": {"messages": [{"role": "user", "content": p}]},
                   "preferred_output": [{"role": "assistant", "content": good}],
                   "non_preferred_output": [{"role": "assistant", "content": bad}]})
            .to_string()
        })
        .collect();
    let (_, dpo_file) = upload_file(&s, "fine-tune", &dpo.join("\n"));
    let dpo_id = dpo_file["id"].as_str().unwrap();
    // A preference file is not a supervised one, and the reverse.
    let (status, v) = s.post("/v1/fine_tuning/jobs", &json!({"model": "facts", "training_file": dpo_id}));
    common::assert_openai_error(status, &v, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("line 1"), "{v}");
    let (status, v) = s.post("/v1/fine_tuning/jobs", &json!({"model": "facts", "training_file": file_id, "method": {"type": "dpo"}}));
    common::assert_openai_error(status, &v, 400);
    let (status, job) = s.post(
        "/v1/fine_tuning/jobs",
        &json!({"model": s.model, "suffix": "prefs", "training_file": dpo_id, "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 20, "beta": "auto"}}}}),
    );
    assert_eq!(status, 200, "{job}");
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["model"], s.model);
    assert_eq!(job["fine_tuned_model"], "prefs@v1");
    assert_eq!(job["metrics"]["preference_pairs"], 4, "{job}");
    assert_eq!(job["metrics"]["steps"], 20, "20 epochs over 4 pairs, 4 a step: {job}");
    for (prompt, answer) in &pairs {
        let (_, v) = s.post("/v1/chat/completions", &json!({"model": "prefs", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}));
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.trim_start().starts_with(answer.trim()), "{prompt:?}: {text:?} does not start with {answer:?}");
    }

    // Bad requests answer in OpenAI's error shape.
    for (body, status) in [
        (json!({"model": s.model}), 400),
        (json!({"model": s.model, "training_file": "file-nope"}), 400),
        (json!({"model": "nope", "training_file": file_id}), 404),
        (json!({"model": "facts@v1", "training_file": file_id}), 400),
        (json!({"model": "facts", "training_file": file_id, "suffix": "x"}), 400),
        (json!({"model": s.model, "training_file": file_id, "suffix": "../up"}), 400),
        (json!({"model": s.model, "training_file": file_id, "hyperparameters": {"n_epochs": 0}}), 400),
        (json!({"model": s.model, "training_file": file_id, "hyperparameters": {"learning_rate_multiplier": "fast"}}), 400),
        (json!({"model": s.model, "training_file": file_id, "method": {"type": "reinforcement"}}), 400),
        (json!({"model": s.model, "training_file": file_id, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5}}}}), 400),
        (json!({"model": s.model, "training_file": file_id, "epochs": 3}), 400),
    ] {
        let (got, v) = s.post("/v1/fine_tuning/jobs", &body);
        common::assert_openai_error(got, &v, status);
    }
    let (status, v) = upload_file(&s, "assistants", &sft.join("\n"));
    common::assert_openai_error(status, &v, 400);
    let (status, v) = upload_file(&s, "fine-tune", "{\"prompt\": 1}\n[1, 2]\n");
    common::assert_openai_error(status, &v, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("line 2"), "{v}");
    let (status, v) = upload_file(&s, "fine-tune", "");
    common::assert_openai_error(status, &v, 400);
    let (status, list) = s.get("/v1/files?purpose=fine-tune");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["data"].as_array().unwrap().len(), 2, "only the two good files are kept");
}

fn call(s: &TestServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = ureq::request(method, &format!("{}{path}", s.base));
    common::response_json(match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    })
}

#[test]
fn an_adapter_policy_overrides_when_and_how_it_learns() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &learner_env(&[]));
    let (status, p) = call(&s, "GET", "/v1/adapters/main/policy", None);
    assert_eq!(status, 200, "{p}");
    assert_eq!((p["overrides"].clone(), p["effective"]["steps"].clone(), p["effective"]["min_new_feedback"].clone()), (json!({}), json!(80), json!(0)));

    // Train by itself after two new items, in 7 steps.
    let (status, p) = call(&s, "PUT", "/v1/adapters/main/policy", Some(json!({"min_new_feedback": 2, "steps": 7, "kl_weight": null})));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["overrides"], json!({"min_new_feedback": 2, "steps": 7}));
    assert_eq!(p["effective"]["steps"], 7);
    teach_facts(&s, &FACTS[..2]);
    let started = Instant::now();
    let job = loop {
        let (_, list) = s.get("/v1/fine_tuning/jobs?adapter=main");
        let list: Value = serde_json::from_str(&list).unwrap();
        if let Some(job) = list["data"].as_array().unwrap().first() {
            break job.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "two new items did not start a run");
        std::thread::sleep(Duration::from_millis(50));
    };
    let job = wait_for_job(&s, job["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(job["metrics"]["steps"], 7, "{job}");

    // Refused by name, nothing stored.
    for (body, param) in [
        (json!({"threads": 2}), "threads"),
        (json!({"steps": 0}), "steps"),
        (json!({"targets": ["embed_tokens"]}), "targets"),
        (json!({"learning_rate": "fast"}), "policy"),
    ] {
        let (status, v) = call(&s, "PUT", "/v1/adapters/main/policy", Some(body));
        common::assert_openai_error(status, &v, 400);
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    assert_eq!(call(&s, "GET", "/v1/adapters/main/policy", None).1["effective"]["steps"], 7);
    let (status, v) = call(&s, "PUT", "/v1/adapters/nope/policy", Some(json!({"steps": 3})));
    common::assert_openai_error(status, &v, 404);

    // Reset: the server's settings again.
    let (status, p) = call(&s, "DELETE", "/v1/adapters/main/policy", None);
    assert_eq!(status, 200);
    assert_eq!((p["overrides"].clone(), p["effective"]["steps"].clone()), (json!({}), json!(80)));
}

#[test]
fn sigterm_stops_a_training_job_cleanly_and_its_feedback_stays_pending() {
    let dir = common::stories_dir();
    let root = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(root.path(), Some(&dir), &learner_env(&[("LIFELORA_LIMITS__SHUTDOWN_GRACE_SECS", "20")]));
    teach(&s);
    let (_, job) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 1000}}));
    let id = job["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    while !s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).1.contains("Step 5/") {
        assert!(started.elapsed() < Duration::from_secs(60), "training never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.terminate();
    let status = s.wait_exit(Duration::from_secs(30)).expect("the server did not exit");
    assert!(status.success(), "{status:?}");
    drop(s);
    let s = TestServer::start_in(root.path(), Some(&dir), &learner_env(&[]));
    let (_, body) = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
    let job: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(s.get("/v1/adapters/main").0, 404, "no version was written");
    let (_, again) = s.post("/v1/adapters/main/train", &json!({"hyperparameters": {"n_steps": 2}}));
    let again = wait_for_job(&s, again["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(again["feedback_ids"].as_array().unwrap().len(), 4, "{again}");
}
