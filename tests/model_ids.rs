//! The model id is what the user typed: a model fetched by name is served
//! under that name, a path under its file or directory name; each can be
//! retrieved by id (the official client's `models.retrieve`), and an
//! unknown name says which names `fetch` knows.

mod common;

use common::TestServer;
use serde_json::Value;

#[test]
fn a_fetched_model_is_served_under_the_name_it_was_fetched_by() {
    common::smollm2_gguf();
    let s = TestServer::start(Some(std::path::Path::new("smollm2")), &[]);
    assert_eq!(s.model, "smollm2");
    let (status, body) = s.get("/v1/models/smollm2");
    assert_eq!(status, 200, "{body}");
    let card: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((card["id"].as_str(), card["object"].as_str()), (Some("smollm2"), Some("model")));
    let (status, body) = s.get("/v1/models/nope");
    assert_eq!(status, 404, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
}

#[test]
fn a_path_is_served_under_its_name_and_an_unknown_name_lists_the_known_ones() {
    let s = TestServer::start(Some(&common::stories_dir()), &[]);
    assert_eq!(s.model, "stories260K");
    assert_eq!(s.get("/v1/models/stories260K").0, 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifelora")).args(["serve", "--port", "0", "--model", "no-such-model"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("smollm2"), "{stderr}");
}

#[test]
fn a_port_in_use_is_reported_before_the_model_loads_and_logs_have_no_colour_off_a_terminal() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifelora"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port, "--model"])
        .arg(common::stories_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("model loaded"), "the model was loaded first: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI codes in a log that is not a terminal: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
