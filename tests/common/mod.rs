//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` beside the checkout. Missing: fail under CI, skip elsewhere.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared");
    if dir.join("models/stories260K/config.json").exists() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!("../shared is missing at {} and CI is set: these tests must run", dir.display());
    }
    eprintln!("skipping: ../shared not found at {}", dir.display());
    None
}

/// The stories260K model directory.
pub fn stories_dir() -> Option<PathBuf> {
    shared_dir().map(|d| d.join("models/stories260K"))
}
