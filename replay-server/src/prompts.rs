//! The training prompt set and the epoch queue that hands prompts out.
//!
//! At start-up every record is compiled (a record that does not compile is a start-up
//! error naming it) and its instruction chat-templated once, so leasing is a lookup.
//! [`PromptQueue`] cycles over the set in epochs, each shuffled deterministically from the
//! seed and the epoch number; prompts whose lease expired are put back at the front.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use hindsight_constraints::{CompiledRecord, PromptRecord};

use crate::codec::PromptCodec;

/// One compiled training record, ready to lease.
pub struct PromptEntry {
    /// Position in the prompt set.
    pub index: usize,
    /// Stable record id (`Prompt.prompt_id`).
    pub id: String,
    /// The compiled record: verifiers, descriptions, rewrite.
    pub compiled: CompiledRecord,
    /// The full user instruction.
    pub instruction: String,
    /// The instruction chat-templated and tokenized.
    pub prompt_token_ids: Vec<u32>,
    /// Constraint ids, in the instruction's order.
    pub instruction_ids: Vec<String>,
}

impl std::fmt::Debug for PromptEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptEntry")
            .field("index", &self.index)
            .field("id", &self.id)
            .field("instruction_ids", &self.instruction_ids)
            .finish_non_exhaustive()
    }
}

/// All training records, by position and by id.
#[derive(Debug, Default)]
pub struct PromptSet {
    entries: Vec<Arc<PromptEntry>>,
    by_id: HashMap<String, usize>,
}

impl PromptSet {
    /// Loads `path` (JSONL) or generates `count` records from `seed`, then compiles them.
    pub fn load(
        path: Option<&Path>,
        count: usize,
        seed: u64,
        codec: &dyn PromptCodec,
    ) -> anyhow::Result<Self> {
        let records = match path {
            Some(path) => hindsight_constraints::load_jsonl(path)
                .map_err(|e| anyhow!("loading prompts from {}: {e}", path.display()))?,
            None => hindsight_constraints::generate_prompts(seed, count),
        };
        Self::from_records(records, codec)
    }

