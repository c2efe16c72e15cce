//! libstdc++'s `std::sort` (GCC 13 introsort), as `torch.argsort(stable=False)` runs it on
//! the CPU, replayed step for step so that tied keys land where torch puts them.

/// `std::sort`'s `_S_threshold`: partitions up to this size are left to the final insertion sort.
const SORT_THRESHOLD: usize = 16;

/// `torch.argsort(keys, descending=True)` / `torch.sort(keys, descending=True).indices` with
/// `stable=False` on a CPU f32 tensor.
///
/// Torch's `sort_kernel` runs libstdc++ `std::sort` (GCC 13 introsort) over (value, index) pairs,
/// comparing values only with `KeyValueCompDesc`: `(isnan(a) && !isnan(b)) || a > b`. So NaNs
/// come first, all NaNs are tied, and `-0.0 == 0.0`. Tied keys come out in introsort order (neither
/// stable nor reverse-stable). This replays that algorithm exactly. O(n log n), one allocation of
/// n (key, index) pairs plus the result.
pub fn argsort_desc(keys: &[f32]) -> Vec<usize> {
    argsort(keys, true)
}

/// `torch.argsort(keys)` / `torch.sort(keys).indices` (ascending, `stable=False`) on a CPU f32
/// tensor. Comparator `KeyValueCompAsc`: `(!isnan(a) && isnan(b)) || a < b`, so NaNs come last.
/// See [`argsort_desc`].
pub fn argsort_asc(keys: &[f32]) -> Vec<usize> {
    argsort(keys, false)
}

/// The indices `torch.topk(keys, k, largest=True)` returns on a CPU f32 tensor, as a set (in no
/// particular order).
///
/// ATen's `topk_impl_loop` fills (value, index) pairs in index order and, with the descending
/// NaN-first comparator of [`argsort_desc`], runs `std::partial_sort` to `k` when
/// `k * 64 <= n`, else `std::nth_element` at `k - 1`; the first `k` pairs are the result. Which
/// of several tied keys at the boundary are kept depends on those algorithms' moves, replayed
/// here.
pub fn topk_desc(keys: &[f32], k: usize) -> Vec<usize> {
    if u32::try_from(keys.len()).is_ok() {
        topk_desc_with::<u32>(keys, k)
    } else {
        topk_desc_with::<usize>(keys, k)
    }
}

fn topk_desc_with<I: SortIndex>(keys: &[f32], k: usize) -> Vec<usize> {
    let n = keys.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut pairs: Vec<(u32, I)> = keys
        .iter()
        .enumerate()
        .map(|(i, &x)| (sort_rank(x) ^ u32::MAX, I::from_usize(i)))
        .collect();
    let less = |a: &(u32, I), b: &(u32, I)| a.0 < b.0;
    if k * 64 <= n {
        heap_select(&mut pairs, k, &less);
    } else {
        nth_element(&mut pairs, k - 1, &less);
    }
    pairs[..k].iter().map(|&(_, i)| i.to_usize()).collect()
}

/// `std::__heap_select(first, first + middle, last)`: the `middle` smallest end up in front.
fn heap_select<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], middle: usize, less: &L) {
    make_heap(&mut v[..middle], less);
    for i in middle..v.len() {
        if less(&v[i], &v[0]) {
            // __pop_heap(first, middle, i)
            let value = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..middle], 0, middle, value, less);
        }
    }
}

/// `std::__make_heap`.
fn make_heap<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], less: &L) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, len, value, less);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
}

/// `std::nth_element` (libstdc++ `__introselect`, depth limit `2 * floor(log2 n)`).
fn nth_element<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], nth: usize, less: &L) {
    let n = v.len();
    if n == 0 || nth >= n {
        return;
    }
    let (mut lo, mut hi) = (0, n);
    let mut depth = 2 * n.ilog2() as usize;
    while hi - lo > 3 {
        if depth == 0 {
            heap_select(&mut v[lo..hi], nth + 1 - lo, less);
            v.swap(lo, nth);
            return;
        }
        depth -= 1;
        let cut = lo + unguarded_partition_pivot(&mut v[lo..hi], less);
        if cut <= nth {
            lo = cut;
        } else {
            hi = cut;
        }
    }
    insertion_sort(&mut v[lo..hi], less);
}

