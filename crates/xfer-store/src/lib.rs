//! xfer-store
