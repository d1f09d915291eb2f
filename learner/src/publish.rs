//! Weight publishing: the learner's `Weights` gRPC service.
//!
//! After every optimizer step the trainer hands the new weights (safetensors bytes) to a
//! [`WeightStore`]; it splits them into chunks, checksums every chunk and the whole payload,
//! keeps the newest few versions, and wakes every actor long-polling `Latest`. Actors then
//! stream the chunks with `Fetch` and verify each checksum before swapping weights in.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hindsight_proto::sha256_hex;
use hindsight_proto::v1::weights_server::Weights;
use hindsight_proto::v1::{
    FetchWeightsRequest, LatestWeightsRequest, WeightChunk, WeightsManifest,
};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// One published version: its manifest and payload.
pub struct Published {
    pub manifest: WeightsManifest,
    pub payload: Arc<Vec<u8>>,
}

/// The newest published versions, shared between the trainer and the gRPC service.
#[derive(Clone)]
pub struct WeightStore {
    inner: Arc<Mutex<VecDeque<Arc<Published>>>>,
    latest: watch::Sender<u64>,
    keep: usize,
    chunk_bytes: usize,
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
        let (latest, _) = watch::channel(0);
        Self {
            inner: Arc::new(Mutex::new(VecDeque::new())),
            latest,
            keep: keep.max(1),
            chunk_bytes: chunk_bytes.max(1),
        }
    }

    /// Publishes `payload` (safetensors bytes) as `version`; returns its manifest.
    pub fn publish(&self, version: u64, learner_step: u64, payload: Vec<u8>) -> WeightsManifest {
        let chunk_sha256 = payload.chunks(self.chunk_bytes).map(sha256_hex).collect();
        let manifest = WeightsManifest {
            version,
            format: "safetensors".into(),
            total_bytes: payload.len() as u64,
            chunk_bytes: self.chunk_bytes as u32,
            chunk_sha256,
            sha256: sha256_hex(&payload),
            learner_step,
            published_unix_ms: now_ms(),
        };
        let published = Arc::new(Published {
            manifest: manifest.clone(),
            payload: Arc::new(payload),
        });
        {
            let mut inner = self.inner.lock().expect("weight store lock");
            inner.push_back(published);
            while inner.len() > self.keep {
                inner.pop_front();
            }
        }
        self.latest.send_replace(version);
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

    pub fn latest_version(&self) -> u64 {
        *self.latest.borrow()
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
        if self.latest_version() <= req.newer_than && !wait.is_zero() {
            let mut rx = self.latest.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > req.newer_than)).await;
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
                data: published.payload[start..end].to_vec(),
                sha256: published.manifest.chunk_sha256[index as usize].clone(),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }
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
}
