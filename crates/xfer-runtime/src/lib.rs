//! xfer-runtime
