//! A reader for the metadata of a GGUF file (versions 2 and 3): the key/value table and the
//! tensor names, without reading any tensor data and without a tensor library. What the
//! model description needs (config, tokenizer, chat template); the weights themselves are
//! read by `hindsight-policy`.
//!
//! Every length in the file is checked against the bytes that remain, so a truncated or
//! hostile file gives an error naming what is wrong, never a huge allocation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

const MAGIC: &[u8; 4] = b"GGUF";

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// An unsigned integer of any width (a negative one is an error).
    pub fn as_u64(&self) -> Result<u64> {
        Ok(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            _ => bail!("expected an unsigned integer, found {}", self.kind()),
        })
    }

    /// A float; an f32 is widened through its shortest decimal form (`1e-5f32` -> `1e-5`,
    /// as written in the original `config.json`).
    pub fn as_f64(&self) -> Result<f64> {
        match *self {
            Value::F32(v) => Ok(v.to_string().parse::<f64>().unwrap_or(v as f64)),
            Value::F64(v) => Ok(v),
            _ => bail!("expected a float, found {}", self.kind()),
        }
    }

    pub fn as_str(&self) -> Result<&str> {
        match self {
            Value::String(s) => Ok(s),
            _ => bail!("expected a string, found {}", self.kind()),
        }
    }

    pub fn as_array(&self) -> Result<&[Value]> {
        match self {
            Value::Array(v) => Ok(v),
            _ => bail!("expected an array, found {}", self.kind()),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// The metadata of a GGUF file.
#[derive(Clone, Debug, Default)]
pub struct GgufMetadata {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// The names of the tensors the file holds (their data is not read).
    pub tensor_names: BTreeSet<String>,
}

impl GgufMetadata {
    /// Reads the metadata of the GGUF file at `path`.
    pub fn read_file(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        Self::read(BufReader::new(f), len)
            .with_context(|| format!("reading GGUF {}", path.display()))
    }

    /// Reads GGUF metadata from `r`, which holds at most `len` bytes.
    pub fn read(r: impl Read, len: u64) -> Result<Self> {
        let mut r = Bounded {
            inner: r,
            left: len,
        };
        let mut magic = [0u8; 4];
        r.bytes(&mut magic)
            .context("the file is shorter than a GGUF header")?;
        ensure!(&magic == MAGIC, "not a GGUF file (magic {magic:02x?})");
        let version = r.u32()?;
        ensure!(
            version == 2 || version == 3,
            "GGUF version {version} is not supported (2 and 3 are)"
        );
        let tensors = r.u64()?;
        let kvs = r.u64()?;
        let mut metadata = BTreeMap::new();
        for i in 0..kvs {
            let key = r.string().with_context(|| format!("metadata key {i}"))?;
            let ty = r.u32()?;
            let value = r
                .value(ty, 0)
                .with_context(|| format!("metadata {key:?}"))?;
            metadata.insert(key, value);
        }
        let mut tensor_names = BTreeSet::new();
        for i in 0..tensors {
            let name = r.string().with_context(|| format!("tensor info {i}"))?;
            let dims = r.u32()?;
            ensure!(dims <= 8, "tensor {name:?} has {dims} dimensions");
            for _ in 0..dims {
                r.u64()?;
            }
            r.u32()?; // type
            r.u64()?; // offset
            tensor_names.insert(name);
        }
        Ok(Self {
            version,
            metadata,
            tensor_names,
        })
    }

    /// The value under `key`, or an error naming the key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .with_context(|| format!("GGUF metadata missing {key}"))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?.as_u64().with_context(|| key.to_string())?;
        usize::try_from(v).with_context(|| format!("{key} = {v} is too large"))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?.as_f64().with_context(|| key.to_string())
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key)?.as_str().with_context(|| key.to_string())
    }
}

/// A reader that refuses to read past the bytes the file has.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Bounded<R> {
    fn take(&mut self, n: u64, what: &str) -> Result<()> {
        ensure!(
            n <= self.left,
            "{what} of {n} bytes runs past the end of the file ({} bytes left)",
            self.left
        );
        self.left -= n;
        Ok(())
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        self.take(buf.len() as u64, "a field")?;
        self.inner.read_exact(buf).context("the file ends early")?;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.bytes(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        self.take(n, "a string")?;
        let mut b = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut b)
            .context("the file ends early")?;
        String::from_utf8(b).context("a string is not UTF-8")
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                ensure!(depth < 4, "arrays nested deeper than 4");
                let elem = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte: a length beyond the file is a lie.
                ensure!(
                    n <= self.left,
                    "an array of {n} elements runs past the end of the file"
                );
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => bail!("unknown GGUF value type {t}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file with `kvs` and tensor infos named `tensors`.
    fn file(kvs: &[(&str, u32, Vec<u8>)], tensors: &[&str]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        for (k, ty, v) in kvs {
            s(&mut b, k);
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for t in tensors {
            s(&mut b, t);
            b.extend(2u32.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(8u64.to_le_bytes());
            b.extend(2u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    fn string(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u64).to_le_bytes().to_vec();
        v.extend(x.as_bytes());
        v
    }

    fn read(b: &[u8]) -> Result<GgufMetadata> {
        GgufMetadata::read(b, b.len() as u64)
    }

    #[test]
    fn reads_every_kind_of_value_and_the_tensor_names() {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend(2u64.to_le_bytes());
        arr.extend(string("a"));
        arr.extend(string("bc"));
        let b = file(
            &[
                ("general.architecture", 8, string("llama")),
                ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
                ("llama.context_length", 10, 8192u64.to_le_bytes().to_vec()),
                ("eps", 6, 1e-5f32.to_le_bytes().to_vec()),
                ("neg", 5, (-3i32).to_le_bytes().to_vec()),
                ("flag", 7, vec![1]),
                ("tokens", 9, arr),
            ],
            &["token_embd.weight", "output.weight"],
        );
        let m = read(&b).unwrap();
        assert_eq!(m.version, 3);
        assert_eq!(m.str("general.architecture").unwrap(), "llama");
        assert_eq!(m.usize("llama.block_count").unwrap(), 30);
        assert_eq!(m.usize("llama.context_length").unwrap(), 8192);
        // An f32 widens through its shortest decimal form.
        assert_eq!(m.f64("eps").unwrap(), 1e-5);
        assert!(m.usize("neg").is_err());
        assert_eq!(m.get("flag").unwrap(), &Value::Bool(true));
        let tokens: Vec<&str> = m
            .get("tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(tokens, ["a", "bc"]);
        assert!(m.tensor_names.contains("output.weight"));
        let e = m.usize("missing").unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let err = |b: &[u8]| format!("{:#}", read(b).unwrap_err());
        assert!(err(b"GG").contains("shorter than a GGUF header"));
        assert!(err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
        let mut v1 = b"GGUF".to_vec();
        v1.extend(1u32.to_le_bytes());
        assert!(err(&v1).contains("version 1"));
        // Every byte count is checked against what the file has left.
        let good = file(&[("k", 8, string("value"))], &[]);
        for cut in 1..good.len() {
            assert!(read(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut huge = file(&[], &[]);
        huge[16..24].copy_from_slice(&1u64.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("runs past the end"), "{}", err(&huge));
        let mut arr = 0u32.to_le_bytes().to_vec();
        arr.extend(u64::MAX.to_le_bytes());
        let b = file(&[("a", 9, arr)], &[]);
        assert!(err(&b).contains("array of"), "{}", err(&b));
        let b = file(&[("t", 13, vec![])], &[]);
        assert!(
            err(&b).contains("unknown GGUF value type 13"),
            "{}",
            err(&b)
        );
    }
}
