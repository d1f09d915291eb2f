//! The write-ahead log that makes accepted rollout groups durable.
//!
//! With `--data-dir`, every accepted group is appended (protobuf-encoded, length-prefixed,
//! CRC-32 checked) and fsynced *before* the actor gets its ack; every batch the learner
//! acknowledges appends a "consumed" record naming its groups, so a restart brings back
//! exactly the groups that were accepted but not yet trained on.
//!
//! Layout: `DIR/wal-<20-digit segment number>.log`, each segment starting with an 8-byte
//! magic and a checkpoint record (learner step, policy version, next ids). A new segment is
//! started on every open and when the active one grows past its size limit; whole segments
//! whose groups are all consumed are deleted (compaction). A torn frame at the end of the
//! newest segment (a crash mid-append, never acked) is cut off; damage anywhere else stops
//! start-up rather than silently losing acknowledged groups.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use hindsight_proto::v1::RolloutGroup;
use prost::Message as _;

const MAGIC: &[u8; 8] = b"HSWAL001";
/// Default size after which a new segment is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Largest frame accepted when reading (a group is far smaller).
const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

const KIND_CHECKPOINT: u32 = 1;
const KIND_GROUP: u32 = 2;
const KIND_CONSUMED: u32 = 3;

/// One log record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WalRecord {
    /// 1 = checkpoint, 2 = accepted group, 3 = consumed groups.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    /// Sequence number of the group (kind 2).
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// The accepted group (kind 2).
    #[prost(message, optional, tag = "3")]
    pub group: Option<RolloutGroup>,
    /// Sequence numbers of groups trained on or dropped (kind 3).
    #[prost(uint64, repeated, tag = "4")]
    pub consumed: Vec<u64>,
    /// Learner progress (kinds 1 and 3).
    #[prost(uint64, tag = "5")]
    pub learner_step: u64,
    #[prost(uint64, tag = "6")]
    pub policy_version: u64,
    #[prost(uint64, tag = "7")]
    pub next_batch_id: u64,
    #[prost(uint64, tag = "8")]
    pub next_seq: u64,
}

/// Learner progress persisted with consumed / checkpoint records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub learner_step: u64,
    pub policy_version: u64,
    pub next_batch_id: u64,
}

impl Progress {
    /// Field-wise maximum (every field only ever grows; appends may race).
    pub fn max_with(self, other: Progress) -> Progress {
        Progress {
            learner_step: self.learner_step.max(other.learner_step),
            policy_version: self.policy_version.max(other.policy_version),
            next_batch_id: self.next_batch_id.max(other.next_batch_id),
        }
    }
}

/// What a restart finds in the log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Accepted, not consumed groups, by sequence number.
    pub groups: Vec<(u64, RolloutGroup)>,
    /// Last persisted learner progress.
    pub progress: Progress,
    /// First unused group sequence number.
    pub next_seq: u64,
}

/// The write-ahead log (one writer; wrap it in a mutex).
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    active: File,
    active_id: u64,
    active_len: u64,
    /// Live (unconsumed) group count per segment.
    segments: BTreeMap<u64, usize>,
    /// Segment of each live group.
    live: HashMap<u64, u64>,
    progress: Progress,
    next_seq: u64,
    /// Set when a failed append could not be rolled back: no more appends.
    broken: bool,
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

fn frame(record: &WalRecord) -> Vec<u8> {
    let payload = record.encode_to_vec();
    let mut buf = Vec::with_capacity(payload.len() + 8);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    buf
}

/// Reads the records of one segment. Returns them and the byte length of the valid
/// prefix; `Err` describes the first damaged frame (with the records before it).
fn read_segment(path: &Path) -> anyhow::Result<(Vec<WalRecord>, u64, Option<String>)> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < MAGIC.len() {
        return Ok((Vec::new(), 0, Some("segment header is truncated".into())));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        bail!(
            "{} is not a Hindsight write-ahead log segment",
            path.display()
        );
    }
    let mut records = Vec::new();
    let mut pos = MAGIC.len();
    while pos < bytes.len() {
        let Some(header) = bytes.get(pos..pos + 8) else {
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
        let Some(payload) = bytes.get(pos + 8..pos + 8 + len) else {
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
            Ok(record) => records.push(record),
            Err(e) => {
                return Ok((
                    records,
                    pos as u64,
                    Some(format!("undecodable record at byte {pos}: {e}")),
                ))
            }
        }
        pos += 8 + len;
    }
    Ok((records, pos as u64, None))
}

