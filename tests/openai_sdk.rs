//! The official `openai` Python client lists models and creates completions
//! and chat completions, plain and streamed (tests/openai_client.py).

mod common;

use std::process::Command;

#[test]
fn the_official_openai_python_client_works_against_stories260k() {
    let Some(dir) = common::stories_dir() else {
        return;
    };
    let has_client = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with the `openai` package is required under CI (scripts/test installs it)"
        );
        eprintln!("skipping: python3 -c 'import openai' failed");
        return;
    }
    let server = common::TestServer::start(Some(&dir), &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&server.base)
        .arg(&server.model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
