//! A restricted unpickler for PyTorch checkpoints.
//!
//! `torch.save` writes a pickle whose only job is to describe tensors: which storage
//! (raw bytes kept outside the pickle), which dtype, offset, shape and strides. This
//! module reads exactly that and nothing else. It never imports or calls anything:
//! `GLOBAL` resolves against a fixed allowlist to a [`Global`] marker, and `REDUCE`,
//! `NEWOBJ`, `INST`, `OBJ` and `BUILD` apply to those markers as *value construction*
//! (`_rebuild_tensor_v2(...)` becomes a [`TensorSpec`], `OrderedDict()` an empty dict).
//! Anything else is an error that names the opcode or global and its byte position.
//!
//! Design choices:
//! - Values live in an arena (`Vec<Object>`) and refer to each other by index. The memo,
//!   `DUP` and `BINGET` copy an index, never a subtree, so memo bombs ("billion laughs"
//!   built from repeated references) cost one word per reference, and dropping the arena
//!   is flat (no recursive `Drop` that a deep or cyclic structure could overflow).
//! - Every opcode consumes at least one input byte and does work bounded by the bytes it
//!   consumes plus the stack items it pops, so total work is linear in the input. The
//!   places where one reference could be re-inspected many times (constructor argument
//!   tuples, shape tuples, dict keys, storage keys) check a length limit or use object
//!   identity before looking inside.
//! - Hard limits ([`Limits`]) bound stack size, `MARK` nesting, memo entries and objects,
//!   and every length field is checked against the bytes that are left.
//! - Protocols 0–3 are accepted (torch writes 2). Protocol 4/5 (`FRAME`, `MEMOIZE`,
//!   `STACK_GLOBAL`, ...) is refused with [`PickleError::UnsupportedProtocol`] or
//!   [`PickleError::UnsupportedOpcode`]: torch never writes it for checkpoints by default,
//!   and refusing keeps the accepted surface small.
//! - Strict where CPython is lax: `STOP` must leave exactly one value and no open `MARK`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use thiserror::Error;

use crate::dtype::DType;

/// Bytes per element of a dtype torch can name (all are whole bytes), for checked offset
/// arithmetic in u64.
pub fn elem_bytes(d: DType) -> u64 {
    d.bits() / 8
}

/// What kind of storage a persistent id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageKind {
    /// `torch.FloatStorage` and friends: elements of one dtype.
    Typed(DType),
    /// `torch.UntypedStorage`: bytes; the tensor's dtype comes from `_rebuild_tensor_v3`.
    Untyped,
}

impl StorageKind {
    /// The element type the storage's `numel` counts.
    pub fn element(self) -> DType {
        match self {
            StorageKind::Typed(d) => d,
            StorageKind::Untyped => DType::U8,
        }
    }
}

/// One tensor as described by the pickle: where its elements are in which storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The storage record's key (`data/<key>` in a zip, the key list entry in legacy files).
    pub storage_key: Arc<str>,
    /// The storage's own element type, as named by the persistent id.
    pub storage_kind: StorageKind,
    /// Storage length in `storage_kind` elements (bytes for untyped storage).
    pub storage_numel: u64,
    /// The tensor's element type.
    pub dtype: DType,
    /// Offset of the first element, in `dtype` elements from the start of the storage.
    pub storage_offset: u64,
    pub shape: Vec<u64>,
    /// Strides in elements, one per dimension.
    pub strides: Vec<u64>,
    pub requires_grad: bool,
}

impl TensorSpec {
    /// Storage size in bytes (checked).
    pub fn storage_nbytes(&self) -> Option<u64> {
        self.storage_numel
            .checked_mul(elem_bytes(self.storage_kind.element()))
    }

    /// Number of logical elements (checked).
    pub fn numel(&self) -> Option<u64> {
        numel(&self.shape)
    }

    /// Whether the elements are laid out densely in row-major order.
    pub fn is_contiguous(&self) -> bool {
        is_contiguous(&self.shape, &self.strides)
    }

    /// The byte range `[start, end)` inside the storage that the tensor's elements span,
    /// checked against the storage size. Empty tensors span nothing (`start == end`).
    pub fn storage_byte_span(&self) -> Result<(u64, u64), SpanError> {
        let es = elem_bytes(self.dtype);
        let extent = extent_elems(&self.shape, &self.strides).ok_or(SpanError::Overflow)?;
        let storage_bytes = self.storage_nbytes().ok_or(SpanError::Overflow)?;
        if extent == 0 {
            // torch skips the bounds check for empty tensors; so do we, and report no bytes.
            return Ok((0, 0));
        }
        let start = self
            .storage_offset
            .checked_mul(es)
            .ok_or(SpanError::Overflow)?;
        let len = extent.checked_mul(es).ok_or(SpanError::Overflow)?;
        let end = start.checked_add(len).ok_or(SpanError::Overflow)?;
        if end > storage_bytes {
            return Err(SpanError::OutOfBounds { end, storage_bytes });
        }
        Ok((start, end))
    }
}

/// Why a tensor's element span does not fit its storage.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpanError {
    #[error("shape/stride/offset arithmetic overflows u64")]
    Overflow,
    #[error("tensor ends at byte {end} but its storage holds {storage_bytes} bytes")]
    OutOfBounds { end: u64, storage_bytes: u64 },
}

/// Product of the dimensions (1 for a scalar), `None` on overflow.
pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Elements from the first to one past the last addressed element:
/// `1 + Σ (size_i - 1) · stride_i`, or 0 when any dimension is 0. `None` on overflow or
/// when `shape` and `strides` differ in length.
pub fn extent_elems(shape: &[u64], strides: &[u64]) -> Option<u64> {
    if shape.len() != strides.len() {
        return None;
    }
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0u64;
    for (&size, &stride) in shape.iter().zip(strides) {
        let step = size.checked_sub(1)?.checked_mul(stride)?;
        last = last.checked_add(step)?;
    }
    last.checked_add(1)
}

/// torch's definition: strides match row-major order, ignoring dimensions of size 1.
/// Empty tensors are contiguous.
pub fn is_contiguous(shape: &[u64], strides: &[u64]) -> bool {
    if shape.len() != strides.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1u64;
    for (&size, &stride) in shape.iter().zip(strides).rev() {
        if size != 1 {
            if stride != expected {
                return false;
            }
            expected = match expected.checked_mul(size) {
                Some(e) => e,
                None => return false,
            };
        }
    }
    true
}

/// Bounds on what one pickle may make the unpickler hold. Defaults are far above what any
/// real checkpoint needs (a 70B shard's pickle uses a few thousand of each) and far below
/// what would hurt the machine.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Values on the stack, across all open `MARK`s.
    pub max_stack: usize,
    /// Open `MARK`s at once.
    pub max_marks: usize,
    /// Distinct memo entries.
    pub max_memo: usize,
    /// Heap objects (strings, containers, tensors, ...).
    pub max_objects: usize,
    /// Dimensions of one tensor.
    pub max_ndim: usize,
    /// Nesting depth when converting to a [`Plain`] value.
    pub max_plain_depth: usize,
    /// Nodes produced when converting to a [`Plain`] value (shared references are
    /// expanded there, so this bounds a memo bomb).
    pub max_plain_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stack: 1 << 18,
            max_marks: 1 << 10,
            max_memo: 1 << 21,
            max_objects: 1 << 22,
            max_ndim: 64,
            max_plain_depth: 64,
            max_plain_nodes: 1 << 20,
        }
    }
}