impl Wal {
    /// Opens (creating) the log in `dir`, replays it and starts a fresh segment.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Recovered)> {
        Self::open_with(dir, DEFAULT_SEGMENT_BYTES)
    }

    /// [`Wal::open`] with a custom segment size (tests use tiny segments).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> anyhow::Result<(Self, Recovered)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();

        let mut groups: BTreeMap<u64, (u64, RolloutGroup)> = BTreeMap::new();
        let mut segments: BTreeMap<u64, usize> = BTreeMap::new();
        let mut progress = Progress::default();
        let mut next_seq = 0u64;
        let last = ids.last().copied();
        for &id in &ids {
            let path = segment_path(dir, id);
            let (records, valid_len, damage) = read_segment(&path)?;
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
            segments.entry(id).or_insert(0);
            for record in records {
                match record.kind {
                    KIND_GROUP => {
                        if let Some(group) = record.group {
                            groups.insert(record.seq, (id, group));
                            *segments.entry(id).or_insert(0) += 1;
                            next_seq = next_seq.max(record.seq + 1);
                        }
                    }
                    KIND_CONSUMED | KIND_CHECKPOINT => {
                        for seq in &record.consumed {
                            if let Some((seg, _)) = groups.remove(seq) {
                                if let Some(n) = segments.get_mut(&seg) {
                                    *n = n.saturating_sub(1);
                                }
                            }
                        }
                        progress = progress.max_with(Progress {
                            learner_step: record.learner_step,
                            policy_version: record.policy_version,
                            next_batch_id: record.next_batch_id,
                        });
                        next_seq = next_seq.max(record.next_seq);
                    }
                    other => {
                        tracing::warn!(kind = other, "skipping an unknown write-ahead log record")
                    }
                }
            }
        }

        let active_id = last.map_or(0, |id| id + 1);
        let live = groups.iter().map(|(&seq, (seg, _))| (seq, *seg)).collect();
        let recovered = Recovered {
            groups: groups.into_iter().map(|(seq, (_, g))| (seq, g)).collect(),
            progress,
            next_seq,
        };
        let (active, active_len) = Self::create_segment(dir, active_id, progress, next_seq)?;
        segments.insert(active_id, 0);
        let mut wal = Self {
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(1),
            active,
            active_id,
            active_len,
            segments,
            live,
            progress,
            next_seq,
            broken: false,
        };
        wal.compact()?;
        Ok((wal, recovered))
    }

    fn create_segment(
        dir: &Path,
        id: u64,
        progress: Progress,
        next_seq: u64,
    ) -> io::Result<(File, u64)> {
        let path = segment_path(dir, id);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let checkpoint = frame(&WalRecord {
            kind: KIND_CHECKPOINT,
            learner_step: progress.learner_step,
            policy_version: progress.policy_version,
            next_batch_id: progress.next_batch_id,
            next_seq,
            ..WalRecord::default()
        });
        file.write_all(MAGIC)?;
        file.write_all(&checkpoint)?;
        file.sync_all()?;
        sync_dir(dir)?;
        Ok((file, (MAGIC.len() + checkpoint.len()) as u64))
    }

    fn append(&mut self, record: &WalRecord) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(
                "the write-ahead log is unusable after a failed write",
            ));
        }
        let buf = frame(record);
        let written = self
            .active
            .write_all(&buf)
            .and_then(|()| self.active.sync_data());
        if let Err(e) = written {
            // Roll a partial frame back, so later frames stay readable.
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

    /// Appends an accepted group and fsyncs; only then may the actor be acked.
    pub fn append_group(&mut self, seq: u64, group: &RolloutGroup) -> io::Result<()> {
        self.append(&WalRecord {
            kind: KIND_GROUP,
            seq,
            group: Some(group.clone()),
            ..WalRecord::default()
        })?;
        self.live.insert(seq, self.active_id);
        *self.segments.entry(self.active_id).or_insert(0) += 1;
        self.next_seq = self.next_seq.max(seq + 1);
        self.maybe_rotate()
    }

    /// Records that `seqs` were trained on (or dropped) and the learner's progress.
    pub fn append_consumed(&mut self, seqs: &[u64], progress: Progress) -> io::Result<()> {
        self.append(&WalRecord {
            kind: KIND_CONSUMED,
            consumed: seqs.to_vec(),
            learner_step: progress.learner_step,
            policy_version: progress.policy_version,
            next_batch_id: progress.next_batch_id,
            next_seq: self.next_seq,
            ..WalRecord::default()
        })?;
        self.progress = self.progress.max_with(progress);
        for seq in seqs {
            if let Some(seg) = self.live.remove(seq) {
                if let Some(n) = self.segments.get_mut(&seg) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        self.maybe_rotate()?;
        self.compact()
    }

    fn maybe_rotate(&mut self) -> io::Result<()> {
        if self.active_len < self.segment_bytes {
            return Ok(());
        }
        let id = self.active_id + 1;
        let (file, len) = Self::create_segment(&self.dir, id, self.progress, self.next_seq)?;
        self.active = file;
        self.active_id = id;
        self.active_len = len;
        self.segments.insert(id, 0);
        self.compact()
    }

    /// Deletes the oldest segments while all their groups are consumed (never the active
    /// one). Only a prefix is deleted, so every surviving "consumed" record refers to
    /// groups in surviving segments or to groups already gone.
    fn compact(&mut self) -> io::Result<()> {
        let removable: Vec<u64> = self
            .segments
            .iter()
            .take_while(|(&id, &live)| id != self.active_id && live == 0)
            .map(|(&id, _)| id)
            .collect();
        if removable.is_empty() {
            return Ok(());
        }
        for id in &removable {
            match fs::remove_file(segment_path(&self.dir, *id)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.segments.remove(id);
        }
        sync_dir(&self.dir)
    }

    /// Number of segment files on disk.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Number of groups accepted and not yet consumed.
    pub fn live_groups(&self) -> usize {
        self.live.len()
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
                text: "hi".into(),
            }],
            generation_ms: 9,
        }
    }

    #[test]
    fn crc32_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn groups_survive_reopen_until_consumed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, rec) = Wal::open(dir.path()).unwrap();
            assert!(rec.groups.is_empty());
            wal.append_group(0, &group("p0")).unwrap();
            wal.append_group(1, &group("p1")).unwrap();
            wal.append_group(2, &group("p2")).unwrap();
            let progress = Progress {
                learner_step: 1,
                policy_version: 1,
                next_batch_id: 2,
            };
            wal.append_consumed(&[1], progress).unwrap();
        }
        let (mut wal, rec) = Wal::open(dir.path()).unwrap();
        let ids: Vec<_> = rec
            .groups
            .iter()
            .map(|(s, g)| (*s, g.prompt_id.clone()))
            .collect();
        assert_eq!(ids, vec![(0, "p0".to_string()), (2, "p2".to_string())]);
        assert_eq!(rec.groups[0].1, group("p0"));
        assert_eq!(
            rec.progress,
            Progress {
                learner_step: 1,
                policy_version: 1,
                next_batch_id: 2
            }
        );
        assert_eq!(rec.next_seq, 3);
        let progress = Progress {
            learner_step: 2,
            policy_version: 2,
            next_batch_id: 3,
        };
        wal.append_consumed(&[0, 2], progress).unwrap();
        // Everything consumed: only the active segment is left.
        assert_eq!(wal.segment_count(), 1);
        drop(wal);
        let (_wal, rec) = Wal::open(dir.path()).unwrap();
        assert!(rec.groups.is_empty());
        assert_eq!(rec.progress, progress);
        assert_eq!(rec.next_seq, 3);
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1, "consumed segments are compacted away");
    }

    #[test]
    fn rotation_and_compaction_keep_live_groups() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open_with(dir.path(), 64).unwrap();
        for seq in 0..10 {
            wal.append_group(seq, &group(&format!("p{seq}"))).unwrap();
        }
        assert!(wal.segment_count() > 5);
        let p = Progress {
            learner_step: 1,
            policy_version: 1,
            next_batch_id: 1,
        };
        wal.append_consumed(&(0..8).collect::<Vec<_>>(), p).unwrap();
        assert!(wal.segment_count() <= 4, "{} segments", wal.segment_count());
        assert_eq!(wal.live_groups(), 2);
        drop(wal);
        let (_wal, rec) = Wal::open_with(dir.path(), 64).unwrap();
        let seqs: Vec<u64> = rec.groups.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![8, 9]);
        assert_eq!(rec.next_seq, 10);
    }

    #[test]
    fn torn_tail_is_cut_but_damage_elsewhere_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            wal.append_group(0, &group("p0")).unwrap();
            wal.append_group(1, &group("p1")).unwrap();
        }
        let mut ids: Vec<u64> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| segment_id(e.unwrap().file_name().to_str().unwrap()))
            .collect();
        ids.sort_unstable();
        let newest = segment_path(dir.path(), *ids.last().unwrap());
        // A crash in the middle of appending the third group.
        let len = fs::metadata(&newest).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&newest).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (_wal, rec) = Wal::open(dir.path()).unwrap();
        assert_eq!(rec.groups.len(), 2);
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
        let err = Wal::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
