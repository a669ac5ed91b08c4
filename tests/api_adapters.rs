//! Adapters over HTTP on stories260K with PEFT-made fixtures: upload,
//! serve by name (matching PEFT's greedy completions, also mixed with
//! other adapters and the base in concurrent requests), versions, staged
//! uploads, promote, rollback, download/re-upload, delete, and refusals.

mod common;

use std::io::Read;

use common::{assert_openai_error, response_json, TestServer};
use serde_json::{json, Value};

const BOUNDARY: &str = "lifelora-test-boundary";

fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn upload(s: &TestServer, query: &str, parts: &[(&str, &[u8])]) -> (u16, Value) {
    response_json(
        ureq::post(&format!("{}/v1/adapters{query}", s.base))
            .set("content-type", &format!("multipart/form-data; boundary={BOUNDARY}"))
            .send_bytes(&multipart(parts)),
    )
}

fn fixture(name: &str) -> (Vec<u8>, Vec<u8>, Value) {
    let dir = common::fixtures_dir().join("adapters").join(name);
    (
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap(),
    )
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn greedy(s: &TestServer, model: &str, prompt: &[u64], n: usize) -> Vec<u64> {
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], model);
    ids(&v["choices"][0]["token_ids"])
}

#[test]
fn uploaded_adapters_serve_peft_completions_alone_and_mixed() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[]);
    let names = ["q_v_r8", "all_linear_r4", "rslora_r16"];
    for name in names {
        let (config, weights, _) = fixture(name);
        let (status, v) = upload(&s, "", &[("name", name.replace('_', "-").as_bytes()), ("config", &config), ("weights", &weights)]);
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["version"], 1);
        assert_eq!(v["current_version"], 1);
    }
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    let listed: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, vec!["stories260K", "all-linear-r4", "q-v-r8", "rslora-r16"]);
    assert_eq!(models["data"][1]["parent"], "stories260K");
    // Every adapter's greedy completions equal PEFT's, all requests at once,
    // together with base-model requests.
    let s = &s;
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for name in names {
            let (_, _, reference) = fixture(name);
            for p in reference["prompts"].as_array().unwrap().clone() {
                let model = name.replace('_', "-");
                handles.push(scope.spawn(move || {
                    let want = ids(&p["completion_token_ids"]);
                    (greedy(s, &model, &ids(&p["prompt_token_ids"]), want.len()), want)
                }));
                handles.push(scope.spawn(move || {
                    let (_, _, reference) = fixture(name);
                    let p = &reference["prompts"][0];
                    let want = ids(&p["base_model_completion_token_ids"]);
                    (greedy(s, "stories260K", &ids(&p["prompt_token_ids"]), want.len()), want)
                }));
            }
        }
        for h in handles {
            let (got, want) = h.join().unwrap();
            assert_eq!(got, want);
        }
    });
    // Per-adapter metrics: requests and tokens by tenant and adapter.
    let (_, text) = s.get("/metrics");
    let value = |metric: &str, adapter: &str| -> f64 {
        let prefix = format!("{metric}{{adapter=\"{adapter}\",tenant=\"default\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix}")).parse().unwrap()
    };
    assert_eq!(value("lifelora_adapter_requests_total", "q-v-r8"), 3.0);
    assert_eq!(value("lifelora_adapter_generated_tokens_total", "q-v-r8"), 96.0);
    assert_eq!(value("lifelora_adapter_requests_total", "base"), 9.0);
}

