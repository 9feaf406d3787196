//! The phases of one training pass, as the model graph announces them to
//! its backend (`Backend::enter`): what a backend that attributes memory or
//! time to parts of the step (the memory planner's trace) keys them by.

use std::fmt;

/// Where in the forward + backward pass the graph is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Forward { layer: usize },
    /// The final norm, the LM head and the loss, chunk by chunk.
    HeadLoss,
    FinalNormBackward,
    /// Re-running a layer's forward under gradient checkpointing.
    Recompute { layer: usize },
    Backward { layer: usize },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Forward { layer } => write!(f, "forward of layer {layer}"),
            Phase::HeadLoss => write!(f, "LM head + loss chunk"),
            Phase::FinalNormBackward => write!(f, "final-norm backward"),
            Phase::Recompute { layer } => write!(f, "recomputing layer {layer}"),
            Phase::Backward { layer } => write!(f, "backward of layer {layer}"),
        }
    }
}
