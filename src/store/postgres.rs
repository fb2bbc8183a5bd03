//! The PostgreSQL store (stub, being written).
use super::*;
/// The PostgreSQL store.
pub struct PgStore;
impl PgStore {
    /// Connects a pool of at most `pool_size` connections to `url`.
    pub fn open(_url: &str, _pool_size: u32) -> Result<Self, StoreError> {
        Ok(PgStore)
    }
}
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
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
