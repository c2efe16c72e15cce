//! Every tensor of the golden .bin checkpoints (and torch-written fixtures) read through
//! the computed offsets must equal its safetensors twin byte for byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::torch_common as common;

use std::fs::File;

use common::*;
use mergestream::dtype::DType;
use mergestream::format::torch_bin::{TorchFormat, index_torch_bin};

#[test]
fn base_bin_shards_match_base_safetensors() {
    let twin = load_twin(&files_with_ext("golden/base", "safetensors"));
    let mut total = 0;
    for shard in files_with_ext("golden/base_bin", "bin") {
        let idx = index_torch_bin(File::open(&shard).unwrap()).unwrap();
        assert_eq!(idx.format, TorchFormat::Zip);
        assert!(
            idx.tensors
                .iter()
                .all(|t| t.contiguous && !t.big_endian && t.dtype == DType::F16)
        );
        // torch aligns zip records to 64 bytes, so they can be mapped and cast in place.
        assert!(idx.tensors.iter().all(|t| t.byte_offset % 64 == 0));
        total += compare_bin_with_twin(&shard, &twin);
    }
    assert_eq!(total, twin.len());
}

#[test]
fn base_bin_index_json_agrees_with_shards() {
    let index = String::from_utf8(read("golden/base_bin/pytorch_model.bin.index.json")).unwrap();
    let mut found = 0;
    for shard in files_with_ext("golden/base_bin", "bin") {
        let file_name = shard.file_name().unwrap().to_str().unwrap().to_string();
        for t in index_torch_bin(File::open(&shard).unwrap())
            .unwrap()
            .tensors
        {
            let entry = format!("\"{}\": \"{}\"", t.name, file_name);
            assert!(index.contains(&entry), "{entry} missing from index");
            found += 1;
        }
    }
    assert_eq!(found, index.matches(".bin\"").count());
}

#[test]
fn other_legacy_bin_matches_other_safetensors() {
    let twin = load_twin(&files_with_ext("golden/other", "safetensors"));
    let mut total = 0;
    for shard in files_with_ext("golden/other_legacy_bin", "bin") {
        let idx = index_torch_bin(File::open(&shard).unwrap()).unwrap();
        assert_eq!(idx.format, TorchFormat::Legacy);
        total += compare_bin_with_twin(&shard, &twin);
    }
    assert_eq!(total, twin.len());
}