// ------------------------------------------------------------------------------------------------
// Sort internals (libstdc++ std::sort, GCC 13)
// ------------------------------------------------------------------------------------------------

/// Index type of the (key, index) pairs. `u32` halves the working set for the common case
/// (50M-element tensors); `usize` covers anything larger.
trait SortIndex: Copy {
    fn from_usize(i: usize) -> Self;
    fn to_usize(self) -> usize;
}

impl SortIndex for u32 {
    fn from_usize(i: usize) -> Self {
        i as u32
    }
    fn to_usize(self) -> usize {
        self as usize
    }
}

impl SortIndex for usize {
    fn from_usize(i: usize) -> Self {
        i
    }
    fn to_usize(self) -> usize {
        self
    }
}

/// Maps an f32 to a u32 whose `<` gives the same answers as torch's NaN-aware comparators.
/// All NaNs map to `u32::MAX`, above +inf, and are tied with each other. `-0.0` maps like
/// `+0.0`. Other values map monotonically.
/// So the ascending comparator `(!isnan(a) && isnan(b)) || a < b` is `rank(a) < rank(b)`, and
/// the descending one is `rank(a) > rank(b)`. Because every comparison gives the same answer,
/// the sort makes the same moves; the integer form is just cheaper.
pub(super) fn sort_rank(x: f32) -> u32 {
    if x.is_nan() {
        return u32::MAX;
    }
    let bits = if x == 0.0 { 0 } else { x.to_bits() };
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

fn argsort(keys: &[f32], descending: bool) -> Vec<usize> {
    if u32::try_from(keys.len()).is_ok() {
        argsort_with::<u32>(keys, descending)
    } else {
        argsort_with::<usize>(keys, descending)
    }
}

fn argsort_with<I: SortIndex>(keys: &[f32], descending: bool) -> Vec<usize> {
    // Descending "a > b" is "!a < !b" on the ranks, so one `<` sort serves both directions.
    let flip = if descending { u32::MAX } else { 0 };
    let mut pairs: Vec<(u32, I)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (sort_rank(k) ^ flip, I::from_usize(i)))
        .collect();
    std_sort(&mut pairs, &|a: &(u32, I), b: &(u32, I)| a.0 < b.0);
    pairs.into_iter().map(|(_, i)| i.to_usize()).collect()
}

/// `std::sort(first, last, comp)`: introsort with a depth limit of `2 * floor(log2 n)`, then a final
/// insertion sort.
///
/// Every step below mirrors libstdc++'s `bits/stl_algo.h` / `stl_heap.h` so that ties end up in
/// the same places. Indexing is bounds-checked. With a strict weak order (which `sort_rank`
/// guarantees) the "unguarded" loops stay in range, as in C++, so the checks never fire.
fn std_sort<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], less: &L) {
    let n = v.len();
    if n < 2 {
        return;
    }
    introsort_loop(v, 2 * n.ilog2() as usize, less);
    final_insertion_sort(v, less);
}

/// `std::__introsort_loop`: recurse on the right part, loop on the left.
fn introsort_loop<T: Copy, L: Fn(&T, &T) -> bool>(
    mut v: &mut [T],
    mut depth_limit: usize,
    less: &L,
) {
    while v.len() > SORT_THRESHOLD {
        if depth_limit == 0 {
            // std::__partial_sort(first, last, last) == heap sort of the whole range.
            heap_sort(v, less);
            return;
        }
        depth_limit -= 1;
        let cut = unguarded_partition_pivot(v, less);
        let (left, right) = std::mem::take(&mut v).split_at_mut(cut);
        introsort_loop(right, depth_limit, less);
        v = left;
    }
}

