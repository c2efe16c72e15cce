//! Shared test helpers: fixture paths, safetensors twins, reading spans, and a tiny
//! pickle writer for hand-made hostile inputs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use mergestream::format::torch_bin::{TensorLocation, gather_strided, index_torch_bin};

/// A fixture: `golden/<model>` lives with the golden set, everything else under
/// tests/fixtures/torch (files written by torch; see torch/gen/make_fixtures.py).
pub fn fixture(rel: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    match rel.strip_prefix("golden/") {
        Some(model) => root.join("golden/models").join(model),
        None => root.join("torch").join(rel),
    }
}

pub fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// name -> (dtype, shape, row-major little-endian bytes) from one or more safetensors files.
pub type Twin = HashMap<String, (String, Vec<u64>, Vec<u8>)>;

pub fn load_twin(files: &[PathBuf]) -> Twin {
    let mut out = HashMap::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let shape = view.shape().iter().map(|&d| d as u64).collect();
            let dtype = format!("{:?}", view.dtype());
            assert!(
                out.insert(name.clone(), (dtype, shape, view.data().to_vec()))
                    .is_none()
            );
        }
    }
    out
}

pub fn files_with_ext(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// Reads a tensor's span from the file and gathers it into row-major little-endian bytes.
pub fn tensor_bytes(file: &mut File, t: &TensorLocation) -> Vec<u8> {
    let mut span = vec![0u8; t.byte_len as usize];
    file.seek(SeekFrom::Start(t.byte_offset)).unwrap();
    file.read_exact(&mut span).unwrap();
    let mut out = gather_strided(&span, t).unwrap();
    if t.big_endian {
        let es = t.dtype.size();
        for e in out.chunks_mut(es) {
            e.reverse();
        }
    }
    out
}

/// Indexes a .bin and checks every tensor against the twin; returns the tensor count.
pub fn compare_bin_with_twin(bin: &Path, twin: &Twin) -> usize {
    let idx = index_torch_bin(File::open(bin).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let mut f = File::open(bin).unwrap();
    for t in &idx.tensors {
        let (dtype, shape, data) = twin
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} not in twin", t.name));
        assert_eq!(t.dtype.safetensors_name(), dtype, "{}", t.name);
        assert_eq!(&t.shape, shape, "{}", t.name);
        let got = tensor_bytes(&mut f, t);
        assert!(&got == data, "{}: bytes differ", t.name);
        if t.contiguous {
            assert_eq!(t.byte_len, data.len() as u64, "{}", t.name);
        }
    }
    idx.tensors.len()
}

/// Minimal pickle writer (protocol 2 opcodes) for building hostile inputs by hand.
#[derive(Default)]
pub struct P(pub Vec<u8>);

impl P {
    pub fn new() -> Self {
        P(vec![0x80, 2])
    }
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn op(self, b: u8) -> Self {
        self.raw(&[b])
    }
    pub fn global(self, module: &str, name: &str) -> Self {
        self.op(b'c')
            .raw(module.as_bytes())
            .op(b'\n')
            .raw(name.as_bytes())
            .op(b'\n')
    }
    pub fn str(self, s: &str) -> Self {
        let n = (s.len() as u32).to_le_bytes();
        self.op(b'X').raw(&n).raw(s.as_bytes())
    }
    pub fn int(self, v: i32) -> Self {
        self.op(b'J').raw(&v.to_le_bytes())
    }
    pub fn mark(self) -> Self {
        self.op(b'(')
    }
    pub fn tuple(self) -> Self {
        self.op(b't')
    }
    pub fn put(self, i: u8) -> Self {
        self.raw(&[b'q', i])
    }
    pub fn get(self, i: u8) -> Self {
        self.raw(&[b'h', i])
    }
    pub fn stop(self) -> Vec<u8> {
        self.op(b'.').0
    }
    pub fn ints(mut self, v: &[i64]) -> Self {
        self = self.mark();
        for &x in v {
            self = self.op(0x8a).raw(&[8]).raw(&x.to_le_bytes());
        }
        self.tuple()
    }
    /// `_rebuild_tensor_v2(storage pid, offset, shape, stride, False, OrderedDict())`
    pub fn tensor(
        self,
        storage: &str,
        key: &str,
        numel: i32,
        offset: i32,
        shape: &[i64],
        stride: &[i64],
    ) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .mark()
            .str("storage")
            .global("torch", storage)
            .str(key)
            .str("cpu")
            .int(numel)
            .tuple()
            .op(b'Q')
            .int(offset)
            .ints(shape)
            .ints(stride)
            .op(0x89)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .tuple()
            .op(b'R')
    }
}

/// `{name: tensor}` with one F32 tensor of the given layout over a storage of `numel`.
pub fn one_tensor_pickle(numel: i32, offset: i32, shape: &[i64], stride: &[i64]) -> Vec<u8> {
    P::new()
        .op(b'}')
        .str("w")
        .tensor("FloatStorage", "0", numel, offset, shape, stride)
        .op(b's')
        .stop()
}
