//! The remote store: one bucket (and prefix) of an S3-compatible object store, reached with
//! `object_store` (retries, range reads, multipart uploads).
//!
//! A remote is named by a URL:
//! `http(s)://HOST[:PORT]/BUCKET[/PREFIX][?region=REGION][&keepalive=true|false]`, the S3
//! endpoint in path style (as Garage, MinIO and Ceph serve it; AWS too). `https` is used where
//! the URL says so; `http` only where it says so. The region defaults to `us-east-1`.
//! Credentials never come from the URL: see [`Credentials`].
//!
//! `keepalive` says whether idle connections are kept for the next request. It is off by
//! default for `http` and on for `https`. On a kept connection, Garage's answer with a small
//! body (4 to 20 KB: a manifest, a chunk that compressed well) waited 42 to 44 ms here (the
//! response's second write meets the client's delayed ACK), against 1.1 ms on a fresh
//! connection; a plain TCP connection costs little, a TLS handshake more.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::chunk::{self, ChunkError, ChunkId};
use crate::manifest::{self, Manifest, ManifestError, ManifestId, RawId};

/// An access key and its secret.
#[derive(Clone)]
pub struct Credentials {
    /// The key's id.
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, secret hidden)", self.access_key)
    }
}

impl Credentials {
    /// From `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    ///
    /// # Errors
    /// A message naming the variable that is missing.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| format!("{name} is not set (the remote's credentials)"))
        };
        Ok(Self {
            access_key: var("AWS_ACCESS_KEY_ID")?,
            secret_key: var("AWS_SECRET_ACCESS_KEY")?,
        })
    }
}

/// Why a remote call failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not one this module takes.
    #[error("remote URL {url:?}: {problem}")]
    Url {
        /// The URL (credentials never appear in one).
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// The store refused the credentials.
    #[error("remote store {store}: the credentials were refused: {message}")]
    Refused {
        /// The store's URL.
        store: String,
        /// What it said.
        message: String,
    },
    /// The object does not exist.
    #[error("remote store {store}: {key} does not exist")]
    Missing {
        /// The store's URL.
        store: String,
        /// The object's key.
        key: String,
    },
    /// The store could not be reached or failed the call.
    #[error("remote store {store}: {message}")]
    Unavailable {
        /// The store's URL.
        store: String,
        /// What went wrong.
        message: String,
    },
    /// A manifest failed its checks.
    #[error("remote store {store}: {source}")]
    Manifest {
        /// The store's URL.
        store: String,
        /// The check that failed.
        source: ManifestError,
    },
    /// A chunk failed its checks.
    #[error("remote store {store}: {source}")]
    Chunk {
        /// The store's URL.
        store: String,
        /// The check that failed.
        source: ChunkError,
    },
}

/// One remote store.
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

/// A chunk object in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    /// Its id.
    pub id: ChunkId,
    /// Bytes stored (compressed).
    pub size: u64,
    /// When it was last written, in Unix milliseconds.
    pub modified_ms: i64,
}

/// A manifest in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// The snapshot it describes.
    pub snapshot: RawId,
    /// Its id.
    pub id: ManifestId,
    /// Bytes of its object.
    pub size: u64,
    /// When it was written, in Unix milliseconds.
    pub modified_ms: i64,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Chunks listed.
    pub chunks: usize,
    /// Manifests read.
    pub manifests: usize,
    /// Chunks removed.
    pub removed: usize,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Chunks no manifest names, kept because they are younger than the grace period.
    pub kept_young: usize,
}

