//! The registry over the adapter store with PEFT fixtures: versions, pinned
//! references, hot swap, rollback, rebuild from disk, tenant isolation,
//! residency, and nothing written for a refused upload.

mod common;

use candle_core::{DType, Device};
use lifelora::adapter_store::AdapterStore;
use lifelora::lora::peft::LoraLimits;
use lifelora::model::loader::load_hf_dir;
use lifelora::registry::{Registry, RegistryError};

fn files(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = common::fixtures_dir().join("adapters").join(name);
    (std::fs::read(dir.join("adapter_config.json")).unwrap(), std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

fn open(root: &std::path::Path, max_resident: usize) -> Registry {
    let m = load_hf_dir(&common::stories_dir(), None, DType::F32, &Device::Cpu).unwrap();
    Registry::open(AdapterStore::open(root).unwrap(), m.model.lora_sites(), LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, Device::Cpu, max_resident).unwrap()
}

#[test]
fn versions_hot_swap_roll_back_and_survive_a_restart() {
    let (a, b) = (files("q_v_r8"), files("all_linear_r4"));
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), 8);
    let (m1, _) = reg.upload("acme", "support", &a.0, &a.1, true).unwrap();
    assert_eq!((m1.version, m1.rank), (1, 8));
    assert_eq!(m1.target_modules, vec!["q_proj", "v_proj"]);
    let v1 = reg.resolve("acme", "support").unwrap();
    assert_eq!(v1.version, 1);
    // Staged upload: stored, not served.
    let (m2, p) = reg.upload("acme", "support", &b.0, &b.1, false).unwrap();
    assert_eq!((m2.version, m2.parent, p.current), (2, Some(1), Some(1)));
    assert_eq!(reg.resolve("acme", "support").unwrap().version, 1);
    assert_eq!(reg.resolve("acme", "support@v2").unwrap().version, 2);
    // Promote swaps; a request that resolved before keeps its version.
    reg.promote("acme", "support", 2).unwrap();
    assert_eq!(reg.resolve("acme", "support").unwrap().version, 2);
    assert_eq!(v1.adapter.max_rank, 8);
    reg.rollback("acme", "support").unwrap();
    assert_eq!(reg.resolve("acme", "support").unwrap().version, 1);
    drop(reg);
    let again = open(dir.path(), 8);
    assert_eq!(again.resolve("acme", "support").unwrap().version, 1);
    assert_eq!(again.list("acme").unwrap()[0].versions.len(), 2);
}

#[test]
fn tenants_are_isolated_and_refused_uploads_write_nothing() {
    let a = files("q_v_r8");
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), 8);
    reg.upload("acme", "support", &a.0, &a.1, true).unwrap();
    assert!(matches!(reg.resolve("globex", "support"), Err(RegistryError::NotFound(_))));
    assert!(matches!(reg.resolve("acme", "support@v9"), Err(RegistryError::NotFound(_))));
    assert!(matches!(reg.resolve("acme", "support@x"), Err(RegistryError::BadReference(_))));
    let bad = String::from_utf8(a.0.clone()).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
    assert!(reg.upload("acme", "other", bad.as_bytes(), &a.1, true).is_err());
    assert!(!dir.path().join("acme/other").exists());
    assert!(reg.upload("acme", "../escape", &a.0, &a.1, true).is_err());
}

#[test]
fn residency_keeps_at_most_the_limit_and_reloads_on_demand() {
    let (a, b) = (files("q_v_r8"), files("rslora_r16"));
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), 1);
    reg.upload("t", "one", &a.0, &a.1, true).unwrap();
    reg.upload("t", "two", &b.0, &b.1, true).unwrap();
    reg.resolve("t", "one").unwrap();
    reg.resolve("t", "two").unwrap();
    assert_eq!(reg.resident_count(), 1);
    assert_eq!(reg.resolve("t", "one").unwrap().adapter.max_rank, 8);
    assert_eq!(reg.resident_count(), 1);
}

#[test]
fn a_byte_budget_evicts_and_frees_the_dropped_adapters() {
    let (a, b) = (files("q_v_r8"), files("rslora_r16"));
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), 8);
    reg.upload("t", "one", &a.0, &a.1, true).unwrap();
    reg.upload("t", "two", &b.0, &b.1, true).unwrap();
    let one = reg.resolve("t", "one").unwrap().adapter;
    let one_bytes = one.bytes();
    drop(one);
    // A budget that fits one adapter only: loading the second drops the first.
    let reg = reg.with_byte_budget(one_bytes + 1);
    let weak = std::sync::Arc::downgrade(&reg.resolve("t", "one").unwrap().adapter);
    let two = reg.resolve("t", "two").unwrap().adapter;
    assert_eq!(reg.resident_count(), 1);
    assert_eq!(reg.resident_bytes(), two.bytes());
    // Nothing else holds the evicted version: its memory is gone.
    assert!(weak.upgrade().is_none(), "evicted adapter still alive");
}
