//! Output bytes placed in memory for `O_DIRECT` writes.
//!
//! A direct write needs its memory aligned to the disk's block, as its file offset is. A
//! chunk of output lands at any byte offset, so it is built in a buffer whose bytes start
//! at the same offset within a block in memory as in the file: its whole blocks can then go
//! to disk straight from it (see `pipeline::direct`), with no copy into aligned buffers.
//! The methods build their streamed output in these too, so this sits below both.

/// The alignment every direct write keeps: 4 KiB (the largest logical block of common
/// disks), or the page size when that is larger.
pub fn direct_unit() -> usize {
    static UNIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *UNIT.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page).map_or(4096, |p| p.max(4096))
    })
}

/// Output bytes built by appending, placed so that they can go to disk with `O_DIRECT`
/// without a copy: they start at the same offset within a [`direct_unit`] block in memory
/// as in the file. The buffer begins with padding that is not part of the output.
pub struct AlignedOut {
    v: Vec<u8>,
    pad: usize,
}

impl AlignedOut {
    /// Room for `capacity` bytes that go to `file_offset`.
    pub fn new(capacity: usize, file_offset: u64) -> AlignedOut {
        let unit = direct_unit();
        let mut v = Vec::with_capacity(capacity + unit);
        let phase = (file_offset % unit as u64) as usize;
        let pad = (phase + unit - v.as_ptr() as usize % unit) % unit;
        v.resize(pad, 0);
        AlignedOut { v, pad }
    }

    /// The buffer to append the output to. Only appending keeps the placement (growing past
    /// the capacity moves it; the bytes are then copied when written, still correct).
    pub fn append(&mut self) -> &mut Vec<u8> {
        &mut self.v
    }

    pub fn bytes(&self) -> &[u8] {
        self.v.get(self.pad..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_sit_at_their_file_offsets_phase() {
        let unit = direct_unit();
        for at in [0u64, 1, 7, 4095, 4096, 1 << 33, (1 << 33) + 123] {
            let mut out = AlignedOut::new(10_000, at);
            out.append().extend_from_slice(&[5u8; 10_000]);
            assert_eq!(out.bytes(), &[5u8; 10_000][..]);
            assert_eq!(
                (out.bytes().as_ptr() as usize % unit) as u64,
                at % unit as u64
            );
        }
    }
}
