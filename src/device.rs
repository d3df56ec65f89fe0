//! Choosing a device from a string: `auto`, `cpu`, `cuda` or `cuda:N`.

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device request. `auto` takes the first CUDA device when this build has CUDA and
/// one is present, else the CPU; `cuda[:N]` fails with a clear error when CUDA was not
/// compiled in (`--features cuda`) or the device cannot be opened.
///
/// # Examples
/// ```
/// use candle_functional::select_device;
/// assert!(select_device("cpu")?.is_cpu());
/// assert!(select_device("tpu").is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn select_device(spec: &str) -> Result<Device> {
    match spec.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available()
                && let Ok(device) = Device::new_cuda(0)
            {
                return Ok(device);
            }
            Ok(Device::Cpu)
        }
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{other}`: use auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidArgument(format!(
            "CUDA device {ordinal} was asked for, but this build has no CUDA support: \
             rebuild with `--features cuda` (or `cudnn`), or use --device cpu"
        )));
    }
    Device::new_cuda(ordinal)
        .map_err(|e| Error::InvalidArgument(format!("cannot open CUDA device {ordinal}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_builds_refuse_cuda_clearly() {
        if candle_core::utils::cuda_is_available() {
            eprintln!("skipped: this build has CUDA, the refusal path cannot be exercised");
            return;
        }
        let err = select_device("cuda:1").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(select_device("auto").unwrap().is_cpu());
        assert!(select_device("cuda:x").is_err());
    }
}