#[test]
fn versions_promote_rollback_download_and_delete() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[]);
    let (c1, w1, r1) = fixture("q_v_r8");
    let (c2, w2, r2) = fixture("all_linear_r4");
    let p1 = ids(&r1["prompts"][0]["prompt_token_ids"]);
    let want1 = ids(&r1["prompts"][0]["completion_token_ids"]);
    let want2 = ids(&r2["prompts"][0]["completion_token_ids"]);
    assert_eq!(upload(&s, "", &[("name", b"bot"), ("config", &c1), ("weights", &w1)]).0, 201);
    // Staged: stored as v2 but not served.
    let (status, v) = upload(&s, "?promote=false", &[("name", b"bot"), ("config", &c2), ("weights", &w2)]);
    assert_eq!((status, v["version"].clone(), v["current_version"].clone()), (201, json!(2), json!(1)));
    assert_eq!(greedy(&s, "bot", &p1, want1.len()), want1);
    assert_eq!(greedy(&s, "bot@v2", &p1, want2.len()), want2);
    let (status, v) = s.post("/v1/adapters/bot/versions/2/promote", &json!({}));
    assert_eq!((status, v["version"].clone()), (200, json!(2)));
    assert_eq!(greedy(&s, "bot", &p1, want2.len()), want2);
    let (status, v) = s.post("/v1/adapters/bot/rollback", &json!({}));
    assert_eq!((status, v["version"].clone()), (200, json!(1)));
    assert_eq!(greedy(&s, "bot", &p1, want1.len()), want1);
    let (status, v) = s.post("/v1/adapters/bot/rollback", &json!({}));
    assert_openai_error(status, &v, 409);
    let (_, listing) = s.get("/v1/adapters/bot/versions");
    let listing: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["data"].as_array().unwrap().len(), 2);
    assert_eq!(listing["data"][0]["current"], true);
    // Download v2 as .tar.gz and upload it again as a new adapter.
    let r = ureq::get(&format!("{}/v1/adapters/bot/versions/2/download", s.base)).call().unwrap();
    assert_eq!(r.header("content-type"), Some("application/gzip"));
    let mut archive = Vec::new();
    r.into_reader().read_to_end(&mut archive).unwrap();
    let (status, v) = upload(&s, "", &[("name", b"copy"), ("archive", &archive)]);
    assert_eq!(status, 201, "{v}");
    assert_eq!(greedy(&s, "copy", &p1, want2.len()), want2);
    // Delete: gone from listings and requests.
    let r = ureq::delete(&format!("{}/v1/adapters/bot", s.base)).call().unwrap();
    assert_eq!(r.status(), 200);
    let (status, v) = s.post("/v1/completions", &json!({"model": "bot", "prompt": "x"}));
    assert_openai_error(status, &v, 404);
}

#[test]
fn bad_uploads_and_unknown_adapters_get_openai_errors_and_write_nothing() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[]);
    let (config, weights, _) = fixture("q_v_r8");
    let dora = String::from_utf8(config.clone()).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
    let cases: Vec<(Vec<(&str, &[u8])>, u16, &str)> = vec![
        (vec![("name", b"x"), ("config", dora.as_bytes()), ("weights", &weights)], 400, "use_dora"),
        (vec![("name", b"x"), ("config", &config), ("weights", b"not safetensors")], 400, "safetensors"),
        (vec![("name", b"x"), ("config", b"{"), ("weights", &weights)], 400, "JSON"),
        (vec![("name", b"../x"), ("config", &config), ("weights", &weights)], 400, "invalid name"),
        (vec![("name", b"UPPER"), ("config", &config), ("weights", &weights)], 400, "invalid name"),
        (vec![("config", &config), ("weights", &weights)], 400, "name"),
        (vec![("name", b"x"), ("config", &config)], 400, "weights"),
        (vec![("name", b"x"), ("archive", b"not a tarball")], 400, "archive"),
    ];
    for (parts, status, word) in cases {
        let (got, v) = upload(&s, "", &parts);
        assert_openai_error(got, &v, status);
        assert!(v["error"]["message"].as_str().unwrap().contains(word), "{word}: {v}");
    }
    let (got, v) = response_json(ureq::post(&format!("{}/v1/adapters", s.base)).set("content-type", "application/json").send_string("{}"));
    assert_openai_error(got, &v, 400);
    for path in ["/v1/adapters/nope", "/v1/adapters/nope/versions"] {
        let (status, body) = s.get(path);
        assert_openai_error(status, &serde_json::from_str(&body).unwrap(), 404);
    }
    let (status, v) = s.post("/v1/adapters/nope/versions/1/promote", &json!({}));
    assert_openai_error(status, &v, 404);
    let (status, v) = s.post("/v1/chat/completions", &json!({"model": "nope@v1", "messages": [{"role": "user", "content": "x"}]}));
    assert_openai_error(status, &v, 404);
    // Nothing was written for any refused upload.
    let (_, listing) = s.get("/v1/adapters");
    assert_eq!(serde_json::from_str::<Value>(&listing).unwrap()["data"].as_array().unwrap().len(), 0);
    let store = s.root.join("adapters");
    assert!(!store.exists() || std::fs::read_dir(&store).unwrap().count() == 0);
}

