//! xfer-agent
