//! The query pool.
