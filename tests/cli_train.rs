//! `lifelora train`: JSONL in, PEFT adapter out, bad lines reported by
//! number, the result loadable by the server's PEFT reader.

mod common;

use std::process::Command;

use candle_core::{DType, Device};
use lifelora::lora::peft::{load_dir, LoraLimits};
use lifelora::model::loader::load_hf_dir;

#[test]
fn train_writes_a_loadable_peft_adapter_and_reports_bad_lines() {
    let model_dir = common::stories_dir();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data.jsonl");
    std::fs::write(
        &data,
        [
            r#"{"prompt": "Once upon a time", "completion": " there was a cat"}"#,
            r#"{"messages": [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "A dog ran home"}]}"#,
            r#"{"prompt": "no answer"}"#,
            r#"not json"#,
            r#"{"messages": [{"role": "user", "content": "ends with the user"}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = work.path().join("adapter");
    let run = Command::new(env!("CARGO_BIN_EXE_lifelora"))
        .args(["train", "--model"])
        .arg(&model_dir)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--steps", "20", "--learning-rate", "0.01", "--rank", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    for line in ["line 3", "line 4", "line 5"] {
        assert!(stderr.contains(line), "bad {line} not reported: {stderr}");
    }
    assert!(stdout.contains("trained on 2 examples (3 lines skipped)"), "{stdout}");
    let model = load_hf_dir(&model_dir, None, DType::F32, &Device::Cpu).unwrap().model;
    let adapter = load_dir(&out, &model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(adapter.len(), 5 * 7, "every module of every layer");
    assert_eq!(adapter.max_rank, 4);

    let bad = Command::new(env!("CARGO_BIN_EXE_lifelora"))
        .args(["train", "--model"])
        .arg(&model_dir)
        .args(["--data", "/nonexistent.jsonl", "--out"])
        .arg(work.path().join("never"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.jsonl"));
    assert!(!work.path().join("never").exists(), "nothing written on failure");
}
