//! Files of an HF Hub model repo through `hf-hub`, in the standard HF cache layout
//! (`$HF_HOME/hub/models--org--name/{refs,snapshots,blobs}`).
//!
//! `HF_HUB_OFFLINE=1` reads only the cache; `HF_TOKEN` authenticates gated repos; downloads show
//! progress bars.

use crate::error::{load_err, Result};
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
use std::path::PathBuf;

/// Where to look for, and how to get, one repo's files.
#[derive(Debug, Clone)]
pub struct HubRepo {
    /// `org/name`.
    pub repo_id: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// The HF cache root (the `hub` folder), `$HF_HOME/hub` by default.
    pub cache_dir: PathBuf,
    /// Use the cache only (`HF_HUB_OFFLINE`).
    pub offline: bool,
}

impl HubRepo {
    /// Settings from the environment: `HF_HOME`, `HF_HUB_OFFLINE`.
    pub fn from_env(repo_id: &str, revision: Option<&str>) -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
            .unwrap_or(false);
        Self {
            repo_id: repo_id.to_string(),
            revision: revision.unwrap_or("main").to_string(),
            cache_dir: Cache::from_env().path().clone(),
            offline,
        }
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    /// A cached file, or `None`. A revision given as a commit hash is looked up directly in
    /// `snapshots/` (refs only name branches and tags).
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        if let Some(p) = Cache::new(self.cache_dir.clone())
            .repo(self.repo())
            .get(file)
        {
            return Some(p);
        }
        let direct = self
            .cache_dir
            .join(self.repo().folder_name())
            .join("snapshots")
            .join(&self.revision)
            .join(file);
        direct.exists().then_some(direct)
    }

    /// The local path of `file`: from the cache, else downloaded (with a progress bar) unless
    /// offline.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        if self.offline {
            return Err(load_err!(
                "{}@{}: '{file}' is not in the HF cache at {} and HF_HUB_OFFLINE is set; download it first (unset HF_HUB_OFFLINE) or point -m at a local directory",
                self.repo_id,
                self.revision,
                self.cache_dir.display()
            ));
        }
        let cache = Cache::new(self.cache_dir.clone());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        let api = ApiBuilder::from_cache(cache)
            .with_progress(true)
            .with_token(token)
            .build()
            .map_err(|e| load_err!("HF Hub client: {e}"))?;
        api.repo(self.repo()).get(file).map_err(|e| {
            load_err!(
                "{}@{}: cannot download '{file}': {e}",
                self.repo_id,
                self.revision
            )
        })
    }

    /// Like [`get`](Self::get) but `Ok(None)` when the repo simply does not have the file
    /// (optional files such as `generation_config.json`).
    pub fn get_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        if self.offline {
            return Ok(None);
        }
        match self.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.to_string().contains("404") => Ok(None),
            Err(e) => Err(e),
        }
    }
}
