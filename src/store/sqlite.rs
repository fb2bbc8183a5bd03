//! The SQLite store (stub, being written).
use super::*;
/// The embedded store.
pub struct SqliteStore;
impl SqliteStore {
    /// Opens (creating) the database at `path`.
    pub fn open(_path: &str) -> Result<Self, StoreError> {
        Ok(SqliteStore)
    }
}
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
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
