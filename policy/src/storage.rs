//! Where the CPU engine's f32 weights live: an [`F32Buf`] is a cheap-to-clone view of f32
//! values that this process either owns (a `Vec`) or reads from a safetensors file mapped
//! read-only ([`MappedSafetensors`]).
//!
//! The mapped case is how co-located actors take a new weight version: the learner writes
//! each version once into a directory it shares with them (`--shared-weights-dir`), and every
//! actor on that host maps the same file. The page cache holds one copy for all of them, and
//! an actor builds its engine from the mapping without copying the weights: the fused
//! projections (q/k/v, gate/up) stay as the separate tensors they are in the file, the
//! matmul kernel reading each row where it lies ([`crate::kernels::Mat::f32_parts`]).
//!
//! A mapped file must not change while it is mapped: the learner writes a version to a
//! temporary name, renames it into place, never writes it again, and removes it only by
//! unlinking (which keeps existing mappings valid).

use std::collections::BTreeMap;
use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context};

/// What an [`F32Buf`] points into.
enum Backing {
    /// Owns the values; they are read through [`F32Buf`]'s pointer.
    Owned(#[allow(dead_code)] Vec<f32>),
    Mapped(memmap2::Mmap),
}

/// Shared, immutable f32 values: owned or in a mapped file (see the module docs). Clones
/// share the storage.
#[derive(Clone)]
pub struct F32Buf {
    backing: Arc<Backing>,
    ptr: *const f32,
    len: usize,
}

// SAFETY: the storage behind `ptr` is immutable for as long as `backing` lives (an owned
// `Vec` is never written after construction; a mapped file is never written, see the module
// docs), and `backing` is shared by `Arc`.
unsafe impl Send for F32Buf {}
unsafe impl Sync for F32Buf {}

impl F32Buf {
    /// Whether the values lie in a mapped file (not in this process's heap).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.backing, Backing::Mapped(_))
    }
}

impl From<Vec<f32>> for F32Buf {
    fn from(v: Vec<f32>) -> Self {
        let (ptr, len) = (v.as_ptr(), v.len());
        Self {
            backing: Arc::new(Backing::Owned(v)),
            ptr,
            len,
        }
    }
}

impl Deref for F32Buf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr..ptr + len` lies inside `backing` (checked when the buffer was made),
        // is aligned for f32, and is never written while shared (see the impls above).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for F32Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("F32Buf")
            .field("len", &self.len)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

/// One tensor of a mapped file: shape, dtype and byte range in the file.
struct Entry {
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
    bytes: Range<usize>,
}

/// A safetensors file mapped read-only, its pages read in up front (so that generating with
/// it never waits on the disk), its header parsed and checked.
pub struct MappedSafetensors {
    map: Arc<Backing>,
    tensors: BTreeMap<String, Entry>,
}

impl MappedSafetensors {
    /// Maps `path`, which must be exactly `expected_len` bytes when given (a version's
    /// manifest names its size), and parses its header (malformed headers, tensors outside
    /// the file and unreadable dtypes are refused).
    pub fn open(path: &Path, expected_len: Option<u64>) -> anyhow::Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len();
        if let Some(want) = expected_len {
            ensure!(
                len == want,
                "{} has {len} bytes, the manifest says {want}",
                path.display()
            );
        }
        // SAFETY: the file is never modified or truncated while mapped (see the module docs:
        // whoever publishes it writes a new file per version and only unlinks old ones).
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        let base = map.as_ptr() as usize;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| anyhow::anyhow!("{}: safetensors: {e}", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            crate::weights::ensure_readable(&name, view.dtype())?;
            let start = view.data().as_ptr() as usize - base;
            tensors.insert(
                name,
                Entry {
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                    bytes: start..start + view.data().len(),
                },
            );
        }
        drop(st);
        Ok(Self {
            map: Arc::new(Backing::Mapped(map)),
            tensors,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &*self.map {
            Backing::Mapped(m) => m,
            Backing::Owned(_) => unreachable!("a MappedSafetensors is always mapped"),
        }
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(n, e)| (n.as_str(), e.shape.as_slice()))
    }

    /// Tensor `name` as f32 values: a view into the mapping when it is stored as aligned
    /// f32 (the learner's publications are), otherwise converted into an owned buffer.
    pub fn f32(&self, name: &str) -> anyhow::Result<F32Buf> {
        let e = self
            .tensors
            .get(name)
            .with_context(|| format!("missing weight tensor {name}"))?;
        let data = &self.bytes()[e.bytes.clone()];
        if e.dtype == safetensors::Dtype::F32
            && cfg!(target_endian = "little")
            && (data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>())
        {
            return Ok(F32Buf {
                backing: self.map.clone(),
                ptr: data.as_ptr().cast::<f32>(),
                len: data.len() / 4,
            });
        }
        let view = safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), data)
            .map_err(|err| anyhow::anyhow!("tensor {name}: {err}"))?;
        Ok(F32Buf::from(crate::weights::view_to_f32(name, &view)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes = crate::weights::safetensors_bytes(
            tensors.iter().map(|(n, shape, v)| {
                (
                    n.to_string(),
                    crate::weights::SaveView::Slice(shape.clone(), v),
                )
            }),
            None,
        )
        .unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn maps_f32_tensors_without_copying_and_checks_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        write(
            &path,
            &[
                ("a", vec![2, 3], (0..6).map(|i| i as f32).collect()),
                ("b", vec![1], vec![-1.5]),
            ],
        );
        let len = std::fs::metadata(&path).unwrap().len();
        let m = MappedSafetensors::open(&path, Some(len)).unwrap();
        let a = m.f32("a").unwrap();
        assert!(a.is_mapped());
        assert_eq!(&a[..], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(&m.f32("b").unwrap()[..], &[-1.5]);
        assert_eq!(
            m.shapes().collect::<Vec<_>>(),
            vec![("a", &[2usize, 3][..]), ("b", &[1usize][..])]
        );
        // The buffer keeps the mapping alive after the file and the reader are gone.
        drop(m);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(a[5], 5.0);

        write(&path, &[("a", vec![1], vec![1.0])]);
        let err = MappedSafetensors::open(&path, Some(len)).err().unwrap();
        assert!(format!("{err:#}").contains("the manifest says"), "{err:#}");
        assert!(MappedSafetensors::open(&dir.path().join("missing"), None).is_err());
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(MappedSafetensors::open(&path, None).is_err());
    }
}
