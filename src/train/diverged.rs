//! The error of a run whose loss turned NaN or infinite. A separate type,
//! so that `train` can look for its cause outside the loop.

/// A step whose loss came out NaN or infinite. Typed, so that the caller
/// can look for a cause outside the loop (NaN base weights) before telling
/// the user to lower the learning rate.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}
