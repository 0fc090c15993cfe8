//! latency
