//! Safe API for ublk.
