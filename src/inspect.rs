//! `mergestream inspect`: list a checkpoint's tensors and validate it.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::Result;
use crate::model::Model;
use crate::units::human;

/// Open and validate a checkpoint (folder or file) and describe it: one line per tensor
/// (name, dtype, shape, bytes, file), then totals.
pub fn inspect(path: &Path) -> Result<String> {
    let model = Model::open_reference(path)?;
    let mut s = String::new();
    for t in model.tensors() {
        let file = Path::new(&model.files[t.file])
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<60} {:>5} {:<18} {:>12} {}",
            t.name,
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            t.len,
            file
        );
    }
    let params: u64 = model.tensors().iter().map(|t| t.numel()).sum();
    let _ = writeln!(
        s,
        "{} tensors, {} parameters, {} in {} file(s): valid",
        model.tensors().len(),
        params,
        human(model.data_bytes()),
        model.files.len()
    );
    Ok(s)
}