/// Which persistent-id layout the file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PidFlavor {
    /// Zip format: `('storage', storage_type, key, location, numel)`.
    Zip,
    /// Legacy format: `('storage', storage_type, root_key, location, numel, view_metadata)`.
    Legacy,
}

/// Everything that can be wrong with a pickle. Positions are byte offsets from the start of
/// the pickle data handed to the parser.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PickleError {
    #[error("pickle truncated: opcode {opcode} at byte {pos} needs {needed} more bytes")]
    Truncated {
        opcode: &'static str,
        pos: u64,
        needed: u64,
    },
    #[error("pickle has no STOP opcode (data ends at byte {pos})")]
    MissingStop { pos: u64 },
    #[error("unknown pickle opcode 0x{byte:02x} at byte {pos}")]
    UnknownOpcode { byte: u8, pos: u64 },
    #[error("pickle opcode {opcode} at byte {pos} is not supported: {reason}")]
    UnsupportedOpcode {
        opcode: &'static str,
        pos: u64,
        reason: &'static str,
    },
    #[error("pickle protocol {version} at byte {pos} is not supported (only 0-3; torch writes 2)")]
    UnsupportedProtocol { version: u8, pos: u64 },
    #[error("forbidden global {module}.{name} at byte {pos}")]
    ForbiddenGlobal {
        module: String,
        name: String,
        pos: u64,
    },
    #[error("{callable} cannot be called (opcode {opcode} at byte {pos})")]
    ForbiddenCall {
        callable: String,
        opcode: &'static str,
        pos: u64,
    },
    #[error("bad arguments to {callable} at byte {pos}: {reason}")]
    BadArguments {
        callable: &'static str,
        pos: u64,
        reason: String,
    },
    #[error("bad persistent id at byte {pos}: {reason}")]
    BadPersistentId { pos: u64, reason: String },
    #[error("storage {key:?} declared twice with different type or size (byte {pos})")]
    StorageConflict { key: String, pos: u64 },
    #[error("opcode {opcode} at byte {pos} needs more values on the stack")]
    StackUnderflow { opcode: &'static str, pos: u64 },
    #[error("opcode {opcode} at byte {pos} needs a MARK but none is open")]
    NoMark { opcode: &'static str, pos: u64 },
    #[error("opcode {opcode} at byte {pos} expected {expected}, found {found}")]
    TypeMismatch {
        opcode: &'static str,
        pos: u64,
        expected: &'static str,
        found: &'static str,
    },
    #[error("memo entry {index} read at byte {pos} was never stored")]
    MemoMissing { index: u64, pos: u64 },
    #[error("bad argument of opcode {opcode} at byte {pos}: {reason}")]
    BadOperand {
        opcode: &'static str,
        pos: u64,
        reason: &'static str,
    },
    #[error("limit exceeded at byte {pos}: more than {limit} {what}")]
    LimitExceeded {
        what: &'static str,
        limit: u64,
        pos: u64,
    },
    #[error(
        "STOP at byte {pos} with {stack} values on the stack and {marks} open MARKs (expected 1 and 0)"
    )]
    MalformedStop { pos: u64, stack: u64, marks: u64 },
    #[error("checkpoint top level is {found}, expected a dict of name -> tensor")]
    NotAStateDict { found: &'static str },
    #[error("state dict key #{index} is {found}, expected a string")]
    NonStringKey { index: u64, found: &'static str },
    #[error(
        "state dict entry {name:?} is {found}, expected a tensor (nested or non-tensor entries are not supported)"
    )]
    NotATensor { name: String, found: &'static str },
    #[error("state dict has the name {name:?} twice")]
    DuplicateName { name: String },
    #[error("pickle value is {found}, which has no plain-data form")]
    NotPlain { found: &'static str },
}

impl PickleError {
    /// True when the error only says the data ended early (a caller reading a prefix of a
    /// file may read more and retry).
    pub fn is_truncation(&self) -> bool {
        matches!(
            self,
            PickleError::Truncated { .. } | PickleError::MissingStop { .. }
        )
    }
}

/// The allowlisted globals. Each one is a marker; nothing is ever imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.Parameter`, only as `_rebuild_from_type_v2`'s type argument.
    TensorType,
    Storage(StorageKind),
    Dtype(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor" | "torch._utils", "_rebuild_from_type_v2") => {
                Global::RebuildFromTypeV2
            }
            ("torch" | "torch._tensor", "Tensor")
            | ("torch.nn.parameter" | "torch.nn", "Parameter") => Global::TensorType,
            ("torch" | "torch.storage", "UntypedStorage") => Global::Storage(StorageKind::Untyped),
            // Legacy files written from a GPU name the CUDA storage classes; the bytes on
            // disk are the same, so they map to the same kinds.
            ("torch" | "torch.cuda", storage) => match DType::from_torch_storage(storage) {
                Some(d) => Global::Storage(StorageKind::Typed(d)),
                None if module == "torch" => {
                    return DType::from_torch_name(storage).map(Global::Dtype);
                }
                None => return None,
            },
            _ => return None,
        };
        Some(g)
    }

    fn name(self) -> &'static str {
        match self {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensor => "torch._utils._rebuild_tensor",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
            Global::TensorType => "torch.Tensor",
            Global::Storage(StorageKind::Untyped) => "torch.UntypedStorage",
            Global::Storage(StorageKind::Typed(_)) => "a torch storage class",
            Global::Dtype(_) => "a torch dtype",
        }
    }
}

/// A plain-data pickle value (what the legacy format's header pickles hold).
#[derive(Clone, Debug, PartialEq)]
pub enum Plain {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit i64: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Plain>),
    List(Vec<Plain>),
    Dict(Vec<(Plain, Plain)>),
}

/// A parsed state dict: tensors in pickle order.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDict {
    pub tensors: Vec<(String, TensorSpec)>,
}

// ---------------------------------------------------------------------------------------
// The machine

type ObjId = u32;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Obj(ObjId),
}

#[derive(Debug)]
enum Object {
    Str(String),
    Bytes(Vec<u8>),
    BigInt(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// dict and OrderedDict alike: pairs in insertion order (duplicates are resolved only
    /// where it matters, when a state dict is extracted).
    Dict(Vec<(Value, Value)>),
    Global(Global),
    /// Boxed to keep `Object` at 32 bytes: the arena holds millions of them at worst.
    Storage(Box<StorageView>),
    Tensor(Box<TensorSpec>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Str(_) => "a string",
            Object::Bytes(_) => "bytes",
            Object::BigInt(_) => "a big integer",
            Object::Tuple(_) => "a tuple",
            Object::List(_) => "a list",
            Object::Dict(_) => "a dict",
            Object::Global(_) => "a global",
            Object::Storage(_) => "a storage",
            Object::Tensor(_) => "a tensor",
        }
    }
}