#[test]
fn a_promotion_during_a_stream_leaves_that_stream_on_its_version() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[]);
    let (c1, w1, r1) = fixture("q_v_r8");
    let (c2, w2, _) = fixture("all_linear_r4");
    assert_eq!(upload(&s, "", &[("name", b"bot"), ("config", &c1), ("weights", &w1)]).0, 201);
    assert_eq!(upload(&s, "?promote=false", &[("name", b"bot"), ("config", &c2), ("weights", &w2)]).0, 201);
    let prompt = ids(&r1["prompts"][0]["prompt_token_ids"]);
    let request = |model: &str, stream: bool| {
        json!({"model": model, "prompt": prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": stream})
    };
    let (_, v1) = s.post("/v1/completions", &request("bot@v1", false));
    let (_, v2) = s.post("/v1/completions", &request("bot@v2", false));
    assert_ne!(v1["choices"][0]["text"], v2["choices"][0]["text"]);
    // Start streaming on the current version (v1), promote v2 mid-stream.
    let resp = ureq::post(&format!("{}/v1/completions", s.base)).send_json(request("bot", true)).unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(resp.into_reader()));
    let first = lines.by_ref().find(|l| l.as_ref().is_ok_and(|l| l.starts_with("data: {"))).unwrap().unwrap();
    let (status, _) = s.post("/v1/adapters/bot/versions/2/promote", &json!({}));
    assert_eq!(status, 200);
    let mut text = String::new();
    for line in std::iter::once(Ok(first)).chain(lines) {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(text, v1["choices"][0]["text"].as_str().unwrap(), "the stream switched versions");
    // Requests that start after the promotion see v2.
    let (_, after) = s.post("/v1/completions", &request("bot", false));
    assert_eq!(after["choices"][0]["text"], v2["choices"][0]["text"]);
}

/// A PEFT adapter with random weights (r=16 on q, k, v, o), as files.
fn random_adapter(seed: u64, layers: usize, hidden: usize, kv: usize) -> (Vec<u8>, Vec<u8>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = std::collections::HashMap::new();
    let r = 16;
    for l in 0..layers {
        for (m, out) in [("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)] {
            let mut rand = |n: usize| (0..n).map(|_| rng.gen_range(-0.3f32..0.3)).collect::<Vec<f32>>();
            let key = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            let a = candle_core::Tensor::from_vec(rand(r * hidden), (r, hidden), &candle_core::Device::Cpu).unwrap();
            let b = candle_core::Tensor::from_vec(rand(out * r), (out, r), &candle_core::Device::Cpu).unwrap();
            tensors.insert(format!("{key}.lora_A.weight"), a);
            tensors.insert(format!("{key}.lora_B.weight"), b);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let config = br#"{"peft_type":"LORA","r":16,"lora_alpha":16,"target_modules":["q_proj","k_proj","v_proj","o_proj"]}"#.to_vec();
    (config, std::fs::read(path).unwrap())
}

#[test]
fn thirty_two_distinct_adapters_concurrently_equal_one_at_a_time() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[]);
    // stories260K: 5 layers, hidden 64, 4 kv heads of 8.
    for i in 0..32u64 {
        let (c, w) = random_adapter(i, 5, 64, 32);
        let name = format!("a{i}");
        assert_eq!(upload(&s, "", &[("name", name.as_bytes()), ("config", &c), ("weights", &w)]).0, 201);
    }
    let prompt: Vec<u64> = vec![1, 482, 82, 508, 499, 496];
    let alone: Vec<Vec<u64>> = (0..32).map(|i| greedy(&s, &format!("a{i}"), &prompt, 24)).collect();
    let distinct: std::collections::HashSet<_> = alone.iter().collect();
    assert!(distinct.len() > 16, "adapters barely change the output ({} distinct)", distinct.len());
    let s = &s;
    let together: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..32).map(|i| { let p = &prompt; scope.spawn(move || greedy(s, &format!("a{i}"), p, 24)) }).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(s.metric("lifelora_batch_size_sum") > s.metric("lifelora_batch_size_count"), "no step batched several sequences");
}
