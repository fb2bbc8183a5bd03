//! The memory store (stub, being written).
use super::*;
/// Keeps the newest messages in memory.
pub struct MemoryStore;
impl MemoryStore {
    /// A store that keeps at most `max_rows` messages.
    pub fn new(_max_rows: usize) -> Self {
        MemoryStore
    }
}
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn migrate(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn writer(&self) -> Result<Box<dyn StoreWriter>, StoreError> {
        Err(StoreError::Unavailable("todo".into()))
    }
    fn reader(&self) -> Result<Box<dyn StoreReader>, StoreError> {
        Err(StoreError::Unavailable("todo".into()))
    }
}
