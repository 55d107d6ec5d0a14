//! The agent's state in SQL: connection, migrations and row types.
//!
//! Queries use `$N` placeholders and portable SQL through sqlx's `Any` driver, so the same
//! code runs on the embedded SQLite file now and on a shared PostgreSQL later.

use std::{path::Path, str::FromStr as _, time::Duration};

use sqlx::{
    any::{install_default_drivers, AnyConnectOptions, AnyPoolOptions},
    AnyPool, Executor as _,
};

/// How long a writer waits for SQLite's lock before the statement fails, in milliseconds.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the store at {url}")]
    Open { url: String, source: sqlx::Error },
    #[error("failed to migrate the store schema")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store query failed")]
    Query(#[from] sqlx::Error),
}

/// The connection pool of the store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path` and brings its schema up to date.
    ///
    /// The file is in WAL mode with full synchronisation, so a committed transaction survives
    /// a crash or power loss, and one that was not committed leaves no trace.
    ///
    /// # Errors
    /// Fails if the file cannot be opened or the migrations fail.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        Self::open(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Opens the store at a sqlx URL (`sqlite://...` or `postgres://...`) and migrates it.
    ///
    /// # Errors
    /// Fails if the database cannot be reached or the migrations fail.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        let failed = |source| StoreError::Open { url: url.to_owned(), source };
        let options = AnyConnectOptions::from_str(url).map_err(failed)?;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            // SQLite has one writer at a time; more connections only wait on its lock.
            .max_connections(if sqlite { 1 } else { 8 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if sqlite {
                        connection
                            .execute(
                                format!(
                                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS};"
                                )
                                .as_str(),
                            )
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(failed)?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Returns the connection pool, for queries and transactions.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Converts a count or number read as `i64` to `u32`, saturating.
pub fn to_u32(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}
