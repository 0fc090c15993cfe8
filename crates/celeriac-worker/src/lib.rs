//! The celeriac worker (work in progress).