    /// Compiles and tokenizes `records`. Fails on an empty set, a duplicate id, or a
    /// record that does not compile (naming it).
    pub fn from_records(
        records: Vec<PromptRecord>,
        codec: &dyn PromptCodec,
    ) -> anyhow::Result<Self> {
        if records.is_empty() {
            bail!("the prompt set is empty");
        }
        let mut set = Self::default();
        for (index, record) in records.into_iter().enumerate() {
            let id = record.id.clone();
            if set.by_id.contains_key(&id) {
                bail!("duplicate prompt id {id:?} (record {index})");
            }
            let instruction_ids: Vec<String> = record
                .constraints
                .iter()
                .map(|spec| spec.instruction_id.clone())
                .collect();
            let compiled = record
                .compile()
                .map_err(|e| anyhow!("prompt {id:?} (record {index}) does not compile: {e}"))?;
            let instruction = compiled.instruction();
            let prompt_token_ids = codec
                .encode_chat(&instruction)
                .with_context(|| format!("tokenizing prompt {id:?} (record {index})"))?;
            set.by_id.insert(id.clone(), index);
            set.entries.push(Arc::new(PromptEntry {
                index,
                id,
                compiled,
                instruction,
                prompt_token_ids,
                instruction_ids,
            }));
        }
        Ok(set)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no records (never, for a set built by [`PromptSet::load`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The record at `index`.
    pub fn get(&self, index: usize) -> Option<&Arc<PromptEntry>> {
        self.entries.get(index)
    }

    /// The record with id `id`.
    pub fn by_id(&self, id: &str) -> Option<&Arc<PromptEntry>> {
        self.by_id.get(id).and_then(|&i| self.entries.get(i))
    }
}

/// The prompt queue: prompts put back (expired or released leases, stale groups) first, then
/// the current epoch's shuffled order from `position`; a new epoch starts when it runs dry.
/// Its whole state is (epoch, position, requeued), which the write-ahead log persists.
#[derive(Debug)]
pub struct PromptQueue {
    requeued: VecDeque<usize>,
    order: Vec<usize>,
    position: usize,
    len: usize,
    seed: u64,
    epoch: u64,
}

impl PromptQueue {
    /// A queue over `len` prompts, starting at epoch 0.
    pub fn new(len: usize, seed: u64) -> Self {
        Self::restore(len, seed, 0, 0, Vec::new())
    }

    /// The queue at `epoch`, `position`, with `requeued` served first (indices out of range
    /// are dropped: the prompt set shrank).
    pub fn restore(
        len: usize,
        seed: u64,
        epoch: u64,
        position: usize,
        requeued: Vec<usize>,
    ) -> Self {
        Self {
            requeued: requeued.into_iter().filter(|&i| i < len).collect(),
            order: epoch_order(len, seed, epoch),
            position: position.min(len),
            len,
            seed,
            epoch,
        }
    }

    /// Next prompt to lease (None only for an empty prompt set).
    pub fn pop(&mut self) -> Option<usize> {
        if let Some(i) = self.requeued.pop_front() {
            return Some(i);
        }
        if self.len == 0 {
            return None;
        }
        if self.position >= self.order.len() {
            self.epoch += 1;
            self.order = epoch_order(self.len, self.seed, self.epoch);
            self.position = 0;
        }
        let i = self.order.get(self.position).copied();
        self.position += 1;
        i
    }

    /// Puts a prompt back at the front (expired / released lease, stale group).
    pub fn requeue(&mut self, index: usize) {
        self.requeued.push_front(index);
    }

    /// Removes a put-back prompt; false when it is not waiting there (someone else leased it
    /// in the meantime).
    pub fn take(&mut self, index: usize) -> bool {
        match self.requeued.iter().position(|&i| i == index) {
            Some(pos) => self.requeued.remove(pos).is_some(),
            None => false,
        }
    }

    /// Put-back prompts waiting (they are leased before the epoch's next).
    pub fn put_back(&self) -> usize {
        self.requeued.len()
    }

    /// Prompts queued in the current epoch (put back ones included).
    pub fn len(&self) -> usize {
        self.requeued.len() + self.order.len().saturating_sub(self.position)
    }

    /// True when nothing is queued (the next pop starts a new epoch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current epoch number.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// (epoch, position in its order, put-back prompts): everything needed to restore it.
    pub fn snapshot(&self) -> (u64, usize, Vec<usize>) {
        (
            self.epoch,
            self.position,
            self.requeued.iter().copied().collect(),
        )
    }
}

/// SplitMix64: a tiny, portable PRNG, so epoch orders never change across platforms or
/// dependency upgrades.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of epoch `epoch`: a Fisher-Yates shuffle seeded by `seed` and `epoch`.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_deterministic_permutations() {
        let a = epoch_order(50, 7, 1);
        assert_eq!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 7, 2));
        assert_ne!(a, epoch_order(50, 8, 1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn queue_cycles_and_requeues_at_front() {
        let mut q = PromptQueue::new(3, 1);
        let first: Vec<usize> = (0..3).map(|_| q.pop().unwrap()).collect();
        assert_eq!(q.len(), 0);
        assert_eq!(q.epoch(), 0);
        let next = q.pop().unwrap();
        assert_eq!(q.epoch(), 1);
        assert_eq!(q.len(), 2);
        q.requeue(first[0]);
        assert_eq!(q.pop(), Some(first[0]));
        assert!(next < 3);
        assert_eq!(PromptQueue::new(0, 1).pop(), None);
    }

    #[test]
    fn a_restored_queue_continues_where_the_snapshot_was() {
        let mut q = PromptQueue::new(10, 3);
        let _ = (0..13).map(|_| q.pop()).collect::<Vec<_>>();
        q.requeue(5);
        let (epoch, position, requeued) = q.snapshot();
        let mut back = PromptQueue::restore(10, 3, epoch, position, requeued);
        let a: Vec<_> = (0..25).map(|_| q.pop()).collect();
        let b: Vec<_> = (0..25).map(|_| back.pop()).collect();
        assert_eq!(a, b);
        assert_eq!(a[0], Some(5));
    }
}
