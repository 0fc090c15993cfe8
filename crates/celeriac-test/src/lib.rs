//! Conformance suite and fixtures for celeriac drivers (work in progress).
