//! The write-ahead log: the replay server's only durable state, and where waiting work lives.
//!
//! Everything the exactly-once protocol (ARCHITECTURE.md, "Exactly-once training") needs to
//! survive a crash is a record here: accepted groups (appended and fsynced *before* the actor's
//! ack), batch compositions (fsynced before the batch is sent, so a batch keeps its id and
//! content across restarts), commits (a learner checkpoint covers every batch up to an id: its
//! groups are consumed), stale drops, the prompt queue's position, and learner registrations
//! (the version counter and the orphaned version ranges).
//!
//! Group payloads are not kept in memory: the server holds an index ([`GroupMeta`], with the
//! frame's [`Location`]) and reads a group back ([`read_group`]) when it assembles a batch.
//!
//! One writer thread owns the files ([`Wal::start`]): callers hand it [`WalRecord`]s and wait
//! for the reply; it writes everything that arrived meanwhile and covers it with one fsync
//! (group commit), so the ack still follows the fsync while concurrent streams share it.
//!
//! Layout: `DIR/wal-<20-digit segment number>.log`, each segment an 8-byte magic followed by
//! length-prefixed, CRC-32 checked protobuf frames. A segment starts with a header that
//! re-states the small state ([`LogState`]: progress, queue, live batch compositions,
//! orphans), so only the groups of older segments matter; whole segments of consumed groups
//! are deleted oldest first. Recovery folds every record of every segment, in order, into a
//! [`LogState`] ([`LogState::apply`] is the same fold the writer keeps up to date). A torn
//! frame at the end of the newest segment (a crash mid-append, never acked) is cut off; damage
//! anywhere else stops start-up rather than silently losing acknowledged groups.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{bail, Context as _};
use hindsight_proto::v1::RolloutGroup;
use prost::Message as _;
use tokio::sync::oneshot;

const MAGIC: &[u8; 8] = b"HSWAL002";
/// Default size after which a new segment is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest frame accepted when reading (a group is far smaller).
const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// Frame header: payload length and CRC-32, little endian.
const FRAME_HEADER: usize = 8;

/// Where a frame lives: its segment and byte range (payload only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// The composition of one batch: what a restart needs to assemble exactly the same batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchRecord {
    #[prost(uint64, tag = "1")]
    pub batch_id: u64,
    /// Group sequence numbers, in window order.
    #[prost(uint64, repeated, tag = "2")]
    pub seqs: Vec<u64>,
    /// The learner step s of the HiR schedule.
    #[prost(uint64, tag = "3")]
    pub step: u64,
    #[prost(double, tag = "4")]
    pub lambda: f64,
    /// K, replays wanted.
    #[prost(uint32, tag = "5")]
    pub replays: u32,
    /// The learner version at assembly (for the staleness statistic).
    #[prost(uint64, tag = "6")]
    pub learner_version: u64,
}

/// The prompt queue, as an absolute state (the newest record wins).
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueRecord {
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// Prompts of the current epoch's order already handed out.
    #[prost(uint64, tag = "2")]
    pub position: u64,
    /// Prompts put back (expired, released, stale), served before the epoch order.
    #[prost(uint32, repeated, tag = "3")]
    pub requeued: Vec<u32>,
    /// Prompts leased and not answered yet: re-queued first after a restart.
    #[prost(uint32, repeated, tag = "4")]
    pub outstanding: Vec<u32>,
}

/// A learner registration: the version counter and the versions no live weights descend from.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LearnerRecord {
    /// Newest version any learner was told to publish (never reused).
    #[prost(uint64, tag = "1")]
    pub newest_version: u64,
    /// Orphaned version ranges, inclusive: `[lo0, hi0, lo1, hi1, ...]`.
    #[prost(uint64, repeated, tag = "2")]
    pub orphans: Vec<u64>,
    #[prost(uint64, tag = "3")]
    pub learner_step: u64,
}

/// One log record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WalRecord {
    #[prost(oneof = "Entry", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub entry: Option<Entry>,
}

/// What a record says.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Entry {
    /// An accepted group (durable before its ack).
    #[prost(message, tag = "1")]
    Group(GroupRecord),
    /// A batch composition (durable before the batch is sent).
    #[prost(message, tag = "2")]
    Batch(BatchRecord),
    /// A learner checkpoint covers every batch up to this id.
    #[prost(uint64, tag = "3")]
    Commit(u64),
    /// Groups dropped by the staleness bound (their prompts re-queued).
    #[prost(message, tag = "4")]
    Dropped(SeqList),
    #[prost(message, tag = "5")]
    Queue(QueueRecord),
    #[prost(message, tag = "6")]
    Learner(LearnerRecord),
    /// Segment header: the counters (the rest of the header is ordinary records).
    #[prost(message, tag = "7")]
    Counters(Counters),
}

