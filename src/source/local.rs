//! A model in a local folder: files read with `pread`, or mapped chunk by chunk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, MmapOptions};

use super::{Mapped, Source, SourceFile};

/// A local folder. File names join its path, so messages show the paths users know.
#[derive(Clone, Debug)]
pub struct LocalSource {
    root: PathBuf,
}

impl LocalSource {
    /// The folder `root` (the empty path means the working directory).
    pub fn new(root: impl Into<PathBuf>) -> LocalSource {
        LocalSource { root: root.into() }
    }
}

impl Source for LocalSource {
    fn location(&self) -> &Path {
        &self.root
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let dir = if self.root.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &self.root
        };
        // Regular files and links to them (the Hugging Face cache links into blobs/); names
        // that are not UTF-8 cannot be checkpoint files we recognize.
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    fn file_len(&self, name: &str) -> io::Result<Option<u64>> {
        Ok(std::fs::metadata(self.root.join(name))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len()))
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>> {
        let path = self.root.join(name);
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(LocalFile { file, path, len }))
    }

    fn read_small(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let path = self.root.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        std::fs::read(path).map(Some)
    }

    fn local_path(&self, name: &str) -> Option<PathBuf> {
        Some(self.root.join(name))
    }
}

/// An open local file.
struct LocalFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl SourceFile for LocalFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn map(&self, offset: u64, len: usize) -> Option<io::Result<Mapped>> {
        let page = page_size();
        let aligned = offset - offset % page;
        let start = (offset - aligned) as usize;
        let map_len = start + len;
        // SAFETY: the mapping is read-only and private to this chunk. If another process
        // truncates the file while it is mapped, reads past the new end fault (SIGBUS): the
        // guard `Mapped::new` registers turns those pages into zeros, and the run's input
        // pins reject the changed file before anything is committed.
        // MAP_POPULATE: the reader thread takes the page faults (and any disk reads) up
        // front, so compute workers never stall on them.
        let map = unsafe {
            MmapOptions::new()
                .offset(aligned)
                .len(map_len)
                .populate()
                .map(&self.file)
        };
        Some(map.and_then(|map| {
            let _ = map.advise(Advice::Sequential);
            Mapped::new(map, start, len)
                .ok_or_else(|| io::Error::other("the mapping is shorter than asked for"))
        }))
    }

    fn prefers_reads(&self) -> bool {
        is_network_fs(&self.path)
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Whether `path` lives on a network or FUSE filesystem (statfs magic numbers).
pub fn is_network_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const NETWORK: &[i64] = &[
        0x6969,                // NFS
        0x517B,                // SMB
        0xFE53_4D42u32 as i64, // SMB2
        0xFF53_4D42u32 as i64, // CIFS
        0x6573_5546,           // FUSE
        0x0102_1997,           // 9p
        0x00C3_6400,           // Ceph
        0x0BD0_0BD0,           // Lustre
    ];
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    NETWORK.contains(&t) || NETWORK.contains(&(t & 0xFFFF_FFFF))
}
