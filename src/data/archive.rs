//! The official CIFAR-10 archive: checksum check, extraction, and (with the `download`
//! feature) fetching it. Extraction goes to a temporary folder that is renamed into place,
//! so an interrupted run never leaves a half-unpacked data set.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::data::cifar10::{CIFAR10_FOLDER, Cifar10};
#[cfg(feature = "download")]
use crate::data::cifar10::{CIFAR10_SHA256, CIFAR10_URL};
use crate::support::files::process_is_gone;
use crate::{Error, Result};

/// Hex SHA-256 of a file, read in chunks.
///
/// # Examples
/// ```
/// let path = std::env::temp_dir().join("cf_doc_sha.txt");
/// std::fs::write(&path, b"abc")?;
/// assert_eq!(
///     candle_functional::data::sha256_file(&path)?,
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks `archive` against `expected_sha256` (when given), unpacks it into `dest` and
/// returns the `cifar-10-batches-bin` folder, after checking that its files read as CIFAR-10.
///
/// # Examples
/// ```
/// use candle_functional::data::extract_cifar10_archive;
/// let err = extract_cifar10_archive("missing.tar.gz".as_ref(), None, "out".as_ref()).unwrap_err();
/// assert!(err.to_string().contains("missing.tar.gz"));
/// ```
pub fn extract_cifar10_archive(
    archive: &Path,
    expected_sha256: Option<&str>,
    dest: &Path,
) -> Result<PathBuf> {
    if let Some(expected) = expected_sha256 {
        let actual = sha256_file(archive)?;
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(Error::Data {
                path: archive.to_path_buf(),
                record: None,
                message: format!(
                    "SHA-256 is {actual}, expected {expected}: the download is corrupt"
                ),
            });
        }
    }
    fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let prefix = format!(".{CIFAR10_FOLDER}.partial");
    remove_stale_staging(dest, &prefix);
    let staging = dest.join(format!("{prefix}{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    if let Err(message) = unpack_regular_files(archive, &staging) {
        let _ = fs::remove_dir_all(&staging);
        return Err(Error::Data {
            path: archive.to_path_buf(),
            record: None,
            message,
        });
    }
    let unpacked = staging.join(CIFAR10_FOLDER);
    if !Cifar10::is_present(&unpacked) {
        let _ = fs::remove_dir_all(&staging);
        return Err(Error::Data {
            path: archive.to_path_buf(),
            record: None,
            message: format!("the archive has no complete {CIFAR10_FOLDER}/ folder"),
        });
    }
    // Check every file before it is put in place.
    if let Err(e) = Cifar10::load(&unpacked) {
        let _ = fs::remove_dir_all(&staging);
        // The staging folder is gone: name the archive and the member at fault instead.
        return Err(match e {
            Error::Data {
                path,
                record,
                message,
            } => {
                let member = path.strip_prefix(&staging).unwrap_or(&path);
                Error::Data {
                    path: archive.to_path_buf(),
                    record,
                    message: format!("member {}: {message}", member.display()),
                }
            }
            other => other,
        });
    }
    let target = dest.join(CIFAR10_FOLDER);
    let _ = fs::remove_dir_all(&target);
    fs::rename(&unpacked, &target).map_err(|e| Error::io(&target, e))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(target)
}

/// Unpacks `archive` into `staging`, refusing anything but folders and regular files: a
/// symbolic or hard link in a data set could point anywhere on the machine. Entries cannot
/// leave `staging` (`unpack_in` refuses `..` and absolute paths).
fn unpack_regular_files(archive: &Path, staging: &Path) -> std::result::Result<(), String> {
    let file = fs::File::open(archive).map_err(|e| format!("cannot open the archive: {e}"))?;
    fs::create_dir_all(staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut tarball = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = tarball
        .entries()
        .map_err(|e| format!("cannot unpack the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("cannot unpack the archive: {e}"))?;
        let name = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "<unreadable name>".into());
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(format!(
                "`{name}` is not a regular file or folder ({kind:?}): refused"
            ));
        }
        let inside = entry
            .unpack_in(staging)
            .map_err(|e| format!("cannot unpack `{name}`: {e}"))?;
        if !inside {
            return Err(format!(
                "`{name}` points outside the archive's folder: refused"
            ));
        }
    }
    Ok(())
}

/// Removes staging folders (`<prefix><pid>`) left in `dest` by extractions that were killed.
fn remove_stale_staging(dest: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dest) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok())
            && process_is_gone(pid)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Downloads the official archive into `dest` (unless a verified copy is there), checks its
/// SHA-256, unpacks it, and returns the data folder.
#[cfg(feature = "download")]
pub fn download_cifar10(dest: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let archive = dest.join("cifar-10-binary.tar.gz");
    let verified = archive.is_file() && sha256_file(&archive)? == CIFAR10_SHA256;
    if !verified {
        let partial = dest.join("cifar-10-binary.tar.gz.partial");
        let response = ureq::get(CIFAR10_URL)
            .call()
            .map_err(|e| Error::InvalidArgument(format!("downloading {CIFAR10_URL}: {e}")))?;
        let mut reader = response.into_body().into_reader();
        let mut file = fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        std::io::copy(&mut reader, &mut file).map_err(|e| Error::io(&partial, e))?;
        fs::rename(&partial, &archive).map_err(|e| Error::io(&archive, e))?;
    }
    extract_cifar10_archive(&archive, Some(CIFAR10_SHA256), dest)
}
