//! celeriac: a distributed task queue for Rust that speaks Celery's protocol (work in progress).