/// A storage as a persistent id yields it. Legacy view metadata narrows it to a window.
#[derive(Clone, Debug)]
struct StorageView {
    key: Arc<str>,
    kind: StorageKind,
    numel: u64,
    /// `(offset, numel)` in storage elements, for legacy storage views.
    view: Option<(u64, u64)>,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    limits: Limits,
    flavor: PidFlavor,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objects: Vec<Object>,
    /// Storages by key, to reject one key declared with two types or sizes.
    storages: HashMap<Arc<str>, (StorageKind, u64)>,
    /// Key string object -> key, so re-referencing one big key string costs O(1).
    storage_key_objs: HashMap<ObjId, Arc<str>>,
}

fn u64_of(n: usize) -> u64 {
    // usize is at most 64 bits on every target Rust supports.
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], limits: &Limits, flavor: PidFlavor) -> Self {
        Machine {
            data,
            pos: 0,
            limits: limits.clone(),
            flavor,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objects: Vec::new(),
            storages: HashMap::new(),
            storage_key_objs: HashMap::new(),
        }
    }

    // ---- input ----

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, op: Op) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n);
        match end.and_then(|end| self.data.get(self.pos..end).map(|s| (s, end))) {
            Some((s, end)) => {
                self.pos = end;
                Ok(s)
            }
            None => Err(PickleError::Truncated {
                opcode: op.name,
                pos: op.at(),
                needed: u64_of(n.saturating_sub(self.remaining())),
            }),
        }
    }

    fn take_array<const N: usize>(&mut self, op: Op) -> Result<[u8; N], PickleError> {
        let s = self.take(N, op)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A protocol-0 text argument: bytes up to (not including) the next newline.
    fn take_line(&mut self, op: Op) -> Result<&'a [u8], PickleError> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let line = self.take(n, op)?;
                self.pos = self.pos.saturating_add(1);
                Ok(line)
            }
            None => Err(PickleError::Truncated {
                opcode: op.name,
                pos: op.at(),
                needed: 1,
            }),
        }
    }

    /// A length field, checked against what is left before anything is allocated.
    fn take_len(&mut self, len: u64, op: Op) -> Result<&'a [u8], PickleError> {
        let left = u64_of(self.remaining());
        if len > left {
            return Err(PickleError::Truncated {
                opcode: op.name,
                pos: op.at(),
                needed: len.saturating_sub(left),
            });
        }
        let n = usize::try_from(len).map_err(|_| op.bad("length does not fit in memory"))?;
        self.take(n, op)
    }

    // ---- stack, objects, memo ----

    fn push(&mut self, v: Value, op: Op) -> Result<(), PickleError> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(op.limit("stack values", self.limits.max_stack));
        }
        self.stack.push(v);
        Ok(())
    }

    fn alloc(&mut self, o: Object, op: Op) -> Result<Value, PickleError> {
        if self.objects.len() >= self.limits.max_objects {
            return Err(op.limit("objects", self.limits.max_objects));
        }
        let id = ObjId::try_from(self.objects.len()).map_err(|_| PickleError::LimitExceeded {
            what: "objects",
            limit: u64::from(ObjId::MAX),
            pos: op.at(),
        })?;
        self.objects.push(o);
        Ok(Value::Obj(id))
    }

    fn push_obj(&mut self, o: Object, op: Op) -> Result<(), PickleError> {
        let v = self.alloc(o, op)?;
        self.push(v, op)
    }

    /// The floor of the current MARK region (0 when no MARK is open).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, op: Op) -> Result<Value, PickleError> {
        // Values below the innermost MARK belong to an outer frame, as in CPython.
        if self.stack.len() <= self.floor() {
            return Err(op.underflow());
        }
        self.stack.pop().ok_or(op.underflow())
    }

    fn top(&self, op: Op) -> Result<Value, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(op.underflow());
        }
        self.stack.last().copied().ok_or(op.underflow())
    }

    /// Pops everything above the innermost MARK, and the MARK.
    fn pop_mark(&mut self, op: Op) -> Result<Vec<Value>, PickleError> {
        let m = self.marks.pop().ok_or(op.no_mark())?;
        if m > self.stack.len() {
            return Err(op.underflow());
        }
        Ok(self.stack.split_off(m))
    }

    fn obj(&self, v: Value) -> Option<&Object> {
        match v {
            Value::Obj(id) => self.objects.get(usize::try_from(id).ok()?),
            _ => None,
        }
    }

    fn obj_mut(&mut self, v: Value) -> Option<&mut Object> {
        match v {
            Value::Obj(id) => self.objects.get_mut(usize::try_from(id).ok()?),
            _ => None,
        }
    }

    fn kind(&self, v: Value) -> &'static str {
        match v {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Obj(_) => self.obj(v).map_or("a dangling reference", Object::kind),
        }
    }

    fn memo_put(&mut self, index: u64, op: Op) -> Result<(), PickleError> {
        let v = self.top(op)?;
        if !self.memo.contains_key(&index) && self.memo.len() >= self.limits.max_memo {
            return Err(op.limit("memo entries", self.limits.max_memo));
        }
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u64, op: Op) -> Result<(), PickleError> {
        let v = *self.memo.get(&index).ok_or(PickleError::MemoMissing {
            index,
            pos: op.at(),
        })?;
        self.push(v, op)
    }

    // ---- the loop ----

    /// Runs until STOP; returns the result value.
    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let op_pos = self.pos;
            let Some(&byte) = self.data.get(op_pos) else {
                return Err(PickleError::MissingStop {
                    pos: u64_of(op_pos),
                });
            };
            self.pos = op_pos.saturating_add(1);
            let Some(name) = opcode_name(byte) else {
                return Err(PickleError::UnknownOpcode {
                    byte,
                    pos: u64_of(op_pos),
                });
            };
            let op = Op { name, pos: op_pos };
            if let Some(v) = self.step(byte, op)? {
                return Ok(v);
            }
        }
    }

    fn step(&mut self, byte: u8, op: Op) -> Result<Option<Value>, PickleError> {
        match byte {
            // ---- framing, protocol ----
            0x80 => {
                let [v] = self.take_array::<1>(op)?;
                if v > 3 {
                    return Err(PickleError::UnsupportedProtocol {
                        version: v,
                        pos: op.at(),
                    });
                }
            }
            b'.' => {
                if self.stack.len() != 1 || !self.marks.is_empty() {
                    return Err(PickleError::MalformedStop {
                        pos: op.at(),
                        stack: u64_of(self.stack.len()),
                        marks: u64_of(self.marks.len()),
                    });
                }
                return Ok(self.stack.pop());
            }
            // ---- stack manipulation ----
            b'(' => {
                if self.marks.len() >= self.limits.max_marks {
                    return Err(op.limit("open MARKs", self.limits.max_marks));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                // POP discards the top item, or an empty MARK region's mark, as CPython does.
                if self.stack.len() > self.floor() {
                    self.pop(op)?;
                } else if self.marks.last() == Some(&self.stack.len()) {
                    self.marks.pop();
                } else {
                    return Err(op.underflow());
                }
            }
            b'1' => {
                self.pop_mark(op)?;
            }
            b'2' => {
                let v = self.top(op)?;
                self.push(v, op)?;
            }
            // ---- memo ----
            b'p' => {
                let idx = self.line_u64(op)?;
                self.memo_put(idx, op)?;
            }
            b'q' => {
                let [i] = self.take_array::<1>(op)?;
                self.memo_put(u64::from(i), op)?;
            }
            b'r' => {
                let a = self.take_array::<4>(op)?;
                self.memo_put(u64::from(u32::from_le_bytes(a)), op)?;
            }
            b'g' => {
                let idx = self.line_u64(op)?;
                self.memo_get(idx, op)?;
            }
            b'h' => {
                let [i] = self.take_array::<1>(op)?;
                self.memo_get(u64::from(i), op)?;
            }
            b'j' => {
                let a = self.take_array::<4>(op)?;
                self.memo_get(u64::from(u32::from_le_bytes(a)), op)?;
            }
            // ---- constants and numbers ----
            b'N' => self.push(Value::None, op)?,
            0x88 => self.push(Value::Bool(true), op)?,
            0x89 => self.push(Value::Bool(false), op)?,
            b'I' => {
                let line = self.take_line(op)?;
                let v = match line {
                    b"01" => Value::Bool(true),
                    b"00" => Value::Bool(false),
                    _ => Value::Int(
                        parse_i64(line).ok_or(op.bad("not a decimal integer in i64 range"))?,
                    ),
                };
                self.push(v, op)?;
            }
            b'L' => {
                let line = self.take_line(op)?;
                let digits = line.strip_suffix(b"L").unwrap_or(line);
                let v = parse_i64(digits).ok_or(op.bad("not a decimal integer in i64 range"))?;
                self.push(Value::Int(v), op)?;
            }
            b'J' => {
                let a = self.take_array::<4>(op)?;
                self.push(Value::Int(i64::from(i32::from_le_bytes(a))), op)?;
            }
            b'K' => {
                let [b] = self.take_array::<1>(op)?;
                self.push(Value::Int(i64::from(b)), op)?;
            }
            b'M' => {
                let a = self.take_array::<2>(op)?;
                self.push(Value::Int(i64::from(u16::from_le_bytes(a))), op)?;
            }
            0x8a => {
                let [n] = self.take_array::<1>(op)?;
                let bytes = self.take(usize::from(n), op)?;
                self.push_long(bytes, op)?;
            }
            0x8b => {
                let a = self.take_array::<4>(op)?;
                let n = i32::from_le_bytes(a);
                let n = u64::try_from(n).map_err(|_| op.bad("negative length"))?;
                let bytes = self.take_len(n, op)?;
                self.push_long(bytes, op)?;
            }
            b'F' => {
                let line = self.take_line(op)?;
                let v = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .ok_or(op.bad("not a float"))?;
                self.push(Value::Float(v), op)?;
            }
            b'G' => {
                let a = self.take_array::<8>(op)?;
                self.push(Value::Float(f64::from_be_bytes(a)), op)?;
            }
            // ---- strings ----
            b'S' => {
                let line = self.take_line(op)?;
                let raw = unquote_string(line).ok_or(op.bad("not a quoted string"))?;
                self.push_str_bytes(raw, op)?;
            }
            b'V' => {
                let line = self.take_line(op)?;
                let s = raw_unicode_escape(line).ok_or(op.bad("bad raw-unicode-escape string"))?;
                self.push_obj(Object::Str(s), op)?;
            }
            b'T' => {
                let a = self.take_array::<4>(op)?;
                let n =
                    u64::try_from(i32::from_le_bytes(a)).map_err(|_| op.bad("negative length"))?;
                let b = self.take_len(n, op)?;
                self.push_str_bytes(b.to_vec(), op)?;
            }
            b'U' => {
                let [n] = self.take_array::<1>(op)?;
                let b = self.take(usize::from(n), op)?;
                self.push_str_bytes(b.to_vec(), op)?;
            }
            b'X' => {
                let a = self.take_array::<4>(op)?;
                let b = self.take_len(u64::from(u32::from_le_bytes(a)), op)?;
                self.push_str_bytes(b.to_vec(), op)?;
            }
            b'B' => {
                let a = self.take_array::<4>(op)?;
                let b = self.take_len(u64::from(u32::from_le_bytes(a)), op)?;
                self.push_obj(Object::Bytes(b.to_vec()), op)?;
            }
            b'C' => {
                let [n] = self.take_array::<1>(op)?;
                let b = self.take(usize::from(n), op)?;
                self.push_obj(Object::Bytes(b.to_vec()), op)?;
            }
            // ---- containers ----
            b')' => self.push_obj(Object::Tuple(Vec::new()), op)?,
            b']' => self.push_obj(Object::List(Vec::new()), op)?,
            b'}' => self.push_obj(Object::Dict(Vec::new()), op)?,
            b't' => {
                let items = self.pop_mark(op)?;
                self.push_obj(Object::Tuple(items), op)?;
            }
            b'l' => {
                let items = self.pop_mark(op)?;
                self.push_obj(Object::List(items), op)?;
            }
            b'd' => {
                let items = self.pop_mark(op)?;
                let pairs = pairs_of(items, op)?;
                self.push_obj(Object::Dict(pairs), op)?;
            }
            0x85..=0x87 => {
                let n = usize::from(byte.saturating_sub(0x84));
                let floor = self.floor();
                let start = self
                    .stack
                    .len()
                    .checked_sub(n)
                    .filter(|&s| s >= floor)
                    .ok_or(op.underflow())?;
                let items = self.stack.split_off(start);
                self.push_obj(Object::Tuple(items), op)?;
            }
            b'a' => {
                let v = self.pop(op)?;
                let list = self.top(op)?;
                self.list_mut(list, op)?.push(v);
            }
            b'e' => {
                let items = self.pop_mark(op)?;
                let list = self.top(op)?;
                self.list_mut(list, op)?.extend(items);
            }
            b's' => {
                let v = self.pop(op)?;
                let k = self.pop(op)?;
                let dict = self.top(op)?;
                self.dict_mut(dict, op)?.push((k, v));
            }
            b'u' => {
                let items = self.pop_mark(op)?;
                let pairs = pairs_of(items, op)?;
                let dict = self.top(op)?;
                self.dict_mut(dict, op)?.extend(pairs);
            }
            // ---- globals and construction ----
            b'c' => {
                let module = self.take_line(op)?;
                let name = self.take_line(op)?;
                let g = resolve_global(module, name, op)?;
                self.push_obj(Object::Global(g), op)?;
            }
            b'R' => {
                let args = self.pop(op)?;
                let callable = self.pop(op)?;
                let args = self.tuple_items(args, op)?;
                let v = self.construct(callable, &args, op)?;
                self.push(v, op)?;
            }
            0x81 => {
                // NEWOBJ: cls.__new__(cls, *args); only OrderedDict() makes sense here.
                let args = self.pop(op)?;
                let cls = self.pop(op)?;
                let args = self.tuple_items(args, op)?;
                match self.global_of(cls) {
                    Some(Global::OrderedDict) => {
                        let v = self.construct(cls, &args, op)?;
                        self.push(v, op)?;
                    }
                    _ => return Err(self.forbidden_call(cls, op)),
                }
            }
            b'i' => {
                let module = self.take_line(op)?;
                let name = self.take_line(op)?;
                let g = resolve_global(module, name, op)?;
                let args = self.pop_mark(op)?;
                let callable = self.alloc(Object::Global(g), op)?;
                let v = self.construct(callable, &args, op)?;
                self.push(v, op)?;
            }
            b'o' => {
                let mut items = self.pop_mark(op)?;
                if items.is_empty() {
                    return Err(op.underflow());
                }
                let callable = items.remove(0);
                let v = self.construct(callable, &items, op)?;
                self.push(v, op)?;
            }
            b'b' => {
                let state = self.pop(op)?;
                let target = self.top(op)?;
                self.build(target, state, op)?;
            }
            b'Q' => {
                let pid = self.pop(op)?;
                let v = self.persistent_load(pid, op)?;
                self.push(v, op)?;
            }
            b'P' => {
                return Err(op.unsupported("text persistent ids are not written by torch"));
            }
            0x82..=0x84 => {
                return Err(op.unsupported("the copyreg extension registry is not supported"));
            }
            // Protocol 4 and 5 opcodes, and anything else we named but do not run.
            _ => {
                return Err(op.unsupported(
                    "protocol 4/5 opcodes are not supported (torch writes protocol 2)",
                ));
            }
        }
        Ok(None)
    }

    fn line_u64(&mut self, op: Op) -> Result<u64, PickleError> {
        let line = self.take_line(op)?;
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(op.bad("not a decimal memo index"))
    }

    fn push_long(&mut self, bytes: &[u8], op: Op) -> Result<(), PickleError> {
        match long_to_i64(bytes) {
            Some(v) => self.push(Value::Int(v), op),
            None => self.push_obj(Object::BigInt(bytes.to_vec()), op),
        }
    }

    /// Python 2 `str` and Python 3 `str` both become text; torch.load decodes with UTF-8.
    fn push_str_bytes(&mut self, raw: Vec<u8>, op: Op) -> Result<(), PickleError> {
        let s = String::from_utf8(raw).map_err(|_| op.bad("string is not valid UTF-8"))?;
        self.push_obj(Object::Str(s), op)
    }

    fn list_mut(&mut self, v: Value, op: Op) -> Result<&mut Vec<Value>, PickleError> {
        let found = self.kind(v);
        match self.obj_mut(v) {
            Some(Object::List(items)) => Ok(items),
            _ => Err(op.mismatch("a list", found)),
        }
    }

    fn dict_mut(&mut self, v: Value, op: Op) -> Result<&mut Vec<(Value, Value)>, PickleError> {
        let found = self.kind(v);
        match self.obj_mut(v) {
            Some(Object::Dict(items)) => Ok(items),
            _ => Err(op.mismatch("a dict", found)),
        }
    }

    /// Clones a tuple's items. Callers only pass argument tuples, whose length every
    /// constructor checks first, so a huge tuple re-referenced many times fails fast.
    fn tuple_items(&self, v: Value, op: Op) -> Result<Vec<Value>, PickleError> {
        match self.obj(v) {
            Some(Object::Tuple(items)) if items.len() <= MAX_ARGS => Ok(items.clone()),
            Some(Object::Tuple(_)) => {
                Err(op.bad("argument tuple is too long for any allowed callable"))
            }
            _ => Err(op.mismatch("an argument tuple", self.kind(v))),
        }
    }

    fn global_of(&self, v: Value) -> Option<Global> {
        match self.obj(v) {
            Some(Object::Global(g)) => Some(*g),
            _ => None,
        }
    }

    fn forbidden_call(&self, callable: Value, op: Op) -> PickleError {
        let callable = match self.global_of(callable) {
            Some(g) => g.name().to_string(),
            None => self.kind(callable).to_string(),
        };
        PickleError::ForbiddenCall {
            callable,
            opcode: op.name,
            pos: op.at(),
        }
    }

    /// `callable(*args)` for the allowlisted constructors, as value construction.
    fn construct(&mut self, callable: Value, args: &[Value], op: Op) -> Result<Value, PickleError> {
        let Some(g) = self.global_of(callable) else {
            return Err(self.forbidden_call(callable, op));
        };
        let bad = |reason: String| PickleError::BadArguments {
            callable: g.name(),
            pos: op.at(),
            reason,
        };
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(bad(format!("expected no arguments, got {}", args.len())));
                }
                self.alloc(Object::Dict(Vec::new()), op)
            }
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let spec = self.rebuild_tensor(g, args).map_err(bad)?;
                self.alloc(Object::Tensor(Box::new(spec)), op)
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                // (data, requires_grad, backward_hooks[, state]): the parameter is its data.
                let want = if g == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != want {
                    return Err(bad(format!(
                        "expected {want} arguments, got {}",
                        args.len()
                    )));
                }
                let data = args.first().copied().unwrap_or(Value::None);
                match self.obj(data) {
                    Some(Object::Tensor(_)) => Ok(data),
                    _ => Err(bad(format!(
                        "data is {}, expected a tensor",
                        self.kind(data)
                    ))),
                }
            }
            Global::RebuildFromTypeV2 => {
                // (func, new_type, args, state): func(*args), re-typed to a tensor class.
                let [func, new_type, inner, _state] = args else {
                    return Err(bad(format!("expected 4 arguments, got {}", args.len())));
                };
                match self.global_of(*func) {
                    Some(
                        Global::RebuildTensor
                        | Global::RebuildTensorV2
                        | Global::RebuildTensorV3
                        | Global::RebuildParameter
                        | Global::RebuildParameterWithState,
                    ) => {}
                    _ => {
                        return Err(bad(format!(
                            "func is {}, expected a tensor rebuild function",
                            self.kind(*func)
                        )));
                    }
                }
                if self.global_of(*new_type) != Some(Global::TensorType) {
                    return Err(bad(format!(
                        "type is {}, expected torch.Tensor or torch.nn.Parameter",
                        self.kind(*new_type)
                    )));
                }
                let inner = self.tuple_items(*inner, op)?;
                self.construct(*func, &inner, op)
            }
            Global::TensorType | Global::Storage(_) | Global::Dtype(_) => {
                Err(self.forbidden_call(callable, op))
            }
        }
    }

    /// `_rebuild_tensor(storage, offset, size, stride)`,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
    /// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`.
    fn rebuild_tensor(&self, g: Global, args: &[Value]) -> Result<TensorSpec, String> {
        let (min, max) = match g {
            Global::RebuildTensor => (4, 4),
            Global::RebuildTensorV2 => (6, 7),
            _ => (7, 8),
        };
        if args.len() < min || args.len() > max {
            return Err(format!(
                "expected {min}..={max} arguments, got {}",
                args.len()
            ));
        }
        let arg = |i: usize| args.get(i).copied().unwrap_or(Value::None);
        let storage = match self.obj(arg(0)) {
            Some(Object::Storage(s)) => (**s).clone(),
            _ => {
                return Err(format!(
                    "storage is {}, expected a storage",
                    self.kind(arg(0))
                ));
            }
        };
        let Value::Int(offset) = arg(1) else {
            return Err(format!(
                "storage_offset is {}, expected an int",
                self.kind(arg(1))
            ));
        };
        let offset =
            u64::try_from(offset).map_err(|_| format!("negative storage_offset {offset}"))?;
        let shape = self.int_tuple(arg(2), "size")?;
        let strides = self.int_tuple(arg(3), "stride")?;
        if shape.len() != strides.len() {
            return Err(format!(
                "size has {} dimensions but stride has {}",
                shape.len(),
                strides.len()
            ));
        }
        let mut requires_grad = false;
        if g != Global::RebuildTensor {
            requires_grad = match arg(4) {
                Value::Bool(b) => b,
                v => {
                    return Err(format!(
                        "requires_grad is {}, expected a bool",
                        self.kind(v)
                    ));
                }
            };
            // backward_hooks: torch writes an empty OrderedDict; hooks are code, so any
            // content is ignored rather than run.
            if !matches!(self.obj(arg(5)), Some(Object::Dict(_))) && arg(5) != Value::None {
                return Err(format!(
                    "backward_hooks is {}, expected a dict",
                    self.kind(arg(5))
                ));
            }
        }
        let dtype = match g {
            Global::RebuildTensorV3 => match self.global_of(arg(6)) {
                Some(Global::Dtype(d)) => d,
                _ => {
                    return Err(format!(
                        "dtype is {}, expected a torch dtype",
                        self.kind(arg(6))
                    ));
                }
            },
            _ => match storage.kind {
                StorageKind::Typed(d) => d,
                StorageKind::Untyped => {
                    return Err("an untyped storage needs _rebuild_tensor_v3 with a dtype".into());
                }
            },
        };
        let mut spec = TensorSpec {
            storage_key: storage.key.clone(),
            storage_kind: storage.kind,
            storage_numel: storage.numel,
            dtype,
            storage_offset: offset,
            shape,
            strides,
            requires_grad,
        };
        if let Some((view_offset, view_numel)) = storage.view {
            // A legacy view is a window of its root storage: bound the tensor by the window,
            // then express it relative to the root.
            let es = elem_bytes(storage.kind.element());
            let window = TensorSpec {
                storage_numel: view_numel,
                ..spec.clone()
            };
            window
                .storage_byte_span()
                .map_err(|e| format!("tensor does not fit its storage view: {e}"))?;
            let view_bytes = view_offset.checked_mul(es).ok_or("view offset overflows")?;
            let dsize = elem_bytes(dtype);
            if !view_bytes.is_multiple_of(dsize) {
                return Err("storage view offset is not a whole number of elements".into());
            }
            let view_elems = view_bytes.checked_div(dsize).ok_or("zero element size")?;
            spec.storage_offset = offset
                .checked_add(view_elems)
                .ok_or("storage offset overflows")?;
        }
        spec.storage_byte_span().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    fn int_tuple(&self, v: Value, what: &str) -> Result<Vec<u64>, String> {
        let items = match self.obj(v) {
            Some(Object::Tuple(items)) => items,
            _ => {
                return Err(format!(
                    "{what} is {}, expected a tuple of ints",
                    self.kind(v)
                ));
            }
        };
        if items.len() > self.limits.max_ndim {
            return Err(format!(
                "{what} has {} dimensions, more than {}",
                items.len(),
                self.limits.max_ndim
            ));
        }
        items
            .iter()
            .map(|&x| match x {
                Value::Int(i) => {
                    u64::try_from(i).map_err(|_| format!("{what} has a negative entry {i}"))
                }
                other => Err(format!("{what} has an entry that is {}", self.kind(other))),
            })
            .collect()
    }

    /// BUILD: only sets Python attributes on dicts (`state_dict._metadata`), which carry
    /// nothing we need, so the state is checked for shape and dropped.
    fn build(&mut self, target: Value, state: Value, op: Op) -> Result<(), PickleError> {
        match self.obj(target) {
            Some(Object::Dict(_)) => {}
            _ => {
                return Err(op.mismatch("a dict to set state on", self.kind(target)));
            }
        }
        let ok = match self.obj(state) {
            Some(Object::Dict(_)) => true,
            Some(Object::Tuple(items)) => {
                items.len() == 2
                    && items
                        .iter()
                        .all(|&x| x == Value::None || matches!(self.obj(x), Some(Object::Dict(_))))
            }
            _ => state == Value::None,
        };
        if ok {
            Ok(())
        } else {
            Err(op.mismatch("a state dict", self.kind(state)))
        }
    }

    fn persistent_load(&mut self, pid: Value, op: Op) -> Result<Value, PickleError> {
        let bad = |reason: String| PickleError::BadPersistentId {
            pos: op.at(),
            reason,
        };
        let items = match self.obj(pid) {
            Some(Object::Tuple(items)) => items,
            _ => {
                return Err(bad(format!(
                    "persistent id is {}, expected a tuple",
                    self.kind(pid)
                )));
            }
        };
        let want = match self.flavor {
            PidFlavor::Zip => 5,
            PidFlavor::Legacy => 6,
        };
        match items.first().and_then(|&t| self.obj(t)) {
            Some(Object::Str(s)) if s == "storage" => {}
            Some(Object::Str(s)) => {
                return Err(bad(format!(
                    "typename {:?} is not supported (only 'storage')",
                    truncate(s)
                )));
            }
            _ => return Err(bad("first element is not the string 'storage'".into())),
        }
        if items.len() != want {
            return Err(bad(format!(
                "expected a {want}-tuple for this format, got {} elements",
                items.len()
            )));
        }
        let item = |i: usize| items.get(i).copied().unwrap_or(Value::None);
        let (ty, key_v, loc, numel_v, view_v) = (item(1), item(2), item(3), item(4), item(5));
        let kind = match self.global_of(ty) {
            Some(Global::Storage(k)) => k,
            _ => {
                return Err(bad(format!(
                    "storage type is {}, expected a torch storage class",
                    self.kind(ty)
                )));
            }
        };
        if !matches!(self.obj(loc), Some(Object::Str(_))) {
            return Err(bad(format!(
                "location is {}, expected a string",
                self.kind(loc)
            )));
        }
        let Value::Int(numel) = numel_v else {
            return Err(bad(format!(
                "size is {}, expected an int",
                self.kind(numel_v)
            )));
        };
        let numel =
            u64::try_from(numel).map_err(|_| bad(format!("negative storage size {numel}")))?;
        numel
            .checked_mul(elem_bytes(kind.element()))
            .ok_or_else(|| bad("storage byte size overflows".into()))?;
        let view = match (self.flavor, view_v) {
            (PidFlavor::Zip, _) | (PidFlavor::Legacy, Value::None) => None,
            (PidFlavor::Legacy, v) => {
                let parts = match self.obj(v) {
                    Some(Object::Tuple(p)) if p.len() == 3 => p,
                    _ => {
                        return Err(bad(format!(
                            "view_metadata is {}, expected None or (key, offset, size)",
                            self.kind(v)
                        )));
                    }
                };
                let nums: Vec<Value> = parts.iter().skip(1).copied().collect();
                match nums.as_slice() {
                    [Value::Int(o), Value::Int(n)] => {
                        let o =
                            u64::try_from(*o).map_err(|_| bad("negative view offset".into()))?;
                        let n = u64::try_from(*n).map_err(|_| bad("negative view size".into()))?;
                        let end = o
                            .checked_add(n)
                            .ok_or_else(|| bad("view end overflows".into()))?;
                        if end > numel {
                            return Err(bad(format!(
                                "view [{o}, {end}) exceeds storage size {numel}"
                            )));
                        }
                        Some((o, n))
                    }
                    _ => return Err(bad("view offset and size must be ints".into())),
                }
            }
        };
        let key = self
            .storage_key(key_v)
            .ok_or_else(|| bad(format!("key is {}, expected a string", self.kind(key_v))))?;
        match self.storages.get(&key) {
            Some(&(k, n)) if (k, n) != (kind, numel) => {
                return Err(PickleError::StorageConflict {
                    key: truncate(&key),
                    pos: op.at(),
                });
            }
            Some(_) => {}
            None => {
                self.storages.insert(key.clone(), (kind, numel));
            }
        }
        self.alloc(
            Object::Storage(Box::new(StorageView {
                key,
                kind,
                numel,
                view,
            })),
            op,
        )
    }

    /// The key string of a persistent id, interned by object so one huge key referenced
    /// many times through the memo is copied and hashed once.
    fn storage_key(&mut self, v: Value) -> Option<Arc<str>> {
        let Value::Obj(id) = v else { return None };
        if let Some(k) = self.storage_key_objs.get(&id) {
            return Some(k.clone());
        }
        let key: Arc<str> = match self.obj(v) {
            Some(Object::Str(s)) => Arc::from(s.as_str()),
            _ => return None,
        };
        self.storage_key_objs.insert(id, key.clone());
        Some(key)
    }

    // ---- results ----

    fn state_dict(&self, root: Value) -> Result<StateDict, PickleError> {
        let pairs = match self.obj(root) {
            Some(Object::Dict(p)) => p,
            _ => {
                return Err(PickleError::NotAStateDict {
                    found: self.kind(root),
                });
            }
        };
        let mut seen_key_objs = HashSet::new();
        let mut seen_names = HashSet::new();
        let mut tensors = Vec::with_capacity(pairs.len());
        for (index, &(k, v)) in pairs.iter().enumerate() {
            // Identity first: the same key object twice is a duplicate without hashing it.
            let name = match self.obj(k) {
                Some(Object::Str(s)) => s,
                _ => {
                    return Err(PickleError::NonStringKey {
                        index: u64_of(index),
                        found: self.kind(k),
                    });
                }
            };
            if !seen_key_objs.insert(k_id(k)) || !seen_names.insert(name.as_str()) {
                return Err(PickleError::DuplicateName {
                    name: truncate(name),
                });
            }
            let spec = match self.obj(v) {
                Some(Object::Tensor(t)) => t,
                _ => {
                    return Err(PickleError::NotATensor {
                        name: truncate(name),
                        found: self.kind(v),
                    });
                }
            };
            tensors.push((name.clone(), (**spec).clone()));
        }
        Ok(StateDict { tensors })
    }

    fn plain(&self, root: Value) -> Result<Plain, PickleError> {
        let mut budget = self.limits.max_plain_nodes;
        self.plain_rec(root, 0, &mut budget)
    }

    fn plain_rec(&self, v: Value, depth: usize, budget: &mut usize) -> Result<Plain, PickleError> {
        *budget = budget.checked_sub(1).ok_or(PickleError::LimitExceeded {
            what: "plain nodes",
            limit: u64_of(self.limits.max_plain_nodes),
            pos: 0,
        })?;
        if depth > self.limits.max_plain_depth {
            return Err(PickleError::LimitExceeded {
                what: "levels of nesting",
                limit: u64_of(self.limits.max_plain_depth),
                pos: 0,
            });
        }
        let d = depth.saturating_add(1);
        Ok(match v {
            Value::None => Plain::None,
            Value::Bool(b) => Plain::Bool(b),
            Value::Int(i) => Plain::Int(i),
            Value::Float(f) => Plain::Float(f),
            Value::Obj(_) => match self.obj(v) {
                Some(Object::Str(s)) => Plain::Str(s.clone()),
                Some(Object::Bytes(b)) => Plain::Bytes(b.clone()),
                Some(Object::BigInt(b)) => Plain::BigInt(b.clone()),
                Some(Object::Tuple(items)) => Plain::Tuple(
                    items
                        .iter()
                        .map(|&x| self.plain_rec(x, d, budget))
                        .collect::<Result<_, _>>()?,
                ),
                Some(Object::List(items)) => Plain::List(
                    items
                        .iter()
                        .map(|&x| self.plain_rec(x, d, budget))
                        .collect::<Result<_, _>>()?,
                ),
                Some(Object::Dict(pairs)) => Plain::Dict(
                    pairs
                        .iter()
                        .map(|&(k, x)| {
                            Ok((self.plain_rec(k, d, budget)?, self.plain_rec(x, d, budget)?))
                        })
                        .collect::<Result<_, PickleError>>()?,
                ),
                _ => {
                    return Err(PickleError::NotPlain {
                        found: self.kind(v),
                    });
                }
            },
        })
    }
}

