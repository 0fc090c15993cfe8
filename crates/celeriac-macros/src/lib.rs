//! The `#[celeriac::task]` attribute (work in progress).
