//! Output layout: which shard each tensor lands in and at what byte offset.
//!
//! Tensors are split into shards the way transformers' `save_pretrained` does (a tensor
//! that would tip a shard over the limit starts a new one; a tensor larger than the limit
//! gets a shard of its own). Inside a shard, tensors are ordered by element size (largest
//! first) then name, so each is aligned to its element size, as the safetensors writer does.

use crate::dtype::DType;
use crate::format::safetensors::{OutEntry, write_header};
use crate::plan::Step;

/// One output shard file.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    pub file_name: String,
    /// The complete header, length prefix included; data starts right after it.
    pub header: Vec<u8>,
    /// Total file size: header plus data.
    pub size: u64,
}

/// What the layout needs to know about an output tensor.
pub struct LayoutItem<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub len: u64,
}

/// Where a tensor landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub shard: usize,
    /// Absolute offset in the shard file.
    pub offset: u64,
}

/// Assign shards and offsets to steps (in their order).
pub fn place(steps: &mut [Step], max_shard_size: u64) -> Vec<Shard> {
    let items: Vec<LayoutItem<'_>> = steps
        .iter()
        .map(|s| LayoutItem {
            name: &s.name,
            dtype: s.dtype,
            shape: &s.shape,
            len: s.len,
        })
        .collect();
    let (shards, placements) = lay_out(&items, max_shard_size, "model");
    for (s, p) in steps.iter_mut().zip(placements) {
        s.shard = p.shard;
        s.offset = p.offset;
    }
    shards
}

/// Lay out `items` (in output order) into shards of at most `max_shard_size` bytes of data.
/// `stem` is `model` for `model-00001-of-00003.safetensors`.
pub fn lay_out(
    items: &[LayoutItem<'_>],
    max_shard_size: u64,
    stem: &str,
) -> (Vec<Shard>, Vec<Placement>) {
    // Assign shard numbers as huggingface_hub's splitter does.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, it) in items.iter().enumerate() {
        if it.len > max_shard_size {
            groups.push(vec![i]);
            continue;
        }
        if current_size + it.len > max_shard_size && !current.is_empty() {
            groups.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += it.len;
    }
    if !current.is_empty() || groups.is_empty() {
        groups.push(current);
    }

    let n = groups.len();
    let mut shards = Vec::with_capacity(n);
    let mut placements = vec![
        Placement {
            shard: 0,
            offset: 0
        };
        items.len()
    ];
    for (g, members) in groups.iter().enumerate() {
        let mut order = members.clone();
        order.sort_by(|&a, &b| {
            items[b]
                .dtype
                .bits()
                .cmp(&items[a].dtype.bits())
                .then_with(|| items[a].name.cmp(items[b].name))
        });
        let mut entries = Vec::with_capacity(order.len());
        let mut begin = 0u64;
        for &i in &order {
            let it = &items[i];
            entries.push(OutEntry {
                name: it.name,
                dtype: it.dtype,
                shape: it.shape,
                begin,
                end: begin + it.len,
            });
            begin += it.len;
        }
        let header = write_header(&entries);
        let data_start = header.len() as u64;
        for (e, &i) in entries.iter().zip(&order) {
            placements[i] = Placement {
                shard: g,
                offset: data_start + e.begin,
            };
        }
        let file_name = if n == 1 {
            format!("{stem}.safetensors")
        } else {
            format!("{stem}-{:05}-of-{:05}.safetensors", g + 1, n)
        };
        shards.push(Shard {
            file_name,
            size: data_start + begin,
            header,
        });
    }
    (shards, placements)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item<'a>(name: &'a str, dtype: DType, shape: &'a [u64]) -> LayoutItem<'a> {
        LayoutItem {
            name,
            dtype,
            shape,
            len: shape.iter().product::<u64>() * dtype.bits() / 8,
        }
    }

    #[test]
    fn splits_like_transformers() {
        let s = [10u64];
        let big = [100u64];
        let items = [
            item("a", DType::F16, &s),
            item("b", DType::F16, &s),
            item("c", DType::F16, &s),
            item("huge", DType::F16, &big),
        ];
        let (shards, places) = lay_out(&items, 45, "model");
        // a+b = 40 fit, c tips over; huge gets its own shard (placed first, as hf does).
        assert_eq!(shards.len(), 3);
        assert_eq!(places[0].shard, places[1].shard);
        assert_ne!(places[1].shard, places[2].shard);
        assert_eq!(shards[0].file_name, "model-00001-of-00003.safetensors");
        for (it, p) in items.iter().zip(&places) {
            assert!(p.offset + it.len <= shards[p.shard].size);
        }
    }

    #[test]
    fn single_shard_name_and_alignment() {
        let s1 = [3u64];
        let s2 = [2u64];
        let items = [item("x", DType::U8, &s1), item("y", DType::F32, &s2)];
        let (shards, places) = lay_out(&items, u64::MAX, "model");
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].file_name, "model.safetensors");
        // F32 first for alignment, then U8.
        assert!(places[1].offset < places[0].offset);
        assert_eq!(places[1].offset % 8, 0);
    }
}