fn k_id(v: Value) -> ObjId {
    match v {
        Value::Obj(id) => id,
        _ => ObjId::MAX,
    }
}

/// Longest argument tuple any allowlisted callable takes (`_rebuild_tensor_v3` with metadata).
const MAX_ARGS: usize = 8;

/// The opcode being run and where it starts, for error reports.
#[derive(Clone, Copy)]
struct Op {
    name: &'static str,
    pos: usize,
}

impl Op {
    fn at(self) -> u64 {
        u64_of(self.pos)
    }
    fn underflow(self) -> PickleError {
        PickleError::StackUnderflow {
            opcode: self.name,
            pos: self.at(),
        }
    }
    fn no_mark(self) -> PickleError {
        PickleError::NoMark {
            opcode: self.name,
            pos: self.at(),
        }
    }
    fn bad(self, reason: &'static str) -> PickleError {
        PickleError::BadOperand {
            opcode: self.name,
            pos: self.at(),
            reason,
        }
    }
    fn limit(self, what: &'static str, limit: usize) -> PickleError {
        PickleError::LimitExceeded {
            what,
            limit: u64_of(limit),
            pos: self.at(),
        }
    }
    fn mismatch(self, expected: &'static str, found: &'static str) -> PickleError {
        PickleError::TypeMismatch {
            opcode: self.name,
            pos: self.at(),
            expected,
            found,
        }
    }
    fn unsupported(self, reason: &'static str) -> PickleError {
        PickleError::UnsupportedOpcode {
            opcode: self.name,
            pos: self.at(),
            reason,
        }
    }
}

