//! Broker behaviour beyond the conformance suite.
