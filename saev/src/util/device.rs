//! Where computations run: `--device cpu | cuda[:N] | auto` (and `SAEV_DEVICE`) parsed into a
//! candle [`Device`], with errors that say what to do when this build or this machine has no
//! GPU.
//!
//! `auto` takes the first CUDA GPU when saev was built with the `cuda` feature and a GPU answers,
//! else the CPU (saying why on stderr). Without a flag, `SAEV_DEVICE` decides; without either,
//! `auto`.
//!
//! ```
//! let dev = saev::device::parse_device("cpu")?;
//! assert!(dev.is_cpu());
//! assert_eq!(saev::device::device_name(&dev), "cpu");
//! assert!(saev::device::parse_device("gpu").is_err());
//! # Ok::<(), saev::Error>(())
//! ```

use candle_core::Device;

use crate::error::{Error, Result};

/// The environment variable read when no `--device` is given.
pub const DEVICE_ENV: &str = "SAEV_DEVICE";

/// Parse `cpu`, `cuda`, `cuda:N` or `auto` into a device (opening the GPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto()),
        // Without the `cuda` feature, cuda(0) says so (and how to build with it).
        "cuda" | "gpu" => cuda(0),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(Error::out_of_range(
                "device",
                format!("{spec:?}"),
                "cpu, cuda, cuda:N (N = the GPU's ordinal) or auto",
            )),
        },
    }
}

/// `flag` if given, else `$SAEV_DEVICE`, else `auto`.
pub fn device_from_env(flag: Option<&str>) -> Result<Device> {
    match flag {
        Some(f) => parse_device(f),
        None => match std::env::var(DEVICE_ENV) {
            Ok(v) if !v.trim().is_empty() => parse_device(&v),
            _ => Ok(auto()),
        },
    }
}

/// `""` on the CPU, `", on cuda:N"` elsewhere: the end of a handle's one-line `Debug`, so a
/// handle on a GPU says so and one on the CPU reads as before.
pub(crate) fn on_device(device: &Device) -> String {
    if device.is_cpu() {
        String::new()
    } else {
        format!(", on {}", device_name(device))
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn auto() -> Device {
    if !cfg!(feature = "cuda") {
        return Device::Cpu;
    }
    match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("saev: device auto: no usable CUDA GPU ({e}); running on the CPU");
            Device::Cpu
        }
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Setup {
            problem: format!("device cuda:{ordinal}: this saev was built without GPU support"),
            fix: "build it with the CUDA feature (`cargo install --path saev --features cuda`, \
                  see the README's GPU section), or use --device cpu"
                .into(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Setup {
        problem: format!("device cuda:{ordinal} cannot be opened: {e}"),
        fix: "check `nvidia-smi` (driver loaded, GPU ordinal present, CUDA_VISIBLE_DEVICES), \
              or use --device cpu"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_what_is_valid() {
        assert!(parse_device("CPU").is_ok_and(|d| d.is_cpu()));
        assert!(parse_device("auto").is_ok());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("cuda:N") && e.contains("\"tpu\""), "{e}");
        assert!(parse_device("cuda:x").is_err());
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(
                e.contains("without GPU support") && e.contains("--features cuda"),
                "{e}"
            );
            assert!(auto().is_cpu());
        }
    }
}
