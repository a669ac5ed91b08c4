//! The official `openai` Python client lists models and creates completions
//! and chat completions, plain and streamed (tests/openai_client.py), on
//! stories260K and, in English, on SmolLM2; and its `files` and
//! `fine_tuning.jobs` calls upload a JSONL file and train a new adapter.

mod common;

use std::process::Command;

/// The `openai` package must be importable (scripts/test installs it in .venv).
fn require_client() {
    let ok = Command::new(common::python()).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    assert!(ok, "python3 with the `openai` package is required: run scripts/test (it installs it into .venv)");
}

fn run_client(server: &common::TestServer, extra: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(common::python()).arg(script).arg(&server.base).arg(&server.model).args(extra).output().unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_official_openai_python_client_works_against_stories260k() {
    let dir = common::stories_dir();
    require_client();
    run_client(&common::TestServer::start(Some(&dir), &[]), &[]);
}

#[test]
fn the_official_openai_python_client_uploads_files_and_runs_fine_tuning_jobs() {
    let dir = common::stories_dir();
    require_client();
    // stories260K drifts far from itself when taught anything: the gate's drift bounds are for real models.
    let env = [("LIFELORA_LEARNING__MAX_BASE_DRIFT", "10"), ("LIFELORA_LEARNING__MIN_BASE_AGREEMENT", "0"), ("LIFELORA_LEARNING__MAX_REGRESSION", "10")];
    run_client(&common::TestServer::start(Some(&dir), &env), &["--fine-tune"]);
}

#[test]
fn smollm2_answers_the_openai_client_in_english_plain_and_streamed() {
    let gguf = common::smollm2_gguf();
    require_client();
    run_client(&common::TestServer::start(Some(&gguf), &[]), &["--english"]);
}
