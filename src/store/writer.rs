//! The writer pool.
