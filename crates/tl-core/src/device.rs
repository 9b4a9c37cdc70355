//! Where a tensor's storage lives.

use std::fmt;

/// A compute device. CUDA devices (`Cuda(ordinal)`) join when their backend
/// does; code that matches on `Device` should expect that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}
