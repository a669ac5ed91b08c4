//! Every metric the Grafana dashboard (deploy/grafana/dashboards) queries is
//! one the server exports: a server serves a completion on an adapter and
//! runs a learner job, then each name is looked for in `/metrics`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{multipart_body, peft_adapter, TestServer, BUILTIN_LAYERS, BUILTIN_SITES};
use serde_json::{json, Value};

/// The `lifelora_*` series names in the dashboard's queries (histograms by their base name).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/lifelora.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("dashboard JSON");
    let mut names = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("lifelora_") {
                let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let base = ["_bucket", "_sum", "_count"].iter().fold(name.clone(), |n, s| n.strip_suffix(s).map_or(n.clone(), str::to_string));
                names.insert(base);
            }
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let names = dashboard_metrics();
    assert!(names.len() >= 15, "{names:?}");
    let s = TestServer::start(None, &[("LIFELORA_LEARNING__MIN_NEW_FEEDBACK", "0")]);
    let (c, w) = peft_adapter(BUILTIN_LAYERS, &BUILTIN_SITES[..1], 2, json!({}), &|_, _| {});
    let r = ureq::post(&format!("{}/v1/adapters", s.base))
        .set("content-type", "multipart/form-data; boundary=b")
        .send_bytes(&multipart_body("b", &[("name", None, b"bot"), ("config", None, &c), ("weights", None, &w)]));
    assert_eq!(common::response_json(r).0, 201);
    let (status, _) = s.post("/v1/completions", &json!({"model": "bot", "prompt": "hello", "max_tokens": 4, "stream": false}));
    assert_eq!(status, 200);
    s.stream("/v1/completions", &json!({"model": s.model, "prompt": "hi", "max_tokens": 4, "stream": true}));
    // A learner job, for the learner's series.
    let started = Instant::now();
    while !s.get("/health").1.contains("\"learner\":\"ready\"") {
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = "{\"prompt\": \"a?\", \"completion\": \" b.\"}\n".repeat(3);
    let r = ureq::post(&format!("{}/v1/adapters/bot/examples", s.base)).set("content-type", "application/jsonl").send_string(&lines);
    assert_eq!(common::response_json(r).0, 200);
    let (_, job) = s.post("/v1/adapters/bot/train", &json!({"hyperparameters": {"n_steps": 2}}));
    let id = job["id"].as_str().expect("job id").to_string();
    let started = Instant::now();
    loop {
        let (_, body) = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
        let status = serde_json::from_str::<Value>(&body).unwrap()["status"].as_str().unwrap_or("").to_string();
        if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "job still {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, text) = s.get("/metrics");
    let exported: BTreeSet<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics the server does not export: {missing:?}");
}
