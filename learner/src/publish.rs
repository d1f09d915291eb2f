//! Weight publishing: the learner's `Weights` gRPC service.
//!
//! After every optimizer step the trainer hands the new weights (safetensors bytes) to a
//! [`WeightStore`]; it splits them into chunks, checksums every chunk and the whole payload,
//! keeps the newest few versions, and wakes every actor long-polling `Latest`. Actors then
//! stream the chunks with `Fetch` and verify each checksum before swapping weights in.
//! Chunks are slices of the one payload buffer (`Bytes`), never copies. `Model` answers the
//! model's description (architecture, tokenizer, chat template) so that an actor needs no
//! model files, and every manifest names the model's fingerprint.
//!
//! With a shared directory ([`WeightStore::with_shared_dir`]) every version is also written
//! there once, as a file named in its manifest; actors on the same host that mount the
//! directory map that file instead of fetching the chunks (one copy in the page cache for
//! all of them, nothing copied per actor). A file is written under a temporary name and
//! renamed into place before its manifest is announced, never written again, and removed
//! (unlinked: mappings stay valid) when its version leaves the store.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hindsight_proto::bytes::Bytes;

use hindsight_proto::sha256_hex;
use hindsight_proto::v1::weights_server::{Weights, WeightsServer};
use hindsight_proto::v1::{
    FetchWeightsRequest, LatestWeightsRequest, ModelDescription, ModelRequest, WeightChunk,
    WeightsManifest,
};
use hindsight_service::{GrpcHealth, ServerSecurity};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// The learner's gRPC server on `listener` until `stop` turns true: `Weights` over `store`
/// (rank 0; the other ranks have none) and the standard health service (every entry
/// `NOT_SERVING` until the returned [`GrpcHealth`] says otherwise), behind `security`'s TLS
/// and tokens.
pub async fn serve(
    security: &ServerSecurity,
    store: Option<WeightStore>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(GrpcHealth, JoinHandle<Result<(), tonic::transport::Error>>)> {
    let names: &[&str] = match store {
        Some(_) => &[<WeightsServer<WeightStore> as NamedService>::NAME],
        None => &[],
    };
    let (health, health_server) = GrpcHealth::new(names).await;
    let router = security
        .server()?
        // Weight chunks are large: big HTTP/2 windows keep the transfer from waiting on flow
        // control (the receiver's windows matter most; see the follower's client).
        .initial_connection_window_size(hindsight_proto::WEIGHTS_WINDOW_BYTES)
        .initial_stream_window_size(hindsight_proto::WEIGHTS_WINDOW_BYTES)
        .add_optional_service(store.map(|store| {
            WeightsServer::new(store).max_encoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES)
        }))
        .add_service(health_server);
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ));
    Ok((health, server))
}

/// One published version: its manifest and payload.
pub struct Published {
    pub manifest: WeightsManifest,
    pub payload: Bytes,
    /// Its file in the shared directory, removed when the version is dropped.
    _shared: Option<SharedFile>,
}

/// A version's file in the shared directory; dropping it removes the file.
struct SharedFile(std::path::PathBuf);

impl Drop for SharedFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %self.0.display(), error = %e, "could not remove a shared weights file");
            }
        }
    }
}

/// The name of `version`'s file in the shared directory (with a digest prefix, so that a
/// version republished with other weights after a restart never takes an old file's name).
fn shared_file_name(version: u64, sha256: &str) -> String {
    format!(
        "weights-v{version:08}-{}.safetensors",
        &sha256[..sha256.len().min(16)]
    )
}

/// Whether `name` is a file [`shared_file_name`] makes.
fn is_shared_file_name(name: &str) -> bool {
    name.starts_with("weights-v") && name.ends_with(".safetensors")
}

