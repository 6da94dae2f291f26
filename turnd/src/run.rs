//! Starting and stopping turnd: listeners, workers, signals.
//!
//! (Transitional: the IO layer is being split out of `driver`; this is its public door.)

pub use crate::driver::{serve, start, Running};
