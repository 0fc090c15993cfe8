//! Clear errors.