/// The newest published versions, shared between the trainer and the gRPC service.
#[derive(Clone)]
pub struct WeightStore {
    inner: Arc<Mutex<VecDeque<Arc<Published>>>>,
    /// The newest published version, `None` before the first publication.
    latest: watch::Sender<Option<u64>>,
    keep: usize,
    chunk_bytes: usize,
    model: Option<Arc<ModelDescription>>,
    /// Where every version is also written for co-located actors.
    shared_dir: Option<std::path::PathBuf>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl WeightStore {
    /// `keep` versions stay fetchable (at least 1).
    pub fn new(keep: usize, chunk_bytes: usize) -> Self {
        let (latest, _) = watch::channel(None);
        Self {
            inner: Arc::new(Mutex::new(VecDeque::new())),
            latest,
            keep: keep.max(1),
            chunk_bytes: chunk_bytes.max(1),
            model: None,
            shared_dir: None,
        }
    }

    /// Also writes every version into `dir` for actors on this host (see the module docs),
    /// creating `dir` and removing the weight files an earlier learner left there (one
    /// learner per directory).
    pub fn with_shared_dir(mut self, dir: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        // Proven writable now, not at the first publication.
        hindsight_service::check_writable_dir("--shared-weights-dir", dir)
            .context("preparing the shared weights directory")?;
        for entry in std::fs::read_dir(dir)
            .with_context(|| format!("reading the shared weights directory {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale_tmp = name.starts_with(".weights-v") && name.ends_with(".tmp");
            if is_shared_file_name(&name) || stale_tmp {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        self.shared_dir = Some(dir.to_path_buf());
        Ok(self)
    }

    /// The model these weights belong to: answered by `Model`, its fingerprint named by
    /// every manifest.
    pub fn with_model(mut self, model: ModelDescription) -> Self {
        self.model = Some(Arc::new(model));
        self
    }

    /// The learner's store for a model named `name`: `keep` versions in chunks of
    /// [`hindsight_proto::WEIGHT_CHUNK_BYTES`], `Model` answering the model's description
    /// (config, tokenizer, chat template), every manifest naming its fingerprint.
    pub fn for_model(
        name: &str,
        config: &hindsight_policy::ModelConfig,
        tokenizer: &hindsight_policy::ChatTokenizer,
        keep: usize,
    ) -> anyhow::Result<Self> {
        let description = hindsight_policy::ModelDescription::new(config, tokenizer)?;
        Ok(
            Self::new(keep, hindsight_proto::WEIGHT_CHUNK_BYTES).with_model(ModelDescription {
                fingerprint: description.fingerprint(),
                name: name.to_string(),
                description: description.to_bytes(),
            }),
        )
    }

    /// Publishes `payload` (safetensors bytes) as `version`; returns its manifest.
    pub fn publish(&self, version: u64, learner_step: u64, payload: Vec<u8>) -> WeightsManifest {
        // The shared file is written (under a temporary name: its final name holds the digest)
        // while the digests are computed, so that the disk's wait overlaps the hashing.
        let (chunk_sha256, sha256, written) = std::thread::scope(|scope| {
            let writer = self.shared_dir.as_ref().map(|dir| {
                let payload = &payload;
                scope.spawn(move || write_shared_tmp(dir, version, payload))
            });
            let chunk_sha256 = chunk_digests(&payload, self.chunk_bytes);
            let sha256 = sha256_hex(&payload);
            let written = writer.map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the writing thread panicked")))
            });
            (chunk_sha256, sha256, written)
        });
        let shared = match (self.shared_dir.as_ref(), written) {
            (Some(dir), Some(written)) => {
                let name = shared_file_name(version, &sha256);
                let placed = written.and_then(|tmp| {
                    use anyhow::Context as _;
                    std::fs::rename(&tmp, dir.join(&name))
                        .with_context(|| format!("renaming {} into place", tmp.display()))
                });
                match placed {
                    Ok(()) => Some((name.clone(), SharedFile(dir.join(name)))),
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            version,
                            "could not write the shared weights file; actors fetch this version over gRPC"
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let manifest = WeightsManifest {
            version,
            format: "safetensors".into(),
            total_bytes: payload.len() as u64,
            chunk_bytes: self.chunk_bytes as u32,
            chunk_sha256,
            sha256,
            learner_step,
            published_unix_ms: now_ms(),
            model_fingerprint: self
                .model
                .as_ref()
                .map(|m| m.fingerprint.clone())
                .unwrap_or_default(),
            shared_file: shared
                .as_ref()
                .map(|(name, _)| name.clone())
                .unwrap_or_default(),
        };
        let published = Arc::new(Published {
            manifest: manifest.clone(),
            payload: Bytes::from(payload),
            _shared: shared.map(|(_, file)| file),
        });
        {
            let mut inner = self.inner.lock().expect("weight store lock");
            inner.push_back(published);
            while inner.len() > self.keep {
                inner.pop_front();
            }
        }
        self.latest.send_replace(Some(version));
        ::metrics::gauge!(crate::metrics::POLICY_VERSION).set(version as f64);
        ::metrics::gauge!(crate::metrics::WEIGHT_BYTES).set(manifest.total_bytes as f64);
        manifest
    }

    /// Drops the oldest versions so that the next [`WeightStore::publish`] ends with at most
    /// `keep` (and the newest is kept whatever `keep` is). The learner calls it before each
    /// step, so the step's peak memory and the next payload never meet `keep` older ones. A fetch already
    /// streaming an evicted version finishes (it holds the payload); a new one for it gets
    /// `NOT_FOUND` and moves to the newest.
    pub fn make_room(&self) {
        let mut inner = self.inner.lock().expect("weight store lock");
        while inner.len() > (self.keep - 1).max(1) {
            inner.pop_front();
        }
    }

    /// The newest published version (0 when nothing is published yet).
    pub fn latest_version(&self) -> u64 {
        self.latest.borrow().unwrap_or(0)
    }

    /// The fingerprint of the model, empty when none was given ([`WeightStore::with_model`]).
    pub fn model_fingerprint(&self) -> &str {
        self.model
            .as_ref()
            .map(|m| m.fingerprint.as_str())
            .unwrap_or("")
    }

    /// Whether any version was published.
    pub fn has_published(&self) -> bool {
        self.latest.borrow().is_some()
    }

    fn newest(&self) -> Option<Arc<Published>> {
        self.inner
            .lock()
            .expect("weight store lock")
            .back()
            .cloned()
    }

    fn get(&self, version: u64) -> Option<Arc<Published>> {
        let inner = self.inner.lock().expect("weight store lock");
        if version == 0 {
            inner.back().cloned()
        } else {
            inner
                .iter()
                .find(|p| p.manifest.version == version)
                .cloned()
        }
    }
}

/// Upper bound on a `Latest` long poll.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[tonic::async_trait]
impl Weights for WeightStore {
    async fn latest(
        &self,
        request: Request<LatestWeightsRequest>,
    ) -> Result<Response<WeightsManifest>, Status> {
        let req = request.into_inner();
        let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
        // `any_version`: the caller holds no weights, so any published version will do
        // (version 0 included); otherwise only one newer than `newer_than`.
        let wanted = |v: &Option<u64>| match v {
            Some(v) => req.any_version || *v > req.newer_than,
            None => false,
        };
        if !wait.is_zero() && !wanted(&self.latest.borrow()) {
            let mut rx = self.latest.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(wanted)).await;
        }
        Ok(Response::new(
            self.newest()
                .map(|p| p.manifest.clone())
                .unwrap_or_default(),
        ))
    }

    type FetchStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send + 'static>>;

    async fn fetch(
        &self,
        request: Request<FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = request.into_inner();
        let Some(published) = self.get(req.version) else {
            return Err(Status::not_found(format!(
                "weights version {} is not kept any more (latest is {}); ask Latest again",
                req.version,
                self.latest_version()
            )));
        };
        let chunks = published.manifest.chunk_sha256.len() as u32;
        if req.first_chunk > chunks {
            return Err(Status::invalid_argument(format!(
                "first_chunk {} is past the last chunk ({} chunks)",
                req.first_chunk, chunks
            )));
        }
        let chunk_bytes = published.manifest.chunk_bytes as usize;
        let version = published.manifest.version;
        let stream = tokio_stream::iter((req.first_chunk..chunks).map(move |index| {
            let start = index as usize * chunk_bytes;
            let end = (start + chunk_bytes).min(published.payload.len());
            Ok(WeightChunk {
                version,
                index,
                data: published.payload.slice(start..end),
                sha256: published.manifest.chunk_sha256[index as usize].clone(),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn model(&self, _: Request<ModelRequest>) -> Result<Response<ModelDescription>, Status> {
        match &self.model {
            Some(m) => Ok(Response::new(m.as_ref().clone())),
            None => Err(Status::unimplemented(
                "this learner does not describe its model",
            )),
        }
    }
}

/// Writes `payload` into `dir` under a temporary name (a reader never sees a partial file);
/// [`WeightStore::publish`] renames it into place once its digest is known.
fn write_shared_tmp(
    dir: &std::path::Path,
    version: u64,
    payload: &[u8],
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    let tmp = dir.join(format!(".weights-v{version:08}.safetensors.tmp"));
    std::fs::write(&tmp, payload).with_context(|| format!("writing {}", tmp.display()))?;
    Ok(tmp)
}

/// SHA-256 of every `chunk_bytes` piece of `payload`, the pieces hashed on all cores.
fn chunk_digests(payload: &[u8], chunk_bytes: usize) -> Vec<String> {
    let pieces: Vec<&[u8]> = payload.chunks(chunk_bytes).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(pieces.len().max(1));
    if threads <= 1 {
        return pieces.into_iter().map(sha256_hex).collect();
    }
    let mut out = vec![String::new(); pieces.len()];
    let per = pieces.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (dst, src) in out.chunks_mut(per).zip(pieces.chunks(per)) {
            s.spawn(move || {
                for (d, p) in dst.iter_mut().zip(src) {
                    *d = sha256_hex(p);
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishes_chunks_with_checksums_and_keeps_newest() {
        let store = WeightStore::new(2, 4);
        let m1 = store.publish(1, 1, b"0123456789".to_vec());
        assert_eq!(m1.chunk_sha256.len(), 3);
        assert_eq!(m1.chunk_sha256[2], sha256_hex(b"89"));
        assert_eq!(m1.sha256, sha256_hex(b"0123456789"));
        store.publish(2, 2, b"abc".to_vec());
        store.make_room();
        assert!(store.get(1).is_none(), "room made for version 3");
        assert_eq!(store.get(2).unwrap().manifest.version, 2);
        store.publish(3, 3, b"def".to_vec());
        assert!(store.get(1).is_none());
        assert_eq!(store.get(2).unwrap().manifest.version, 2);
        store.make_room();
        store.make_room();
        assert_eq!(
            store.get(0).unwrap().manifest.version,
            3,
            "the newest always stays"
        );
        let one = WeightStore::new(1, 4);
        one.publish(7, 7, b"x".to_vec());
        one.make_room();
        assert_eq!(
            one.get(0).unwrap().manifest.version,
            7,
            "keep 1 keeps the newest"
        );
        assert_eq!(store.get(0).unwrap().manifest.version, 3);
        let err = store
            .fetch(Request::new(FetchWeightsRequest {
                version: 1,
                first_chunk: 0,
            }))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn latest_long_polls_until_a_newer_version() {
        let store = WeightStore::new(2, 4);
        store.publish(1, 1, vec![1, 2, 3]);
        let s2 = store.clone();
        let waiter = tokio::spawn(async move {
            s2.latest(Request::new(LatestWeightsRequest {
                newer_than: 1,
                wait_ms: 5_000,
                any_version: false,
            }))
            .await
            .unwrap()
            .into_inner()
            .version
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.publish(2, 2, vec![4]);
        assert_eq!(waiter.await.unwrap(), 2);
    }

    #[test]
    fn a_shared_directory_holds_the_kept_versions_as_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Left by an earlier learner: its weight files go, anything else stays.
        std::fs::write(
            d.join("weights-v00000009-0123456789abcdef.safetensors"),
            b"old",
        )
        .unwrap();
        std::fs::write(
            d.join(".weights-v00000009-0123456789abcdef.safetensors.tmp"),
            b"o",
        )
        .unwrap();
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        let store = WeightStore::new(2, 4).with_shared_dir(d).unwrap();
        let files = || {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(files(), vec!["notes.txt"]);
        let m1 = store.publish(1, 1, b"0123456789".to_vec());
        assert_eq!(m1.shared_file, shared_file_name(1, &m1.sha256));
        assert_eq!(
            std::fs::read(d.join(&m1.shared_file)).unwrap(),
            b"0123456789"
        );
        let m2 = store.publish(2, 2, b"abc".to_vec());
        assert_ne!(m1.shared_file, m2.shared_file);
        store.make_room();
        let m3 = store.publish(3, 3, b"def".to_vec());
        // Version 1 left the store, and with it its file; no temporary file stays behind.
        assert_eq!(
            files(),
            vec![
                "notes.txt".to_string(),
                m2.shared_file.clone(),
                m3.shared_file
            ]
        );
        // A learner without a directory names no file.
        assert!(WeightStore::new(2, 4)
            .publish(1, 1, vec![1])
            .shared_file
            .is_empty());
        // A directory that cannot be created is an error that names it.
        let err = WeightStore::new(2, 4)
            .with_shared_dir(&d.join("notes.txt").join("sub"))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("shared weights directory"),
            "{err:#}"
        );
    }
}
