//! The embedded SQLite broker and result backend for celeriac (work in progress).
