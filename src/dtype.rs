//! Element types of checkpoint tensors.
//!
//! Only F16, BF16, F32 and F64 take part in arithmetic; every other type is read and copied
//! through byte for byte.

use std::fmt;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    F6E2M3,
    F6E3M2,
    F4,
}

const NAMES: &[(DType, &str)] = &[
    (DType::Bool, "BOOL"),
    (DType::U8, "U8"),
    (DType::I8, "I8"),
    (DType::I16, "I16"),
    (DType::U16, "U16"),
    (DType::F16, "F16"),
    (DType::BF16, "BF16"),
    (DType::I32, "I32"),
    (DType::U32, "U32"),
    (DType::F32, "F32"),
    (DType::F64, "F64"),
    (DType::I64, "I64"),
    (DType::U64, "U64"),
    (DType::C64, "C64"),
    (DType::F8E5M2, "F8_E5M2"),
    (DType::F8E4M3, "F8_E4M3"),
    (DType::F8E8M0, "F8_E8M0"),
    (DType::F8E4M3Fnuz, "F8_E4M3FNUZ"),
    (DType::F8E5M2Fnuz, "F8_E5M2FNUZ"),
    (DType::F6E2M3, "F6_E2M3"),
    (DType::F6E3M2, "F6_E3M2"),
    (DType::F4, "F4"),
];

impl DType {
    /// Parse a safetensors dtype string (`"F16"`, `"F8_E4M3"`, ...).
    pub fn from_safetensors(s: &str) -> Option<DType> {
        NAMES.iter().find(|(_, n)| *n == s).map(|(d, _)| *d)
    }

    pub fn safetensors_name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(d, _)| *d == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// Bits per element (sub-byte types exist: F4, F6).
    pub fn bits(self) -> u64 {
        use DType::*;
        match self {
            F4 => 4,
            F6E2M3 | F6E3M2 => 6,
            Bool | U8 | I8 | F8E5M2 | F8E4M3 | F8E8M0 | F8E4M3Fnuz | F8E5M2Fnuz => 8,
            I16 | U16 | F16 | BF16 => 16,
            I32 | U32 | F32 => 32,
            F64 | I64 | U64 | C64 => 64,
        }
    }

    /// Bytes per element, for types that are a whole number of bytes wide.
    pub fn size(self) -> usize {
        (self.bits() / 8) as usize
    }

    /// Whether mergestream can do arithmetic on this type (converting through f32).
    pub fn is_computable(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The name transformers writes in config.json (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        use DType::*;
        match self {
            F16 => "float16",
            BF16 => "bfloat16",
            F32 => "float32",
            F64 => "float64",
            Bool => "bool",
            U8 => "uint8",
            I8 => "int8",
            I16 => "int16",
            U16 => "uint16",
            I32 => "int32",
            U32 => "uint32",
            I64 => "int64",
            U64 => "uint64",
            C64 => "complex64",
            F8E5M2 => "float8_e5m2",
            F8E4M3 => "float8_e4m3fn",
            F8E8M0 => "float8_e8m0fnu",
            F8E4M3Fnuz => "float8_e4m3fnuz",
            F8E5M2Fnuz => "float8_e5m2fnuz",
            F6E2M3 => "float6_e2m3",
            F6E3M2 => "float6_e3m2",
            F4 => "float4_e2m1fn_x2",
        }
    }

    /// The dtype torch calls `name` (`torch.float16` is `float16`; also torch's aliases
    /// `half`, `float`, `double`, `long`, `int`, `short`). `float4_e2m1fn_x2` is not read:
    /// its elements are pairs of values, which F4's shapes do not count.
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let alias = match name {
            "half" => Some(DType::F16),
            "float" => Some(DType::F32),
            "double" => Some(DType::F64),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            "short" => Some(DType::I16),
            _ => None,
        };
        alias.or_else(|| {
            NAMES
                .iter()
                .map(|(d, _)| *d)
                .find(|d| d.bits() % 8 == 0 && d.torch_name() == name)
        })
    }

    /// The element type of a typed torch storage class (`FloatStorage`, `HalfStorage`, ...),
    /// as legacy checkpoints and `_rebuild_tensor_v2` pickles name them.
    pub fn from_torch_storage(class: &str) -> Option<DType> {
        Some(match class {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    /// Parse a dtype the way users write it on a command line or in a YAML config:
    /// `float16`, `fp16`, `f16`, `half`, `bfloat16`, `bf16`, `float32`, `fp32`, `f32`, `float`.
    pub fn parse_float(s: &str) -> Option<DType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float16" | "fp16" | "f16" | "half" | "torch.float16" => Some(DType::F16),
            "bfloat16" | "bf16" | "torch.bfloat16" => Some(DType::BF16),
            "float32" | "fp32" | "f32" | "float" | "torch.float32" => Some(DType::F32),
            "float64" | "fp64" | "f64" | "double" | "torch.float64" => Some(DType::F64),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (d, n) in NAMES {
            assert_eq!(DType::from_safetensors(n), Some(*d));
            assert_eq!(d.safetensors_name(), *n);
        }
        assert_eq!(DType::from_safetensors("F17"), None);
    }

    #[test]
    fn user_spellings() {
        assert_eq!(DType::parse_float("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse_float("FP16"), Some(DType::F16));
        assert_eq!(DType::parse_float("int8"), None);
    }

    #[test]
    fn torch_names() {
        for (d, _) in NAMES.iter().filter(|(d, _)| d.bits() % 8 == 0) {
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(*d));
        }
        assert_eq!(DType::from_torch_name("half"), Some(DType::F16));
        assert_eq!(DType::from_torch_name("float4_e2m1fn_x2"), None);
        assert_eq!(
            DType::from_torch_storage("BFloat16Storage"),
            Some(DType::BF16)
        );
        assert_eq!(DType::from_torch_storage("UntypedStorage"), None);
    }
}