fn pairs_of(items: Vec<Value>, op: Op) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return Err(op.bad("odd number of items for key/value pairs"));
    }
    let mut it = items.into_iter();
    let mut pairs = Vec::with_capacity(it.len() / 2);
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        pairs.push((k, v));
    }
    Ok(pairs)
}

fn resolve_global(module: &[u8], name: &[u8], op: Op) -> Result<Global, PickleError> {
    let m = String::from_utf8_lossy(module);
    let n = String::from_utf8_lossy(name);
    Global::resolve(&m, &n).ok_or_else(|| PickleError::ForbiddenGlobal {
        module: truncate(&m),
        name: truncate(&n),
        pos: op.at(),
    })
}

/// Keeps error messages bounded and printable whatever the file holds.
fn truncate(s: &str) -> String {
    let mut out: String = s.chars().take(120).flat_map(char::escape_debug).collect();
    if s.chars().nth(120).is_some() {
        out.push_str("...");
    }
    out
}

fn parse_i64(line: &[u8]) -> Option<i64> {
    std::str::from_utf8(line).ok()?.trim().parse::<i64>().ok()
}

/// LONG1/LONG4 payload (little-endian two's complement) as i64 when it fits.
fn long_to_i64(bytes: &[u8]) -> Option<i64> {
    let Some(&last) = bytes.last() else {
        return Some(0);
    };
    let negative = last & 0x80 != 0;
    let fill = if negative { 0xff } else { 0 };
    // Bytes past the 8th must only be sign extension.
    let (low, high) = bytes.split_at(bytes.len().min(8));
    if high.iter().any(|&b| b != fill) {
        return None;
    }
    let mut buf = [fill; 8];
    buf.get_mut(..low.len())?.copy_from_slice(low);
    let v = i64::from_le_bytes(buf);
    // A value like 0x80.. in 8 bytes with a 0 sign byte after it does not fit.
    if !high.is_empty() && (v < 0) != negative {
        return None;
    }
    Some(v)
}

