//! Models named by their Hugging Face Hub id (`org/name`): found in the
//! local Hub cache when already there (the layout `huggingface_hub` and
//! `hf-hub` share), otherwise downloaded into it through the `hf-hub` crate.
//!
//! A spec is `org/name`, optionally `@revision` and/or `:FILE` (one GGUF file
//! of a repository that holds several): `org/name@main:model.Q4_0.gguf`.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::progress::Progress;

/// A model on the Hub, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
    /// One file of the repository (a GGUF), when the repository holds several.
    pub file: Option<String>,
}

/// Why a Hub model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{repo} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set")]
    Offline { repo: String, cache: String },
    #[error("{repo}: {message}")]
    Download { repo: String, message: String },
    #[error("{repo} holds no model this server loads (a config.json with safetensors weights, or a GGUF file); files: {files}")]
    NoModel { repo: String, files: String },
    #[error("{repo} holds several GGUF files; name one as {repo}:FILE ({files})")]
    SeveralGguf { repo: String, files: String },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

fn part_ok(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl HubSpec {
    /// Reads `org/name[@revision][:FILE]`; `None` when `spec` is not of that shape.
    pub fn parse(spec: &str) -> Option<HubSpec> {
        let (rest, file) = match spec.split_once(':') {
            Some((r, f)) => (r, Some(f)),
            None => (spec, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) => (r, Some(v)),
            None => (rest, None),
        };
        let (org, name) = repo.split_once('/')?;
        if !part_ok(org) || !part_ok(name) {
            return None;
        }
        if let Some(f) = file {
            if f.is_empty() || f.starts_with('/') || f.split('/').any(|p| !part_ok(p)) {
                return None;
            }
        }
        let revision = revision.unwrap_or("main");
        if !revision.split('/').all(part_ok) {
            return None;
        }
        Some(HubSpec { repo: repo.to_string(), revision: revision.to_string(), file: file.map(str::to_string) })
    }

    /// The Hub cache's folder for this repository.
    fn repo_dir(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }
}

/// The Hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (as the Hub's own clients choose it).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// What of a repository's files this server loads: the whole directory of
/// a safetensors checkpoint, or one GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Checkpoint(Vec<String>),
    Gguf(String),
}

/// Chooses from a repository's file list.
fn choose(spec: &HubSpec, files: &[String]) -> Result<Wanted, HubError> {
    if let Some(f) = &spec.file {
        return Ok(Wanted::Gguf(f.clone()));
    }
    let has = |n: &str| files.iter().any(|f| f == n);
    let weights: Vec<&String> = files.iter().filter(|f| f.ends_with(".safetensors") && !f.contains('/')).collect();
    if has("config.json") && !weights.is_empty() {
        let mut wanted: Vec<String> = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"]
            .into_iter()
            .filter(|n| has(n))
            .map(str::to_string)
            .collect();
        wanted.extend(weights.into_iter().cloned());
        return Ok(Wanted::Checkpoint(wanted));
    }
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [one] => Ok(Wanted::Gguf((*one).clone())),
        [] => Err(HubError::NoModel { repo: spec.repo.clone(), files: files.join(", ") }),
        many => Err(HubError::SeveralGguf { repo: spec.repo.clone(), files: many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") }),
    }
}

/// The model already in the cache, if every file it needs is there.
pub fn cached(spec: &HubSpec, cache: &Path) -> Result<Option<PathBuf>, HubError> {
    let dir = spec.repo_dir(cache);
    let commit = std::fs::read_to_string(dir.join("refs").join(&spec.revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| spec.revision.clone());
    let snapshot = dir.join("snapshots").join(&commit);
    if commit.contains('/') || commit.contains("..") || !snapshot.is_dir() {
        return Ok(None);
    }
    let files = list(&snapshot);
    let wanted = match choose(spec, &files) {
        Ok(w) => w,
        // An incomplete snapshot: the Hub may hold what it lacks.
        Err(HubError::NoModel { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(match wanted {
        Wanted::Gguf(f) => Some(snapshot.join(f)).filter(|p| p.is_file()),
        Wanted::Checkpoint(fs) => {
            let complete = fs.iter().all(|f| snapshot.join(f).is_file()) && snapshot.join("tokenizer.json").is_file();
            complete.then_some(snapshot)
        }
    })
}

/// The model: from the cache when there, else downloaded into it (with
/// `HF_ENDPOINT`, and `HF_TOKEN` or the cache's token file), showing progress.
pub fn resolve(spec: &HubSpec) -> Result<PathBuf, HubError> {
    let cache = cache_dir();
    if let Some(path) = cached(spec, &cache)? {
        return Ok(path);
    }
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && !v.is_empty()) {
        return Err(HubError::Offline { repo: spec.repo.clone(), cache: cache.display().to_string() });
    }
    download(spec, &cache)
}

fn download(spec: &HubSpec, cache: &Path) -> Result<PathBuf, HubError> {
    let failed = |e: hf_hub::api::sync::ApiError| HubError::Download { repo: spec.repo.clone(), message: e.to_string() };
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf())).with_progress(false);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(failed)?;
    let repo = api.repo(Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision.clone()));
    let wanted = match &spec.file {
        Some(f) => Wanted::Gguf(f.clone()),
        None => {
            let info = repo.info().map_err(failed)?;
            choose(spec, &info.siblings.into_iter().map(|s| s.rfilename).collect::<Vec<_>>())?
        }
    };
    let get = |file: &str| repo.download_with_progress(file, Progress::bytes(&format!("{} {file}", spec.repo))).map_err(failed);
    match wanted {
        Wanted::Gguf(f) => get(&f),
        Wanted::Checkpoint(files) => {
            let mut dir = None;
            for f in &files {
                dir = get(f)?.parent().map(Path::to_path_buf);
            }
            dir.ok_or_else(|| HubError::NoModel { repo: spec.repo.clone(), files: files.join(", ") })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_read_repo_revision_and_file_and_refuse_paths() {
        assert_eq!(
            HubSpec::parse("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(HubSpec { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "main".into(), file: None })
        );
        assert_eq!(
            HubSpec::parse("org/name@v1.0:q/model.Q4_0.gguf"),
            Some(HubSpec { repo: "org/name".into(), revision: "v1.0".into(), file: Some("q/model.Q4_0.gguf".into()) })
        );
        for bad in ["name", "/abs/path", "./x", "org/..", "a/b/c", "org/name:../x", "org/name@..", "org/name:", "org /x"] {
            assert_eq!(HubSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_checkpoint_takes_its_config_tokenizer_and_weights_and_one_gguf_is_chosen_alone() {
        let spec = HubSpec::parse("o/n").unwrap();
        let files: Vec<String> = ["README.md", "config.json", "tokenizer.json", "model.safetensors", "onnx/model.onnx"].map(String::from).into();
        assert_eq!(
            choose(&spec, &files).unwrap(),
            Wanted::Checkpoint(["config.json", "tokenizer.json", "model.safetensors"].map(String::from).into())
        );
        assert_eq!(choose(&spec, &["a.gguf".to_string()]).unwrap(), Wanted::Gguf("a.gguf".into()));
        assert!(matches!(choose(&spec, &["a.gguf".to_string(), "b.gguf".to_string()]), Err(HubError::SeveralGguf { .. })));
        assert!(matches!(choose(&spec, &["README.md".to_string()]), Err(HubError::NoModel { .. })));
    }
}
