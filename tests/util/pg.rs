//! A PostgreSQL database of its own for each test, dropped at the end.
//!
//! Tests need the PostgreSQL that `scripts/services` runs (127.0.0.1:5432, user `postgres`);
//! they fail loudly when it is not there. `CHATFLOW_TEST_PG` overrides the server URL (without
//! a database name).

use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The server URL, without a database.
pub fn server_url() -> String {
    std::env::var("CHATFLOW_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh, empty database; dropped (with its connections) when this is dropped.
pub struct TestDb {
    /// `postgres://.../NAME`, for `--store`.
    pub url: String,
    /// The database name.
    pub name: String,
}

impl TestDb {
    /// Creates `cf_<pid>_<n>_<tag>`. Panics with the reason when PostgreSQL is not reachable.
    pub fn new(tag: &str) -> TestDb {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect::<String>()
            .to_lowercase();
        let name = format!("cf_{}_{n}_{tag}", std::process::id());
        let mut admin = admin_client();
        // Two statements, two round trips: DROP/CREATE DATABASE cannot run in the implicit
        // transaction of a multi-statement query.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("cannot create test database {name}: {e:?}"));
        }
        TestDb {
            url: format!("{}/{name}", server_url()),
            name,
        }
    }

    /// A plain client on this database.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e:?}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) =
            postgres::Client::connect(&format!("{}/postgres", server_url()), postgres::NoTls)
        {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn admin_client() -> postgres::Client {
    let url = format!("{}/postgres", server_url());
    postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is needed at {url} (run scripts/services, or set CHATFLOW_TEST_PG): {e:?}"
        )
    })
}