/// STRING's argument: a Python repr, quoted with ' or ", with backslash escapes.
fn unquote_string(line: &[u8]) -> Option<Vec<u8>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (&q, rest) = line.split_first()?;
    if q != b'\'' && q != b'"' {
        return None;
    }
    let body = rest.strip_suffix(&[q])?;
    let mut out = Vec::with_capacity(body.len());
    let mut i = body.iter().copied().peekable();
    while let Some(c) = i.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(e) = i.next() else {
            out.push(b'\\');
            break;
        };
        match e {
            b'\\' | b'\'' | b'"' => out.push(e),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\n' => {}
            b'x' => {
                let h = [i.next()?, i.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&h).ok()?, 16).ok()?);
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e.wrapping_sub(b'0'));
                for _ in 0..2 {
                    match i.peek() {
                        Some(&d @ b'0'..=b'7') => {
                            v = v
                                .checked_mul(8)?
                                .checked_add(u32::from(d.wrapping_sub(b'0')))?;
                            i.next();
                        }
                        _ => break,
                    }
                }
                out.push(u8::try_from(v & 0xff).ok()?);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

/// UNICODE's argument: latin-1 bytes with `\uXXXX` and `\UXXXXXXXX` escapes.
fn raw_unicode_escape(line: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0usize;
    while let Some(&c) = line.get(i) {
        let next = line.get(i.checked_add(1)?).copied();
        let width = match (c, next) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => {
                out.push(char::from(c));
                i = i.checked_add(1)?;
                continue;
            }
        };
        let start = i.checked_add(2)?;
        let hex = line.get(start..start.checked_add(width)?)?;
        let cp = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        out.push(char::from_u32(cp)?);
        i = start.checked_add(width)?;
    }
    Some(out)
}

