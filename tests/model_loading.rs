//! Loading Hugging Face directories: sharded safetensors with an index,
//! the served name, and clear errors for broken directories.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lifelora::model::builtin::{builtin_config, random_weights, write_hf_dir};
use lifelora::model::llama::{argmax_rows, LogitsWanted, SequenceInput};
use lifelora::model::loader::load_hf_dir;
use lifelora::model::ModelError;

fn greedy_ids(dir: &std::path::Path) -> Vec<u32> {
    let m = load_hf_dir(dir, None, DType::F32, &Device::Cpu).unwrap();
    let mut cache = m.model.new_cache();
    let logits = m
        .model
        .forward(&mut [SequenceInput {
            tokens: &[1, 50, 60],
            cache: &mut cache,
            logits: LogitsWanted::All,
        }])
        .unwrap();
    argmax_rows(&logits).unwrap()
}

#[test]
fn a_sharded_checkpoint_loads_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    write_hf_dir(&builtin_config(), 3, &single).unwrap();
    // Same weights split over two shards plus an index.
    let sharded = tmp.path().join("sharded");
    write_hf_dir(&builtin_config(), 3, &sharded).unwrap();
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let weights = random_weights(&builtin_config(), 3, &Device::Cpu).unwrap();
    let (mut a, mut b): (HashMap<String, Tensor>, HashMap<String, Tensor>) =
        (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in weights.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    candle_core::safetensors::save(&a, sharded.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    assert_eq!(greedy_ids(&single), greedy_ids(&sharded));
}

#[test]
fn the_served_name_defaults_to_the_directory_and_can_be_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-model");
    write_hf_dir(&builtin_config(), 1, &dir).unwrap();
    assert_eq!(
        load_hf_dir(&dir, None, DType::F32, &Device::Cpu)
            .unwrap()
            .id,
        "my-model"
    );
    assert_eq!(
        load_hf_dir(&dir, Some("prod"), DType::F32, &Device::Cpu)
            .unwrap()
            .id,
        "prod"
    );
}

#[test]
fn broken_directories_fail_with_errors_that_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_hf_dir(&builtin_config(), 1, &dir).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_hf_dir(&dir, None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingFile(f) if f.contains("tokenizer.json")),
        "{e}"
    );

    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    let e = load_hf_dir(&dir, None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::Weights(_)), "{e}");

    std::fs::write(dir.join("config.json"), "{").unwrap();
    let e = load_hf_dir(&dir, None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::InvalidConfig(_)), "{e}");

    let e = load_hf_dir(&tmp.path().join("absent"), None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::MissingFile(_)), "{e}");
}
