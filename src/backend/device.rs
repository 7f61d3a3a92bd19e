//! Choosing the compute device from a `--device` string: the CPU reference
//! or a GPU backend, so it lives beside both rather than under `gpu`.

use super::cpu::CpuBackend;
use super::gpu::cuda::CudaDriver;
use super::gpu::emu::EmuDriver;
use super::gpu::GpuBackend;
use super::Precision;
use crate::error::{Error, Result};

/// A backend chosen at run time. Use [`crate::with_device!`] to run generic
/// code on whichever it is.
pub enum Device {
    /// The CPU reference.
    Cpu(CpuBackend),
    /// A CUDA GPU.
    Cuda(GpuBackend<CudaDriver>),
    /// The CUDA kernels emulated on the CPU (slow; for tests and debugging).
    Emu(GpuBackend<EmuDriver>),
}

impl Device {
    /// Makes the device's convolutions multiply in `p` (`--precision`). The
    /// CPU reference computes in f32 only: any other mode is refused there,
    /// never emulated silently in f32.
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        match self {
            Device::Cpu(_) if p != Precision::Fp32 => Err(Error::arg(
                "--precision",
                format!(
                    "`{p}` runs on tensor cores: use --device cuda[:N] (or emu, which emulates \
                     them); the CPU backend computes in fp32 only"
                ),
            )),
            Device::Cpu(_) => Ok(()),
            Device::Cuda(g) => {
                g.set_precision(p);
                Ok(())
            }
            Device::Emu(g) => {
                g.set_precision(p);
                Ok(())
            }
        }
    }

    /// Lets the CPU's eval-mode forward convolutions take Winograd
    /// (`--cpu-forward`; see [`CpuBackend::with_winograd_forward`]). The
    /// GPU backends have direct kernels only and are left as they are.
    pub fn set_cpu_winograd_forward(&mut self, on: bool) {
        if let Device::Cpu(cpu) = self {
            *cpu = cpu.with_winograd_forward(on);
        }
    }
}

/// Runs `$body` with `$be` bound to the backend inside a [`Device`].
#[macro_export]
macro_rules! with_device {
    ($dev:expr, |$be:ident| $body:expr) => {
        match $dev {
            $crate::backend::Device::Cpu($be) => $body,
            $crate::backend::Device::Cuda($be) => $body,
            $crate::backend::Device::Emu($be) => $body,
        }
    };
}

/// Parses a device string: `auto`, `cpu`, `cuda`, `cuda:N` or `emu`.
/// `auto` takes CUDA device 0 when a usable one exists and the CPU
/// otherwise; then the second value says why CUDA was not used (for the
/// caller to print once). An explicit `cuda[:N]` that cannot be opened is an
/// error naming what is missing.
pub fn select_device(spec: &str) -> Result<(Device, Option<String>)> {
    match spec {
        "cpu" => Ok((Device::Cpu(CpuBackend::REFERENCE), None)),
        "emu" => Ok((Device::Emu(GpuBackend::new(EmuDriver::new())), None)),
        "auto" => match CudaDriver::new(0) {
            Ok(d) => Ok((Device::Cuda(GpuBackend::new(d)), None)),
            Err(e) => Ok((
                Device::Cpu(CpuBackend::REFERENCE),
                Some(format!("no usable CUDA device ({e}); running on the CPU")),
            )),
        },
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::arg(
                        "--device",
                        format!("`{s}`: expected cuda:N with N a device number"),
                    )
                })?,
            };
            let d = CudaDriver::new(ordinal)
                .map_err(|e| Error::arg("--device", format!("`{s}`: {e}")))?;
            Ok((Device::Cuda(GpuBackend::new(d)), None))
        }
        other => Err(Error::arg(
            "--device",
            format!("unknown device `{other}` (auto, cpu, cuda[:N], emu)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    #[test]
    fn the_cpu_winograd_forward_is_off_by_default_and_part_of_the_numerics() {
        let (mut dev, _) = select_device("cpu").unwrap();
        let numerics = |d: &Device| crate::with_device!(d, |be| be.numerics());
        assert_eq!(numerics(&dev), "cpu fp32");
        dev.set_cpu_winograd_forward(true);
        assert_eq!(numerics(&dev), "cpu fp32 winograd-forward");
        dev.set_cpu_winograd_forward(false);
        assert_eq!(numerics(&dev), "cpu fp32");
    }
}