#[test]
fn lora_bin_adapter_loads() {
    let path = fixture("golden/lora_bin/adapter_model.bin");
    let idx = index_torch_bin(File::open(&path).unwrap()).unwrap();
    assert_eq!(idx.format, TorchFormat::Zip);
    // r=4 on q,k,v,o,gate,up,down of 8 layers: 7 modules x 8 layers x (A, B).
    assert_eq!(idx.tensors.len(), 7 * 8 * 2);
    let q_a = idx
        .tensors
        .iter()
        .find(|t| t.name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(
        (q_a.dtype, q_a.shape.as_slice()),
        (DType::F32, &[4u64, 32][..])
    );
    let down_b = idx
        .tensors
        .iter()
        .find(|t| t.name == "base_model.model.model.layers.7.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(down_b.shape, vec![32, 4]);
    let up_a = idx
        .tensors
        .iter()
        .find(|t| t.name == "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight")
        .unwrap();
    assert_eq!(up_a.shape, vec![4, 32]);
    for t in &idx.tensors {
        assert!(
            t.name.starts_with("base_model.model.model.layers."),
            "{}",
            t.name
        );
        assert!(
            t.name.ends_with(".lora_A.weight") || t.name.ends_with(".lora_B.weight"),
            "{}",
            t.name
        );
        assert!(t.contiguous);
    }
    // Values are finite f32 (read through the computed offsets).
    let mut f = File::open(&path).unwrap();
    let bytes = tensor_bytes(&mut f, q_a);
    let vals: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(vals.iter().all(|v| v.is_finite()) && vals.iter().any(|&v| v != 0.0));
}

/// Torch-written fixtures (see tests/fixtures/torch/gen/make_fixtures.py) against their twins.
fn check_pair(
    bin: &str,
    twin: &str,
    format: TorchFormat,
) -> Vec<mergestream::format::torch_bin::TensorLocation> {
    let tw = load_twin(&[fixture(twin)]);
    let n = compare_bin_with_twin(&fixture(bin), &tw);
    assert_eq!(n, tw.len(), "{bin}");
    let idx = index_torch_bin(File::open(fixture(bin)).unwrap()).unwrap();
    assert_eq!(idx.format, format, "{bin}");
    idx.tensors
}

#[test]
fn mixed_dtypes_and_layouts_zip() {
    let ts = check_pair("mixed_zip.bin", "mixed_zip.safetensors", TorchFormat::Zip);
    let get = |n: &str| ts.iter().find(|t| t.name == n).unwrap();
    assert!(!get("transposed").contiguous);
    assert_eq!(get("transposed").strides, vec![1, 5]);
    assert!(get("sliced").contiguous);
    assert_eq!(get("sliced").storage_key, get("strided").storage_key);
    assert_eq!(
        get("sliced").byte_offset,
        get("strided").byte_offset + 7 * 4
    );
    assert_eq!(get("expanded").strides, vec![0, 1]);
    assert_eq!(get("expanded").byte_len, 3 * 4);
    assert_eq!(get("empty").byte_len, 0);
    assert_eq!(get("scalar").shape, Vec::<u64>::new());
    assert_eq!(get("tied_a").byte_offset, get("tied_b").byte_offset);
    assert_eq!(
        get("tied_view").byte_offset,
        get("tied_a").byte_offset + 3 * 2
    );
}

#[test]
fn mixed_dtypes_and_layouts_legacy() {
    check_pair(
        "mixed_legacy.bin",
        "mixed_legacy.safetensors",
        TorchFormat::Legacy,
    );
}

#[test]
fn new_dtypes_via_rebuild_tensor_v3() {
    for (bin, format) in [
        ("v3_zip.bin", TorchFormat::Zip),
        ("v3_legacy.bin", TorchFormat::Legacy),
    ] {
        let twin = bin.replace(".bin", ".safetensors");
        let ts = check_pair(bin, &twin, format);
        let dt = |n: &str| ts.iter().find(|t| t.name == n).unwrap().dtype;
        assert_eq!(
            [
                dt("u16"),
                dt("u32"),
                dt("u64"),
                dt("f8e4m3"),
                dt("f8e5m2"),
                dt("plain")
            ],
            [
                DType::U16,
                DType::U32,
                DType::U64,
                DType::F8E4M3,
                DType::F8E5M2,
                DType::F32
            ]
        );
    }
}

#[test]
fn module_state_dict_with_metadata_build() {
    check_pair(
        "module_state_dict.bin",
        "module_state_dict.safetensors",
        TorchFormat::Zip,
    );
}

#[test]
fn parameters_and_rebuild_from_type_v2() {
    check_pair("parameters.bin", "parameters.safetensors", TorchFormat::Zip);
    check_pair(
        "from_type_v2.bin",
        "from_type_v2.safetensors",
        TorchFormat::Zip,
    );
}

#[test]
fn protocol_3_pickle() {
    check_pair("proto3.bin", "proto3.safetensors", TorchFormat::Zip);
}

#[test]
fn big_endian_zip_is_flagged_and_swaps_to_the_same_values() {
    let ts = check_pair(
        "bigendian_zip.bin",
        "mixed_zip.safetensors",
        TorchFormat::Zip,
    );
    assert!(ts.iter().all(|t| t.big_endian));
}

#[test]
fn zip64_local_headers_and_missing_byteorder() {
    check_pair("zip64_local.bin", "mixed_zip.safetensors", TorchFormat::Zip);
    let ts = check_pair(
        "no_byteorder.bin",
        "mixed_zip.safetensors",
        TorchFormat::Zip,
    );
    assert!(ts.iter().all(|t| !t.big_endian));
}
