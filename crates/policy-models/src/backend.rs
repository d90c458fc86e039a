//! Which burn backend runs the tensor work. `flex` (CPU) is always built; `wgpu` and `cuda` only
//! with the cargo features of the same names.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// A burn backend, as named in study files and on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's `flex` CPU backend (the default: runs anywhere).
    #[default]
    Flex,
    /// wgpu (Vulkan, Metal, DX12); needs the `wgpu` feature.
    Wgpu,
    /// CUDA; needs the `cuda` feature, which downloads LLVM at build time.
    Cuda,
}

/// A backend that this build cannot provide.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "the `{backend}` backend is not in this build; rebuild with `--features {backend}` \
         (for example `cargo xtask` → `cargo run -p xtask --release --features {backend} --`)"
    )]
    NotBuilt { backend: BackendKind },

    #[error("unknown backend `{name}`; use one of flex, wgpu, cuda")]
    Unknown { name: String },
}

impl BackendKind {
    /// The name used in files and flags.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this build can run the backend.
    pub fn is_built(self) -> bool {
        match self {
            BackendKind::Flex => true,
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The default device of the backend (no autodiff; call `.autodiff()` on it to train).
    pub fn device(self) -> Result<Device, BackendError> {
        match self {
            BackendKind::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(Device::cuda(0)),
            #[allow(unreachable_patterns, reason = "reachable when a GPU feature is off")]
            backend => Err(BackendError::NotBuilt { backend }),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = BackendError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        [BackendKind::Flex, BackendKind::Wgpu, BackendKind::Cuda]
            .into_iter()
            .find(|backend| backend.name() == name)
            .ok_or_else(|| BackendError::Unknown { name: name.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tensor;

    #[test]
    fn flex_computes_and_differentiates() {
        let device = BackendKind::Flex.device().unwrap().autodiff();
        let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device).require_grad();
        let y = (x.clone() * x.clone()).sum();
        let gradients = y.backward();
        let grad = x.grad(&gradients).unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(grad, vec![2.0, 4.0, 6.0]);
    }

    #[test]
    fn backends_parse_and_unbuilt_ones_say_how_to_build_them() {
        assert_eq!("wgpu".parse::<BackendKind>().unwrap(), BackendKind::Wgpu);
        assert!("tpu".parse::<BackendKind>().is_err());
        if !BackendKind::Cuda.is_built() {
            let error = BackendKind::Cuda.device().unwrap_err().to_string();
            assert!(error.contains("--features cuda"), "{error}");
        }
    }
}