/// Names of every opcode of every protocol, so errors can say which one they refused.
fn opcode_name(b: u8) -> Option<&'static str> {
    Some(match b {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Public entry points

/// Parses one pickle holding a state dict (a dict or OrderedDict of name → tensor).
/// Returns the tensors in pickle order and the number of bytes the pickle used (its STOP
/// opcode's end), since legacy files hold several pickles back to back.
pub fn parse_state_dict(
    data: &[u8],
    flavor: PidFlavor,
    limits: &Limits,
) -> Result<(StateDict, usize), PickleError> {
    let mut m = Machine::new(data, limits, flavor);
    let root = m.run()?;
    Ok((m.state_dict(root)?, m.pos))
}

/// Parses one pickle of plain data (ints, strings, containers; no tensors or globals) and
/// returns it with the number of bytes used.
pub fn parse_plain(data: &[u8], limits: &Limits) -> Result<(Plain, usize), PickleError> {
    // Plain pickles carry no persistent ids; the flavor only matters if one shows up, and
    // then it is refused when converting (a storage has no plain form).
    let mut m = Machine::new(data, limits, PidFlavor::Zip);
    let root = m.run()?;
    Ok((m.plain(root)?, m.pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_stays_small() {
        // The arena may hold `max_objects` of these.
        assert!(std::mem::size_of::<Object>() <= 32);
        assert!(std::mem::size_of::<Value>() <= 16);
    }

    #[test]
    fn long_decoding() {
        assert_eq!(long_to_i64(&[]), Some(0));
        assert_eq!(long_to_i64(&[0xff]), Some(-1));
        assert_eq!(long_to_i64(&[0x80, 0x00]), Some(128));
        assert_eq!(long_to_i64(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None);
        assert_eq!(long_to_i64(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Some(1));
        assert_eq!(
            long_to_i64(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Some(-1)
        );
        assert_eq!(long_to_i64(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn extent_and_contiguity() {
        assert_eq!(extent_elems(&[2, 3], &[3, 1]), Some(6));
        assert_eq!(extent_elems(&[3, 2], &[1, 3]), Some(6));
        assert_eq!(extent_elems(&[], &[]), Some(1));
        assert_eq!(extent_elems(&[0, 5], &[5, 1]), Some(0));
        assert_eq!(extent_elems(&[4, 3], &[0, 1]), Some(3));
        assert_eq!(extent_elems(&[u64::MAX, 2], &[2, 1]), None);
        assert!(is_contiguous(&[2, 1, 3], &[3, 99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[], &[]));
    }

    #[test]
    fn string_escapes() {
        assert_eq!(
            unquote_string(b"'a\\nb\\x41\\101'"),
            Some(b"a\nbAA".to_vec())
        );
        assert_eq!(unquote_string(b"\"x\""), Some(b"x".to_vec()));
        assert_eq!(unquote_string(b"'x"), None);
        assert_eq!(
            raw_unicode_escape(b"a\\u00e9\\U0001F600"),
            Some("a\u{e9}\u{1F600}".to_string())
        );
        assert_eq!(raw_unicode_escape(b"\\ud800"), None);
    }
}