/// `std::__unguarded_partition_pivot`: median of (first+1, mid, last-1) moved to `first`, then a
/// Hoare partition of `[first+1, last)` around it.
fn unguarded_partition_pivot<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], less: &L) -> usize {
    let n = v.len();
    move_median_to_first(v, 0, 1, n / 2, n - 1, less);
    unguarded_partition(v, 1, n, 0, less)
}

/// `std::__move_median_to_first`.
fn move_median_to_first<T: Copy, L: Fn(&T, &T) -> bool>(
    v: &mut [T],
    result: usize,
    a: usize,
    b: usize,
    c: usize,
    less: &L,
) {
    let pick = if less(&v[a], &v[b]) {
        if less(&v[b], &v[c]) {
            b
        } else if less(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if less(&v[a], &v[c]) {
        a
    } else if less(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, pick);
}

/// `std::__unguarded_partition(first, last, pivot)`. The pivot sits at `pivot < first` and is
/// never moved during the partition, so its value can be held in a local.
fn unguarded_partition<T: Copy, L: Fn(&T, &T) -> bool>(
    v: &mut [T],
    mut first: usize,
    mut last: usize,
    pivot: usize,
    less: &L,
) -> usize {
    let p = v[pivot];
    loop {
        while less(&v[first], &p) {
            first += 1;
        }
        last -= 1;
        while less(&p, &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

/// `std::__make_heap` followed by `std::__sort_heap` (repeated `__pop_heap`).
fn heap_sort<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], less: &L) {
    let len = v.len();
    if len < 2 {
        return;
    }
    make_heap(v, less);
    let mut last = len;
    while last > 1 {
        last -= 1;
        // __pop_heap(first, last, result = last): move the top to `last`, sift the old *last in.
        let value = v[last];
        v[last] = v[0];
        adjust_heap(v, 0, last, value, less);
    }
}

/// `std::__adjust_heap` (sift the hole down to a leaf, then `__push_heap` the value back up).
fn adjust_heap<T: Copy, L: Fn(&T, &T) -> bool>(
    v: &mut [T],
    mut hole: usize,
    len: usize,
    value: T,
    less: &L,
) {
    let top = hole;
    let mut second = hole;
    while second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if less(&v[second], &v[second - 1]) {
            second -= 1;
        }
        v[hole] = v[second];
        hole = second;
    }
    if len.is_multiple_of(2) && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        v[hole] = v[second - 1];
        hole = second - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(&v[parent], &value) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = value;
}

/// `std::__final_insertion_sort`: a guarded insertion sort of the first 16 elements, then an
/// unguarded one for the rest. The introsort loop guarantees that the minimum is among the first
/// 16, which is the sentinel.
fn final_insertion_sort<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], less: &L) {
    if v.len() > SORT_THRESHOLD {
        insertion_sort(&mut v[..SORT_THRESHOLD], less);
        for i in SORT_THRESHOLD..v.len() {
            unguarded_linear_insert(v, i, less);
        }
    } else {
        insertion_sort(v, less);
    }
}

/// `std::__insertion_sort`. A new minimum is moved straight to the front.
fn insertion_sort<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], less: &L) {
    for i in 1..v.len() {
        if less(&v[i], &v[0]) {
            let val = v[i];
            v.copy_within(0..i, 1);
            v[0] = val;
        } else {
            unguarded_linear_insert(v, i, less);
        }
    }
}

/// `std::__unguarded_linear_insert`. The `j > 0` test never decides anything (there is always a
/// sentinel); it only keeps the port panic-free.
fn unguarded_linear_insert<T: Copy, L: Fn(&T, &T) -> bool>(v: &mut [T], last: usize, less: &L) {
    let val = v[last];
    let mut j = last;
    while j > 0 && less(&val, &v[j - 1]) {
        v[j] = v[j - 1];
        j -= 1;
    }
    v[j] = val;
}
