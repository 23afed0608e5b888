//! xfer-net
