//! The three stores a test can run on, and a macro that runs a check on each.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::pg::TestDb;

/// The store of one test: memory, a SQLite file of its own, or a PostgreSQL database of its
/// own. The file is removed and the database dropped when the test ends.
pub struct Backend {
    /// The `--store` value.
    pub spec: String,
    /// `memory`, `sqlite` or `postgres`.
    pub kind: &'static str,
    _file: Option<SqliteFile>,
    _db: Option<TestDb>,
}

impl Backend {
    /// The memory store.
    pub fn memory() -> Backend {
        Backend {
            spec: "memory".into(),
            kind: "memory",
            _file: None,
            _db: None,
        }
    }

    /// A SQLite file of its own.
    pub fn sqlite(tag: &str) -> Backend {
        let file = SqliteFile::new(tag);
        Backend {
            spec: format!("sqlite:{}", file.path.display()),
            kind: "sqlite",
            _file: Some(file),
            _db: None,
        }
    }

    /// A PostgreSQL database of its own (fails loudly without PostgreSQL).
    pub fn postgres(tag: &str) -> Backend {
        let db = TestDb::new(tag);
        Backend {
            spec: db.url.clone(),
            kind: "postgres",
            _file: None,
            _db: Some(db),
        }
    }
}

/// A SQLite path of its own in the temp directory; the database and its WAL, shared-memory
/// and journal files are removed at the end.
pub struct SqliteFile {
    /// The database file.
    pub path: PathBuf,
}

impl SqliteFile {
    /// A path no other test uses, empty.
    pub fn new(tag: &str) -> SqliteFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("chatflow-test-{}-{n}-{tag}.db", std::process::id()));
        let file = SqliteFile { path };
        file.remove();
        file
    }

    fn remove(&self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// One `#[test]` per store for each named check `fn check(&Backend)`: `memory::check`,
/// `sqlite::check` and `postgres::check` (filter with `cargo test sqlite::`).
#[allow(unused_macros)]
macro_rules! on_every_store {
    ($($check:ident),+ $(,)?) => {
        mod memory {
            $(
                #[test]
                fn $check() {
                    super::$check(&$crate::util::stores::Backend::memory());
                }
            )+
        }
        mod sqlite {
            $(
                #[test]
                fn $check() {
                    super::$check(&$crate::util::stores::Backend::sqlite(stringify!($check)));
                }
            )+
        }
        mod postgres {
            $(
                #[test]
                fn $check() {
                    super::$check(&$crate::util::stores::Backend::postgres(stringify!($check)));
                }
            )+
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_every_store;
