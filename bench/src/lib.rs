//! Load generator for turnd benchmarks.