/// An accepted group and the prompt it answers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupRecord {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint32, tag = "2")]
    pub prompt_index: u32,
    #[prost(message, optional, tag = "3")]
    pub group: Option<RolloutGroup>,
}

/// A list of group sequence numbers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SeqList {
    #[prost(uint64, repeated, tag = "1")]
    pub seqs: Vec<u64>,
}

/// Counters that only grow.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Counters {
    #[prost(uint64, tag = "1")]
    pub next_seq: u64,
    #[prost(uint64, tag = "2")]
    pub next_batch_id: u64,
    #[prost(uint64, tag = "3")]
    pub committed_through: u64,
    /// Steps and version of the newest learner ack (informational; the learner is the truth).
    #[prost(uint64, tag = "4")]
    pub learner_step: u64,
    #[prost(uint64, tag = "5")]
    pub policy_version: u64,
}

impl Counters {
    fn merge(&mut self, other: &Counters) {
        self.next_seq = self.next_seq.max(other.next_seq);
        self.next_batch_id = self.next_batch_id.max(other.next_batch_id);
        self.committed_through = self.committed_through.max(other.committed_through);
        self.learner_step = self.learner_step.max(other.learner_step);
        self.policy_version = self.policy_version.max(other.policy_version);
    }
}

/// A group in the log: where its frame is and which prompt it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupMeta {
    pub location: Location,
    pub prompt_index: u32,
}

/// The log's meaning: the fold of every record, in order.
#[derive(Debug, Clone, Default)]
pub struct LogState {
    /// Live (not consumed) groups.
    pub groups: BTreeMap<u64, GroupMeta>,
    /// Live (not committed) batch compositions.
    pub batches: BTreeMap<u64, BatchRecord>,
    pub counters: Counters,
    pub queue: Option<QueueRecord>,
    pub learner: LearnerRecord,
}

impl LogState {
    /// Applies one record (idempotent for every record a segment header re-states).
    pub fn apply(&mut self, entry: &Entry, location: Location) {
        match entry {
            Entry::Group(g) => {
                self.groups.insert(
                    g.seq,
                    GroupMeta {
                        location,
                        prompt_index: g.prompt_index,
                    },
                );
                self.counters.next_seq = self.counters.next_seq.max(g.seq + 1);
                if let Some(q) = self.queue.as_mut() {
                    // Answered: no longer outstanding (at most one occurrence).
                    if let Some(i) = q.outstanding.iter().position(|&p| p == g.prompt_index) {
                        q.outstanding.swap_remove(i);
                    }
                }
            }
            Entry::Batch(b) => {
                if b.batch_id > self.counters.committed_through {
                    self.batches.insert(b.batch_id, b.clone());
                }
                self.counters.next_batch_id = self.counters.next_batch_id.max(b.batch_id + 1);
            }
            Entry::Commit(through) => {
                let through = *through;
                self.counters.committed_through = self.counters.committed_through.max(through);
                let done: Vec<u64> = self.batches.range(..=through).map(|(&id, _)| id).collect();
                for id in done {
                    if let Some(b) = self.batches.remove(&id) {
                        for seq in &b.seqs {
                            self.groups.remove(seq);
                        }
                    }
                }
            }
            Entry::Dropped(list) => {
                for seq in &list.seqs {
                    self.groups.remove(seq);
                }
            }
            Entry::Queue(q) => self.queue = Some(q.clone()),
            Entry::Learner(l) => {
                if l.newest_version >= self.learner.newest_version {
                    self.learner = l.clone();
                }
            }
            Entry::Counters(c) => self.counters.merge(c),
        }
    }

    /// Groups accepted and not in any live batch, by sequence number.
    pub fn waiting(&self) -> Vec<(u64, GroupMeta)> {
        let claimed: BTreeSet<u64> = self
            .batches
            .values()
            .flat_map(|b| b.seqs.iter().copied())
            .collect();
        self.groups
            .iter()
            .filter(|(seq, _)| !claimed.contains(seq))
            .map(|(&s, &m)| (s, m))
            .collect()
    }

