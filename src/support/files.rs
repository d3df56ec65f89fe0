//! Files the crate writes and reads: atomic writes (a temporary file beside the target, fsync,
//! rename, fsync of the folder, so a crash never leaves a half-written file) and safetensors
//! files that carry a checksum of their metadata and tensors, verified when they are read.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The metadata key of the checksum.
const CHECKSUM_KEY: &str = "sha256";

/// Distinguishes the temporary files of concurrent saves within one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename; the
/// file and then the folder are synced, so the rename survives a power cut. Each save uses its
/// own temporary name (two threads saving to one path both succeed, the last one wins), and
/// leftovers of earlier saves to the same path by processes that no longer run are removed.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file path", path.display())))?;
    let prefix = format!(".{}.tmp", file_name.to_string_lossy());
    remove_stale_temps(path, &prefix);
    let pid = std::process::id();
    let tmp: PathBuf = path.with_file_name(format!(
        "{prefix}{pid}-{}",
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_folder(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Syncs the folder holding `path`, so that a rename into it is durable (a no-op where
/// folders cannot be opened as files).
fn sync_folder(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::File::open(folder)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Removes `<prefix><pid>-<n>` files beside `path` left by a process that is gone (killed
/// during a save). Only where that can be told (`/proc`); best effort, errors ignored.
fn remove_stale_temps(path: &Path, prefix: &str) {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return;
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if process_is_gone(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// `true` when process `pid` is not this one and is known not to run any more (only where
/// `/proc` tells; elsewhere `false`, so nothing is removed).
pub(crate) fn process_is_gone(pid: u32) -> bool {
    let proc = Path::new("/proc");
    pid != std::process::id() && proc.is_dir() && !proc.join(pid.to_string()).exists()
}

/// SHA-256 over the metadata (but the checksum itself) in key order, then every tensor in name
/// order: name, dtype, shape and data.
fn checksum<'a>(
    metadata: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, String, Vec<usize>, &'a [u8])>,
) -> String {
    let mut hash = Sha256::new();
    let mut keys: Vec<&String> = metadata.keys().filter(|k| *k != CHECKSUM_KEY).collect();
    keys.sort();
    for key in keys {
        hash.update(format!("{key}\0{}\0", metadata[key]).as_bytes());
    }
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in sorted {
        hash.update(name.as_bytes());
        hash.update(format!("\0{dtype}\0{shape:?}\0").as_bytes());
        hash.update(data);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serializes named tensors to safetensors bytes, with `metadata` and a checksum of both
/// added to it.
pub(crate) fn to_safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<Vec<u8>> {
    // Contiguous copies: safetensors writes raw buffers.
    let contiguous = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let data: Vec<std::borrow::Cow<[u8]>> = contiguous
        .iter()
        .map(|(_, v)| safetensors::View::data(v))
        .collect();
    let mut metadata = metadata.unwrap_or_default();
    let sum = checksum(
        &metadata,
        contiguous.iter().zip(&data).map(|((k, v), bytes)| {
            let dtype = format!("{:?}", safetensors::View::dtype(v));
            (k.as_str(), dtype, v.dims().to_vec(), bytes.as_ref())
        }),
    );
    metadata.insert(CHECKSUM_KEY.into(), sum);
    safetensors::serialize(
        contiguous.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
    )
    .map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Parses safetensors `bytes` read from `path`, verifies their checksum when they carry one
/// (files written before checksums existed load without), and returns the tensors on `device`
/// with the metadata.
pub(crate) fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    if let Some(expected) = metadata.get(CHECKSUM_KEY) {
        let views = file.tensors();
        let got = checksum(
            &metadata,
            views.iter().map(|(k, v)| {
                (
                    k.as_str(),
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data(),
                )
            }),
        );
        if &got != expected {
            return Err(bad(format!(
                "checksum mismatch: the file's tensors changed after it was written (sha256 {got}, recorded {expected})"
            )));
        }
    }
    let tensors =
        candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(e.to_string()))?;
    Ok((tensors, metadata))
}

/// The metadata of safetensors `bytes`, or `None` when they are not a safetensors file (no
/// checksum check: for deciding which file to keep, not for loading one).
pub(crate) fn metadata_of(bytes: &[u8]) -> Option<HashMap<String, String>> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    header.metadata().clone()
}
