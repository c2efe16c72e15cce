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

/// [`inspect`] as one JSON document: the files, one entry per tensor (name, dtype, shape,
/// bytes, file, offset) and totals.
pub fn inspect_json(path: &Path) -> Result<String> {
    use serde_json::json;
    let model = Model::open_reference(path)?;
    let files: Vec<String> = (0..model.files.len())
        .map(|i| model.file_path(i).display().to_string())
        .collect();
    let tensors: Vec<_> = model
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "dtype": t.dtype.to_string(),
                "shape": t.shape,
                "bytes": t.len,
                "file": model.files[t.file],
                "offset": t.offset,
            })
        })
        .collect();
    let params: u64 = model.tensors().iter().map(|t| t.numel()).sum();
    let doc = json!({
        "path": model.path.display().to_string(),
        "files": files,
        "tensors": tensors,
        "totals": {
            "tensors": model.tensors().len(),
            "parameters": params,
            "bytes": model.data_bytes(),
            "files": model.files.len(),
        },
        "valid": true,
    });
    Ok(serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n")
}