    /// The records that re-state this state at the start of a segment.
    fn header(&self) -> Vec<Entry> {
        let mut out = vec![
            Entry::Counters(self.counters),
            Entry::Learner(self.learner.clone()),
        ];
        if let Some(q) = &self.queue {
            out.push(Entry::Queue(q.clone()));
        }
        out.extend(self.batches.values().cloned().map(Entry::Batch));
        out
    }
}

/// CRC-32 (IEEE 802.3, reflected), bitwise with a small table.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("wal-{id:020}.log"))
}

fn segment_id(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Appends the frame of `entry` to `buf`; returns the payload's offset within `buf` and length.
/// (A `WalRecord` holds only the oneof, so its encoding is the oneof's: no copy of the entry.)
fn push_frame(buf: &mut Vec<u8>, entry: &Entry) -> (usize, u32) {
    let len = entry.encoded_len();
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    let at = buf.len();
    entry.encode(buf);
    let crc = crc32(&buf[at..]);
    buf[at - 4..at].copy_from_slice(&crc.to_le_bytes());
    (at, len as u32)
}

/// The records of one segment with their locations, the byte length of the valid prefix, and
/// a description of the first damaged frame if any.
type SegmentRead = (Vec<(Entry, Location)>, u64, Option<String>);

fn read_segment(path: &Path, id: u64) -> anyhow::Result<SegmentRead> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < MAGIC.len() {
        return Ok((Vec::new(), 0, Some("segment header is truncated".into())));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        bail!(
            "{} is not a Hindsight write-ahead log segment (or one of an older format)",
            path.display()
        );
    }
    let mut records = Vec::new();
    let mut pos = MAGIC.len();
    while pos < bytes.len() {
        let Some(header) = bytes.get(pos..pos + FRAME_HEADER) else {
            return Ok((
                records,
                pos as u64,
                Some(format!("torn frame header at byte {pos}")),
            ));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME_BYTES {
            return Ok((
                records,
                pos as u64,
                Some(format!("implausible frame length at byte {pos}")),
            ));
        }
        let start = pos + FRAME_HEADER;
        let Some(payload) = bytes.get(start..start + len) else {
            return Ok((
                records,
                pos as u64,
                Some(format!("torn frame at byte {pos}")),
            ));
        };
        if crc32(payload) != crc {
            return Ok((
                records,
                pos as u64,
                Some(format!("checksum mismatch at byte {pos}")),
            ));
        }
        match WalRecord::decode(payload) {
            Ok(WalRecord { entry: Some(entry) }) => records.push((
                entry,
                Location {
                    segment: id,
                    offset: start as u64,
                    len: len as u32,
                },
            )),
            Ok(WalRecord { entry: None }) => {
                tracing::warn!(segment = %path.display(), pos, "skipping an unknown write-ahead log record")
            }
            Err(e) => {
                return Ok((
                    records,
                    pos as u64,
                    Some(format!("undecodable record at byte {pos}: {e}")),
                ))
            }
        }
        pos = start + len;
    }
    Ok((records, pos as u64, None))
}

/// Reads the group at `location` back from the log in `dir`.
pub fn read_group(dir: &Path, location: Location) -> io::Result<GroupRecord> {
    let path = segment_path(dir, location.segment);
    let file = File::open(&path)?;
    let mut payload = vec![0u8; location.len as usize];
    read_exact_at(&file, &mut payload, location.offset)?;
    match WalRecord::decode(payload.as_slice()) {
        Ok(WalRecord {
            entry: Some(Entry::Group(g)),
        }) => Ok(g),
        Ok(_) => Err(io::Error::other(format!(
            "{}@{} is not a group record",
            path.display(),
            location.offset
        ))),
        Err(e) => Err(io::Error::other(format!(
            "{}@{}: {e}",
            path.display(),
            location.offset
        ))),
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// What a write returns: the location of each record written, in order.
pub type Written = io::Result<Vec<Location>>;

struct Job {
    entries: Vec<Entry>,
    reply: oneshot::Sender<Written>,
}

/// The segment files, owned by the writer thread.
struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    active: File,
    active_id: u64,
    active_len: u64,
    /// Live group count per segment.
    live: BTreeMap<u64, usize>,
    state: LogState,
    /// Set when a failed append could not be rolled back: no more appends.
    broken: bool,
}

impl Segments {
    fn create_segment(dir: &Path, id: u64, state: &LogState) -> io::Result<(File, u64)> {
        let path = segment_path(dir, id);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut buf = MAGIC.to_vec();
        for entry in state.header() {
            push_frame(&mut buf, &entry);
        }
        file.write_all(&buf)?;
        file.sync_all()?;
        sync_dir(dir)?;
        Ok((file, buf.len() as u64))
    }

    /// Writes `jobs` in order with one fsync and answers each.
    fn write_jobs(&mut self, jobs: Vec<Job>) {
        let mut buf = Vec::new();
        let mut placed: Vec<Vec<(usize, u32)>> = Vec::with_capacity(jobs.len());
        for job in &jobs {
            placed.push(
                job.entries
                    .iter()
                    .map(|e| push_frame(&mut buf, e))
                    .collect(),
            );
        }
        let result = self.append(&buf);
        let base = self.active_len - if result.is_ok() { buf.len() as u64 } else { 0 };
        for (job, spots) in jobs.into_iter().zip(placed) {
            let answer = match &result {
                Ok(()) => {
                    let locations: Vec<Location> = spots
                        .iter()
                        .map(|&(at, len)| Location {
                            segment: self.active_id,
                            offset: base + at as u64,
                            len,
                        })
                        .collect();
                    for (entry, &loc) in job.entries.iter().zip(&locations) {
                        self.note(entry, loc);
                    }
                    Ok(locations)
                }
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let _ = job.reply.send(answer);
        }
        if result.is_ok() {
            if let Err(e) = self.maybe_rotate().and_then(|()| self.compact()) {
                tracing::error!(error = %e, "write-ahead log rotation or compaction failed");
            }
        }
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(
                "the write-ahead log is unusable after a failed write",
            ));
        }
        let written = self
            .active
            .write_all(buf)
            .and_then(|()| self.active.sync_data());
        if let Err(e) = written {
            // Roll a partial write back, so later frames stay readable.
            if self
                .active
                .set_len(self.active_len)
                .and_then(|()| self.active.sync_data())
                .is_err()
            {
                self.broken = true;
            }
            return Err(e);
        }
        self.active_len += buf.len() as u64;
        Ok(())
    }

    /// Keeps the fold and the per-segment live counts up to date.
    fn note(&mut self, entry: &Entry, location: Location) {
        let before: BTreeSet<u64> = match entry {
            Entry::Commit(_) | Entry::Dropped(_) => self.state.groups.keys().copied().collect(),
            _ => BTreeSet::new(),
        };
        self.state.apply(entry, location);
        match entry {
            Entry::Group(_) => *self.live.entry(location.segment).or_insert(0) += 1,
            Entry::Commit(_) | Entry::Dropped(_) => {
                for seq in before {
                    if !self.state.groups.contains_key(&seq) {
                        self.forget(seq);
                    }
                }
            }
            _ => {}
        }
    }

    fn forget(&mut self, _seq: u64) {
        // Recount lazily: the group's segment is known only through the state, which no longer
        // has it; recompute the per-segment counts from the live groups (cheap: an index walk).
        self.live.clear();
        for meta in self.state.groups.values() {
            *self.live.entry(meta.location.segment).or_insert(0) += 1;
        }
    }

    fn maybe_rotate(&mut self) -> io::Result<()> {
        if self.active_len < self.segment_bytes {
            return Ok(());
        }
        let id = self.active_id + 1;
        let (file, len) = Self::create_segment(&self.dir, id, &self.state)?;
        self.active = file;
        self.active_id = id;
        self.active_len = len;
        Ok(())
    }

    /// Deletes the oldest segments while none of their groups is live (never the active one).
    /// Headers re-state everything else, so only groups tie a segment down.
    fn compact(&mut self) -> io::Result<()> {
        let first_live = self
            .state
            .groups
            .values()
            .map(|m| m.location.segment)
            .min()
            .unwrap_or(self.active_id)
            .min(self.active_id);
        let mut removed = false;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(segment_id) else {
                continue;
            };
            if id < first_live {
                match fs::remove_file(entry.path()) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Handle to the writer thread. Cloning shares it; the thread ends when every handle is gone.
#[derive(Clone)]
pub struct Wal {
    dir: PathBuf,
    tx: mpsc::Sender<Job>,
    thread: std::sync::Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (creating) the log in `dir`, replays it, starts a fresh segment and the writer.
    /// Returns the handle and the recovered state.
    pub fn start(dir: &Path, segment_bytes: u64) -> anyhow::Result<(Self, LogState)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut state = LogState::default();
        let last = ids.last().copied();
        for &id in &ids {
            let path = segment_path(dir, id);
            let (records, valid_len, damage) = read_segment(&path, id)?;
            if let Some(damage) = damage {
                if Some(id) != last {
                    bail!(
                        "write-ahead log segment {} is damaged ({damage}); refusing to start \
                         rather than lose acknowledged groups",
                        path.display()
                    );
                }
                tracing::warn!(segment = %path.display(), %damage, "cutting off a torn write-ahead log tail");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid_len.max(MAGIC.len() as u64))?;
                if valid_len < MAGIC.len() as u64 {
                    let mut f = OpenOptions::new().write(true).open(&path)?;
                    f.write_all(MAGIC)?;
                }
                f.sync_all()?;
            }
            for (entry, location) in &records {
                state.apply(entry, *location);
            }
        }
        let active_id = last.map_or(0, |id| id + 1);
        let (active, active_len) = Segments::create_segment(dir, active_id, &state)
            .with_context(|| format!("starting a write-ahead log segment in {}", dir.display()))?;
        let mut segments = Segments {
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(1),
            active,
            active_id,
            active_len,
            live: BTreeMap::new(),
            state: state.clone(),
            broken: false,
        };
        segments.forget(0);
        segments
            .compact()
            .context("compacting the write-ahead log")?;
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        jobs.push(more);
                    }
                    segments.write_jobs(jobs);
                }
            })
            .context("starting the write-ahead log writer")?;
        Ok((
            Self {
                dir: dir.to_owned(),
                tx,
                thread: std::sync::Arc::new(std::sync::Mutex::new(Some(thread))),
            },
            state,
        ))
    }

    /// The log's directory (for [`read_group`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues `entries` for writing; the receiver answers once they are fsynced. Records are
    /// written in the order of the calls, so callers that must order records (e.g. a queue
    /// record after the state change it describes) submit them under the same lock.
    pub fn submit(&self, entries: Vec<Entry>) -> oneshot::Receiver<Written> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(job)) = self.tx.send(Job { entries, reply }) {
            let _ = job.reply.send(Err(io::Error::other(
                "the write-ahead log writer has stopped",
            )));
        }
        rx
    }

    /// Writes `entries` and waits for the fsync (async).
    pub async fn write(&self, entries: Vec<Entry>) -> Written {
        self.submit(entries)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the write-ahead log writer has stopped")))
    }

    /// Writes `entries` and waits for the fsync (blocking; not on an async worker).
    pub fn write_blocking(&self, entries: Vec<Entry>) -> Written {
        self.submit(entries)
            .blocking_recv()
            .unwrap_or_else(|_| Err(io::Error::other("the write-ahead log writer has stopped")))
    }

    /// Stops the writer after everything queued is written (blocking).
    pub fn close(self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        drop(self.tx);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_proto::v1::Response;

    fn group(id: &str) -> RolloutGroup {
        RolloutGroup {
            actor_id: "a".into(),
            prompt_id: id.into(),
            lease_id: format!("lease-{id}"),
            policy_version: 3,
            responses: vec![Response {
                token_ids: vec![1, 2],
                logprobs: vec![-0.5, -0.1],
                entropies: vec![1.0, 0.5],
                finished: true,
                text: String::new(),
            }],
            generation_ms: 9,
            model_fingerprint: String::new(),
        }
    }

    fn g(seq: u64) -> Entry {
        Entry::Group(GroupRecord {
            seq,
            prompt_index: seq as u32,
            group: Some(group(&format!("p{seq}"))),
        })
    }

    fn batch(id: u64, seqs: &[u64]) -> Entry {
        Entry::Batch(BatchRecord {
            batch_id: id,
            seqs: seqs.to_vec(),
            step: id,
            lambda: 1.5,
            replays: 2,
            learner_version: id - 1,
        })
    }

    fn segments(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .and_then(segment_id)
                    .is_some()
            })
            .count()
    }

    #[test]
    fn crc32_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn groups_batches_and_commits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, state) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
            assert!(state.groups.is_empty());
            let locs = wal.write_blocking(vec![g(0), g(1), g(2), g(3)]).unwrap();
            assert_eq!(locs.len(), 4);
            let back = read_group(wal.dir(), locs[2]).unwrap();
            assert_eq!(back.seq, 2);
            assert_eq!(back.group.unwrap(), group("p2"));
            wal.write_blocking(vec![batch(1, &[0, 1]), batch(2, &[2])])
                .unwrap();
            wal.write_blocking(vec![Entry::Commit(1)]).unwrap();
            wal.close();
        }
        let (wal, state) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(state.groups.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(state.batches.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(state.batches[&2].seqs, vec![2]);
        assert_eq!(
            state.waiting().iter().map(|w| w.0).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(state.counters.next_seq, 4);
        assert_eq!(state.counters.next_batch_id, 3);
        assert_eq!(state.counters.committed_through, 1);
        // The surviving group reads back from its (older) segment.
        let back = read_group(wal.dir(), state.groups[&3].location).unwrap();
        assert_eq!(back.group.unwrap().prompt_id, "p3");
        wal.write_blocking(vec![
            Entry::Commit(2),
            Entry::Dropped(SeqList { seqs: vec![3] }),
        ])
        .unwrap();
        wal.close();
        let (wal, state) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert!(state.groups.is_empty() && state.batches.is_empty());
        assert_eq!(
            state.counters.next_batch_id, 3,
            "batch ids are never reused"
        );
        assert_eq!(state.counters.committed_through, 2);
        wal.close();
        assert_eq!(
            segments(dir.path()),
            1,
            "consumed segments are compacted away"
        );
    }

    #[test]
    fn rotation_restates_batches_queue_and_versions_and_keeps_live_groups() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::start(dir.path(), 100).unwrap();
        for seq in 0..10 {
            wal.write_blocking(vec![g(seq)]).unwrap();
        }
        assert!(segments(dir.path()) > 3);
        wal.write_blocking(vec![
            Entry::Queue(QueueRecord {
                epoch: 2,
                position: 7,
                requeued: vec![4],
                outstanding: vec![11, 12],
            }),
            Entry::Learner(LearnerRecord {
                newest_version: 9,
                orphans: vec![5, 8],
                learner_step: 4,
            }),
            batch(1, &[0, 1, 2, 3, 4, 5, 6, 7]),
        ])
        .unwrap();
        wal.write_blocking(vec![Entry::Commit(1)]).unwrap();
        // Groups 8 and 9 still tie their segments down; the rest is gone.
        for seq in 10..14 {
            wal.write_blocking(vec![g(seq)]).unwrap();
        }
        wal.write_blocking(vec![batch(2, &[8, 9])]).unwrap();
        let before = segments(dir.path());
        wal.close();
        let (wal, state) = Wal::start(dir.path(), 100).unwrap();
        assert!(segments(dir.path()) <= before + 1);
        assert_eq!(
            state.groups.keys().copied().collect::<Vec<_>>(),
            vec![8, 9, 10, 11, 12, 13]
        );
        assert_eq!(state.batches.keys().copied().collect::<Vec<_>>(), vec![2]);
        let q = state.queue.clone().unwrap();
        assert_eq!((q.epoch, q.position, q.requeued.clone()), (2, 7, vec![4]));
        assert!(
            q.outstanding.is_empty(),
            "prompts 11 and 12 were answered: {q:?}"
        );
        assert_eq!(state.learner.newest_version, 9);
        assert_eq!(state.learner.orphans, vec![5, 8]);
        for (seq, meta) in &state.groups {
            assert_eq!(read_group(wal.dir(), meta.location).unwrap().seq, *seq);
        }
        wal.close();
    }

    #[test]
    fn concurrent_writers_share_fsyncs_and_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        let receivers: Vec<_> = (0..50).map(|s| wal.submit(vec![g(s)])).collect();
        let mut last = None;
        for rx in receivers {
            let loc = rx.blocking_recv().unwrap().unwrap()[0];
            if let Some(prev) = last {
                assert!(loc.offset > prev, "records are written in submission order");
            }
            last = Some(loc.offset);
        }
        wal.close();
        let (_wal, state) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(state.groups.len(), 50);
    }

    #[test]
    fn torn_tail_is_cut_but_damage_elsewhere_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
            wal.write_blocking(vec![g(0), g(1)]).unwrap();
            wal.close();
        }
        let mut ids: Vec<u64> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| segment_id(e.unwrap().file_name().to_str().unwrap()))
            .collect();
        ids.sort_unstable();
        let newest = segment_path(dir.path(), *ids.last().unwrap());
        // A crash in the middle of appending a third group.
        let len = fs::metadata(&newest).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&newest).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (wal, state) = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.close();
        assert_eq!(state.groups.len(), 2);
        assert_eq!(
            fs::metadata(&newest).unwrap().len(),
            len,
            "torn tail cut off"
        );
        // Now the segment with the groups is no longer the newest: flip a payload byte.
        let mut bytes = fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&newest, bytes).unwrap();
        let err = Wal::start(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