/// A 32-hex-digit id.
fn parse_raw_id(s: &str) -> Option<RawId> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Remote {
    /// The remote at `url` (see the module docs), with `credentials`.
    ///
    /// # Errors
    /// [`RemoteError::Url`] for a URL this does not take.
    pub fn new(url: &str, credentials: &Credentials) -> Result<Self, RemoteError> {
        let bad = |problem: &str| RemoteError::Url {
            url: url.into(),
            problem: problem.into(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected http(s)://HOST[:PORT]/BUCKET[/PREFIX]"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut parts = rest.splitn(3, '/');
        let host = parts
            .next()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let bucket = parts
            .next()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket"))?;
        let prefix = parts.next().unwrap_or("").trim_matches('/').to_string();
        let mut region = "us-east-1".to_string();
        let mut keepalive = scheme == "https";
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("region", r)) if !r.is_empty() => region = r.into(),
                Some(("keepalive", "true")) => keepalive = true,
                Some(("keepalive", "false")) => keepalive = false,
                _ => {
                    return Err(bad(
                        "the query parameters are region=REGION and keepalive=true|false",
                    ));
                }
            }
        }
        let mut options = object_store::ClientOptions::new()
            .with_allow_http(scheme == "http")
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(60));
        if !keepalive {
            options = options.with_pool_max_idle_per_host(0);
        }
        let store = AmazonS3Builder::new()
            .with_endpoint(format!("{scheme}://{host}"))
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(bucket)
            .with_region(region)
            .with_access_key_id(&credentials.access_key)
            .with_secret_access_key(&credentials.secret_key)
            // A store that cannot answer is told as such within about half a minute, not the
            // client's default three minutes: a restore is waiting on it.
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: std::time::Duration::from_secs(20),
            })
            .with_client_options(options)
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            url: url.into(),
            prefix: if prefix.is_empty() {
                "snap".into()
            } else {
                prefix
            },
        })
    }

    /// The store's URL, for messages.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    fn error(&self, key: &str, e: object_store::Error) -> RemoteError {
        let store = self.url.clone();
        match e {
            object_store::Error::NotFound { .. } => RemoteError::Missing {
                store,
                key: key.into(),
            },
            object_store::Error::Unauthenticated { source, .. }
            | object_store::Error::PermissionDenied { source, .. } => RemoteError::Refused {
                store,
                message: source.to_string(),
            },
            other => {
                let message = other.to_string();
                if message.contains("InvalidAccessKeyId")
                    || message.contains("SignatureDoesNotMatch")
                    || message.contains("Forbidden")
                {
                    RemoteError::Refused { store, message }
                } else {
                    RemoteError::Unavailable { store, message }
                }
            }
        }
    }

    /// Stores `content` as a chunk unless a chunk of that content is there already, written
    /// at or after `fresh_after_ms` (Unix milliseconds, the store's clock): an older one is
    /// written again, which renews its age, so that a sweep cannot take it before the manifest
    /// that is about to name it exists (see [`Remote::sweep`]). Returns its id and the bytes
    /// sent (0: deduplicated).
    ///
    /// # Errors
    /// The store's error, or [`RemoteError::Chunk`] for content too large.
    pub async fn put_chunk(
        &self,
        content: &[u8],
        fresh_after_ms: i64,
    ) -> Result<(ChunkId, u64), RemoteError> {
        self.put_chunk_with(content, None, fresh_after_ms).await
    }

    /// As [`Remote::put_chunk`]; `zstd`, if given, is one zstd frame of `content` (a memory
    /// layer's frame), stored as it is instead of compressing `content` again (see
    /// [`chunk::seal_compressed`]).
    ///
    /// # Errors
    /// As [`Remote::put_chunk`].
    pub async fn put_chunk_with(
        &self,
        content: &[u8],
        zstd: Option<&[u8]>,
        fresh_after_ms: i64,
    ) -> Result<(ChunkId, u64), RemoteError> {
        if content.len() > chunk::MAX_CHUNK {
            return Err(RemoteError::Chunk {
                store: self.url.clone(),
                source: ChunkError::TooLarge(content.len()),
            });
        }
        let id = ChunkId::of(content);
        let key = id.key(&self.prefix);
        let path = ObjectPath::from(key.as_str());
        match self.store.head(&path).await {
            Ok(meta) if meta.last_modified.timestamp_millis() >= fresh_after_ms => {
                return Ok((id, 0));
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(&key, e)),
        }
        let sealed = match zstd {
            Some(z) => chunk::seal_compressed(content, z),
            None => chunk::seal(content, 3),
        };
        let (_, object) = sealed.map_err(|source| RemoteError::Chunk {
            store: self.url.clone(),
            source,
        })?;
        let sent = object.len() as u64;
        self.store
            .put(&path, PutPayload::from(object))
            .await
            .map_err(|e| self.error(&key, e))?;
        Ok((id, sent))
    }

    /// The content of chunk `id`, checked (see [`chunk::open`]).
    ///
    /// # Errors
    /// [`RemoteError::Missing`], the store's error, or [`RemoteError::Chunk`] naming the chunk.
    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, RemoteError> {
        self.get_chunk_parts(id).await.map(|(content, _)| content)
    }

    /// As [`Remote::get_chunk`], with the zstd frame the chunk was stored as, if it was (see
    /// [`chunk::open_parts`]).
    ///
    /// # Errors
    /// As [`Remote::get_chunk`].
    pub async fn get_chunk_parts(
        &self,
        id: &ChunkId,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), RemoteError> {
        let key = id.key(&self.prefix);
        let path = ObjectPath::from(key.as_str());
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.error(&key, e))?
            .bytes()
            .await
            .map_err(|e| self.error(&key, e))?;
        chunk::open_parts(id, &bytes).map_err(|source| RemoteError::Chunk {
            store: self.url.clone(),
            source,
        })
    }

    /// Removes chunk `id` (nothing if it is not there).
    ///
    /// # Errors
    /// The store's error.
    pub async fn delete_chunk(&self, id: &ChunkId) -> Result<(), RemoteError> {
        let key = id.key(&self.prefix);
        match self.store.delete(&ObjectPath::from(key.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&key, e)),
        }
    }

    /// Stores `manifest` (after every chunk it names: the caller's order); returns its id and
    /// the bytes of its object.
    ///
    /// # Errors
    /// [`RemoteError::Unavailable`] for a manifest that does not encode, or the store's error.
    pub async fn put_manifest(
        &self,
        manifest: &Manifest,
    ) -> Result<(ManifestId, u64), RemoteError> {
        let (id, object) =
            manifest::encode(manifest).map_err(|message| RemoteError::Unavailable {
                store: self.url.clone(),
                message: format!("encoding the manifest: {message}"),
            })?;
        let key = manifest.key(&self.prefix, &id);
        let len = object.len() as u64;
        self.store
            .put(&ObjectPath::from(key.as_str()), PutPayload::from(object))
            .await
            .map_err(|e| self.error(&key, e))?;
        Ok((id, len))
    }

    /// Manifest `id` of snapshot `snapshot`, checked (see [`manifest::decode`]).
    ///
    /// # Errors
    /// [`RemoteError::Missing`], the store's error, or [`RemoteError::Manifest`].
    pub async fn get_manifest(
        &self,
        snapshot: &RawId,
        id: &ManifestId,
    ) -> Result<Manifest, RemoteError> {
        let bytes = self.manifest_object(snapshot, id).await?;
        self.decode_manifest(id, &bytes)
    }

    async fn manifest_object(
        &self,
        snapshot: &RawId,
        id: &ManifestId,
    ) -> Result<Vec<u8>, RemoteError> {
        let key = format!("{}{id}", Manifest::snapshot_prefix(&self.prefix, snapshot));
        let bytes = self
            .store
            .get(&ObjectPath::from(key.as_str()))
            .await
            .map_err(|e| self.error(&key, e))?
            .bytes()
            .await
            .map_err(|e| self.error(&key, e))?;
        Ok(bytes.to_vec())
    }

    fn decode_manifest(&self, id: &ManifestId, bytes: &[u8]) -> Result<Manifest, RemoteError> {
        manifest::decode(id, bytes).map_err(|source| RemoteError::Manifest {
            store: self.url.clone(),
            source,
        })
    }

    /// As [`Remote::get_manifest`], through `cache`: a manifest never changes under its name
    /// (its digest), so a cached copy (checked against that digest when read) is as good as the
    /// store's, and saves a round trip (about 40 ms for a small object from Garage here).
    ///
    /// # Errors
    /// As [`Remote::get_manifest`].
    pub async fn get_manifest_cached(
        &self,
        snapshot: &RawId,
        id: &ManifestId,
        cache: &crate::cache::ChunkCache,
    ) -> Result<Manifest, RemoteError> {
        let as_chunk = ChunkId(id.0);
        if let Some(object) = cache.get(&as_chunk) {
            if let Ok(m) = manifest::decode(id, &object) {
                return Ok(m);
            }
        }
        let bytes = self.manifest_object(snapshot, id).await?;
        let m = self.decode_manifest(id, &bytes)?;
        cache.put(&as_chunk, &bytes);
        Ok(m)
    }

    /// Every manifest in the store (from the listing alone: nothing is read), by snapshot.
    ///
    /// # Errors
    /// The store's error.
    pub async fn list_manifests(&self) -> Result<Vec<StoredManifest>, RemoteError> {
        self.manifests_under(&format!("{}/v1/snapshots", self.prefix))
            .await
    }

    /// The manifests of snapshot `snapshot`.
    ///
    /// # Errors
    /// The store's error.
    pub async fn manifests_of(&self, snapshot: &RawId) -> Result<Vec<StoredManifest>, RemoteError> {
        let prefix = Manifest::snapshot_prefix(&self.prefix, snapshot);
        self.manifests_under(prefix.trim_end_matches('/')).await
    }

    async fn manifests_under(&self, prefix: &str) -> Result<Vec<StoredManifest>, RemoteError> {
        let objects: Vec<_> = self
            .store
            .list(Some(&ObjectPath::from(prefix)))
            .try_collect()
            .await
            .map_err(|e| self.error(prefix, e))?;
        let mut out: Vec<StoredManifest> = objects
            .into_iter()
            .filter_map(|m| {
                let mut parts = m.location.parts().collect::<Vec<_>>().into_iter().rev();
                let id = parts.next()?.as_ref().parse().ok()?;
                let snapshot = parse_raw_id(parts.next()?.as_ref())?;
                Some(StoredManifest {
                    snapshot,
                    id,
                    size: m.size,
                    modified_ms: m.last_modified.timestamp_millis(),
                })
            })
            .collect();
        out.sort_by_key(|m| (m.snapshot, m.id));
        Ok(out)
    }

    /// Removes every manifest of snapshot `snapshot`; returns how many there were. Its chunks
    /// stay until a sweep finds no manifest naming them.
    ///
    /// # Errors
    /// The store's error.
    pub async fn delete_manifests(&self, snapshot: &RawId) -> Result<usize, RemoteError> {
        let prefix = Manifest::snapshot_prefix(&self.prefix, snapshot);
        let found: Vec<_> = self
            .store
            .list(Some(&ObjectPath::from(prefix.trim_end_matches('/'))))
            .try_collect()
            .await
            .map_err(|e| self.error(&prefix, e))?;
        for m in &found {
            match self.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(m.location.as_ref(), e)),
            }
        }
        Ok(found.len())
    }

    /// Removes the chunks no manifest names that are older than `grace_ms` (by the store's
    /// clock, as `now_ms` gives it).
    ///
    /// The protocol, safe while other hosts push (no conditional writes needed):
    /// 1. the sweep lists the chunks first, then the manifests, and reads every manifest; one
    ///    that cannot be read stops the sweep before anything is removed;
    /// 2. a push reuses a chunk only if it was written less than `grace_ms / 2` before the push
    ///    began ([`Remote::put_chunk`]'s `fresh_after_ms`), else writes it again, and gives up
    ///    without writing its manifest once `grace_ms / 2` has passed since it began.
    ///
    /// So when a push writes its manifest, every chunk it names is younger than `grace_ms`; a
    /// chunk the sweep removes was older than that when it was listed, so the pushing host's
    /// manifest existed before the listing of manifests, which then named the chunk. Clocks
    /// must agree to well within `grace_ms / 2`.
    ///
    /// # Errors
    /// The store's error, or a manifest that cannot be read (nothing is removed then).
    pub async fn sweep(&self, grace_ms: i64, now_ms: i64) -> Result<Swept, RemoteError> {
        let chunks = self.list_chunks().await?;
        let manifests = self.list_manifests().await?;
        let mut named = std::collections::HashSet::new();
        for m in &manifests {
            named.extend(self.get_manifest(&m.snapshot, &m.id).await?.chunks());
        }
        let mut swept = Swept {
            chunks: chunks.len(),
            manifests: manifests.len(),
            ..Swept::default()
        };
        for c in chunks {
            if named.contains(&c.id) {
                continue;
            }
            if now_ms - c.modified_ms < grace_ms {
                swept.kept_young += 1;
                continue;
            }
            self.delete_chunk(&c.id).await?;
            swept.removed += 1;
            swept.removed_bytes += c.size;
        }
        Ok(swept)
    }

    /// Every chunk in the store, with its size and age.
    ///
    /// # Errors
    /// The store's error.
    pub async fn list_chunks(&self) -> Result<Vec<StoredChunk>, RemoteError> {
        let prefix = format!("{}/v1/chunks", self.prefix);
        let objects: Vec<_> = self
            .store
            .list(Some(&ObjectPath::from(prefix.as_str())))
            .try_collect()
            .await
            .map_err(|e| self.error(&prefix, e))?;
        Ok(objects
            .into_iter()
            .filter_map(|m| {
                let id = m.location.filename()?.parse().ok()?;
                Some(StoredChunk {
                    id,
                    size: m.size,
                    modified_ms: m.last_modified.timestamp_millis(),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let creds = Credentials {
            access_key: "k".into(),
            secret_key: "never-shown".into(),
        };
        let r = Remote::new("http://127.0.0.1:3900/bucket/fleet/a?region=garage", &creds).unwrap();
        assert!(Remote::new("http://h:1/b?region=r&keepalive=true", &creds).is_ok());
        assert_eq!(r.prefix, "fleet/a");
        assert_eq!(
            Remote::new("https://s3.example/b", &creds).unwrap().prefix,
            "snap"
        );
        for bad in [
            "s3://bucket",
            "ftp://h/b",
            "http://h",
            "http://h/",
            "http://h/b?key=secret",
            "http://h/b?keepalive=maybe",
        ] {
            assert!(Remote::new(bad, &creds).is_err(), "{bad}");
        }
        assert!(!format!("{creds:?}").contains("never-shown"));
    }
}
