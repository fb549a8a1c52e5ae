//! [`MetaStore`] on PostgreSQL: the metadata of servers that share one store.
//!
//! The primitives are the same SQL as SQLite's ([`super::sql`]); what differs is here: the
//! schema's types, the connection, and transactions. Every transaction is SERIALIZABLE, so a
//! body sees the store as if it ran alone, as it does on SQLite; one that loses a race with
//! another server's (SQLSTATE 40001, or a deadlock) is rolled back and run again. The engine's
//! transaction bodies are `FnMut` and do nothing outside the store that a second run would do
//! differently, which is what makes the retry safe.
//!
//! Commits are asynchronous (`synchronous_commit = off`): a commit does not wait for the WAL to
//! reach disk, as SQLite's WAL commits do not. [`MetaStore::sync`] (a guest's fsync) commits one
//! synchronous transaction, which flushes the WAL through every commit before it, so fsync keeps
//! its promise at the cost of one flush, not one per metadata change.
//!
//! The URL is libpq's (`postgres://user@host:port/db?...`) plus `schema=NAME`: the tables live
//! in that schema (created if missing) instead of `public`, so that one database can hold several
//! independent stores (tests, staging).

use super::meta::*;
use super::sql::{SqlConn, SqlRow, SqlTxn, Val};
use crate::fs::{FsError, FsResult};
use bytes::BytesMut;
use postgres::error::SqlState;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, IsolationLevel, NoTls, Row, Statement, Transaction};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

/// What PostgreSQL adds to the shared schema: an index for listings (SQLite walks its
/// rowid order instead).
const PG_EXTRA: &str = "CREATE INDEX IF NOT EXISTS dentries_list ON dentries (vol, parent, id);";

/// The advisory lock that serialises schema setup between servers starting at once
/// (`CREATE ... IF NOT EXISTS` is not safe against a concurrent create of the same name).
const SCHEMA_LOCK: i64 = 0x766f_6c75_6d65_6673; // "volumefs"

/// How many times a transaction that lost a serialization race is run again before the
/// operation fails with EIO (each attempt waits a little longer).
const RETRIES: u32 = 30;

fn pg_err(e: postgres::Error) -> FsError {
    FsError::new(libc::EIO, format!("metadata store (PostgreSQL): {e}"))
}

/// Whether `e` means "run the transaction again": a serialization failure or a deadlock, both of
/// which PostgreSQL resolves by aborting one side.
fn retryable(e: &postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// Splits `schema=NAME` off a connection URL; the rest is libpq's syntax.
fn split_schema(url: &str) -> FsResult<(String, Option<String>)> {
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_string(), None)) };
    let mut schema = None;
    let mut rest = Vec::new();
    for kv in query.split('&') {
        match kv.strip_prefix("schema=") {
            Some(name) => schema = Some(name.to_string()),
            None => rest.push(kv),
        }
    }
    if let Some(s) = &schema {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(FsError::new(
                libc::EINVAL,
                format!("invalid schema {s:?} in the metadata URL: use 1-63 of [a-z0-9_], not starting with a digit"),
            ));
        }
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    Ok((url, schema))
}

pub struct PgMeta {
    conn: Mutex<Option<PgConn>>,
    config: postgres::Config,
    schema: Option<String>,
    /// The channel this store's servers announce their changes on: one per schema, since the
    /// stores of one database must not hear each other.
    channel: String,
}

struct PgConn {
    client: Client,
    /// Statements prepared on this connection, by their SQLite spelling.
    stmts: HashMap<&'static str, Statement>,
}

impl PgMeta {
    pub fn open(url: &str) -> FsResult<PgMeta> {
        let (url, schema) = split_schema(url)?;
        let config = postgres::Config::from_str(&url).map_err(|e| {
            FsError::new(libc::EINVAL, format!("invalid PostgreSQL URL: {e} (expected postgres://user@host:port/database)"))
        })?;
        let mut channel = format!("volumefs_changes_{}", schema.as_deref().unwrap_or("public"));
        channel.truncate(63); // PostgreSQL's longest identifier
        let meta = PgMeta { conn: Mutex::new(None), config, schema, channel };
        let conn = meta.connect()?;
        *meta.conn.lock().unwrap() = Some(conn);
        Ok(meta)
    }

    fn connect(&self) -> FsResult<PgConn> {
        let mut client =
            self.config.connect(NoTls).map_err(|e| FsError::new(libc::EIO, format!("cannot reach the metadata store: {e}")))?;
        let mut setup = format!("SET synchronous_commit = off; SELECT pg_advisory_lock({SCHEMA_LOCK});");
        if let Some(s) = &self.schema {
            setup += &format!("CREATE SCHEMA IF NOT EXISTS {s}; SET search_path TO {s};");
        }
        setup += &super::sql::schema("BIGINT", "BYTEA", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "");
        setup += PG_EXTRA;
        setup += &format!("SELECT pg_advisory_unlock({SCHEMA_LOCK});");
        client.batch_execute(&setup).map_err(pg_err)?;
        Ok(PgConn { client, stmts: HashMap::new() })
    }
}

impl MetaStore for PgMeta {
    fn transact(&self, f: &mut dyn FnMut(&mut dyn MetaTxn) -> FsResult<()>) -> FsResult<()> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = 0;
        loop {
            // A connection that broke (the store restarted) is replaced before the next
            // transaction; the one that saw it break failed with EIO.
            if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
                *guard = Some(self.connect()?);
            }
            let PgConn { client, stmts } = guard.as_mut().expect("connected above");
            let mut tx = client.build_transaction().isolation_level(IsolationLevel::Serializable).start().map_err(pg_err)?;
            let mut conn = PgTx { tx: &mut tx, channel: &self.channel, stmts, retry: false };
            let out = f(&mut SqlTxn(&mut conn));
            let mut retry = conn.retry;
            let out = out.and_then(|()| {
                tx.commit().map_err(|e| {
                    retry = retryable(&e);
                    pg_err(e)
                })
            });
            match out {
                Err(_) if retry && attempt < RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_micros(200 << attempt.min(10)));
                }
                out => return out,
            }
        }
    }

    fn side(&self) -> FsResult<Option<Box<dyn MetaStore>>> {
        let side =
            PgMeta { conn: Mutex::new(None), config: self.config.clone(), schema: self.schema.clone(), channel: self.channel.clone() };
        *side.conn.lock().unwrap() = Some(side.connect()?);
        Ok(Some(Box::new(side)))
    }

    fn listen(&self) -> FsResult<Option<Box<dyn Listener>>> {
        let mut client =
            self.config.connect(NoTls).map_err(|e| FsError::new(libc::EIO, format!("cannot reach the metadata store: {e}")))?;
        client.batch_execute(&format!("LISTEN {}", self.channel)).map_err(pg_err)?;
        Ok(Some(Box::new(PgListener { client })))
    }

    fn sync(&self) -> FsResult<()> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(self.connect()?);
        }
        let c = guard.as_mut().expect("connected above");
        // A transaction with an id commits with a WAL record; committing it synchronously
        // flushes the WAL through it, and so through every earlier (asynchronous) commit.
        c.client.batch_execute("BEGIN; SET LOCAL synchronous_commit = on; SELECT txid_current(); COMMIT;").map_err(pg_err)
    }
}

/// A connection that only listens (LISTEN holds for the connection's life).
struct PgListener {
    client: Client,
}

impl Listener for PgListener {
    fn wait(&mut self, timeout: Duration) -> FsResult<Vec<String>> {
        use postgres::fallible_iterator::FallibleIterator;
        let mut out = Vec::new();
        let first = self.client.notifications().timeout_iter(timeout).next().map_err(pg_err)?;
        if let Some(m) = first {
            out.push(m.payload().to_string());
            // And whatever else has come, without waiting.
            let mut n = self.client.notifications();
            let mut more = n.iter();
            while let Some(m) = more.next().map_err(pg_err)? {
                out.push(m.payload().to_string());
            }
        }
        if self.client.is_closed() {
            return Err(FsError::new(libc::EIO, "the metadata store's listening connection closed"));
        }
        Ok(out)
    }
}

struct PgTx<'a, 'b> {
    tx: &'a mut Transaction<'b>,
    /// Where announcements go ([`PgMeta::channel`]).
    channel: &'a str,
    stmts: &'a mut HashMap<&'static str, Statement>,
    /// Set when a statement failed in a way that running the transaction again can cure.
    retry: bool,
}

/// `?N` (SQLite) to `$N` (PostgreSQL); the shared statements have no other `?`.
fn dollar(sql: &str) -> String {
    sql.replace('?', "$")
}

impl PgTx<'_, '_> {
    fn statement(&mut self, sql: &'static str) -> FsResult<Statement> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let st = self.tx.prepare(&dollar(sql)).map_err(|e| self.fail(e))?;
        self.stmts.insert(sql, st.clone());
        Ok(st)
    }

    fn fail(&mut self, e: postgres::Error) -> FsError {
        self.retry |= retryable(&e);
        pg_err(e)
    }
}

impl ToSql for Val<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Val::Null => Ok(IsNull::Yes),
            // Parameters compared with BIGINT columns are BIGINT; LIMIT and OFFSET are too.
            Val::Int(i) if *ty == Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
            Val::Int(i) => i.to_sql(ty, out),
            Val::Bytes(b) => b.to_sql(ty, out),
            Val::Text(t) => t.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INT8 || *ty == Type::INT4 || *ty == Type::BYTEA || *ty == Type::TEXT || *ty == Type::VARCHAR
    }

    to_sql_checked!();
}

impl SqlRow for Row {
    fn opt_int(&self, i: usize) -> FsResult<Option<i64>> {
        let ty = self.columns().get(i).map(|c| c.type_().clone());
        let r = match ty {
            Some(Type::INT4) => self.try_get::<_, Option<i32>>(i).map(|v| v.map(i64::from)),
            _ => self.try_get::<_, Option<i64>>(i),
        };
        r.map_err(pg_err)
    }

    fn opt_bytes(&self, i: usize) -> FsResult<Option<Vec<u8>>> {
        self.try_get(i).map_err(pg_err)
    }

    fn text(&self, i: usize) -> FsResult<String> {
        self.try_get(i).map_err(pg_err)
    }
}

impl SqlConn for PgTx<'_, '_> {
    fn clock(&mut self) -> FsResult<Option<crate::fs::Timespec>> {
        let row =
            self.tx.query_one("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)", &[]).map_err(|e| self.fail(e))?;
        let micros: i64 = row.try_get(0).map_err(|e| self.fail(e))?;
        Ok(Some(crate::fs::Timespec::from_nanos(micros.saturating_mul(1000))))
    }

    fn announce(&mut self, message: &str) -> FsResult<()> {
        // Delivered at commit, in commit order; never if the transaction rolls back.
        let channel = self.channel;
        self.exec("SELECT pg_notify(?1, ?2)", &[Val::Text(channel), Val::Text(message)]).map(|_| ())
    }

    fn exec(&mut self, sql: &'static str, params: &[Val]) -> FsResult<u64> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        self.tx.execute(&st, &refs).map_err(|e| self.fail(e))
    }

    fn query(&mut self, sql: &'static str, params: &[Val], each: &mut dyn FnMut(&dyn SqlRow) -> FsResult<()>) -> FsResult<()> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        for row in self.tx.query(&st, &refs).map_err(|e| self.fail(e))? {
            each(&row)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_parameter_is_split_off_and_checked() {
        assert_eq!(split_schema("postgres://h/db").unwrap(), ("postgres://h/db".into(), None));
        assert_eq!(split_schema("postgres://h/db?schema=t_1").unwrap(), ("postgres://h/db".into(), Some("t_1".into())));
        assert_eq!(
            split_schema("postgres://h/db?connect_timeout=5&schema=x&application_name=v").unwrap(),
            ("postgres://h/db?connect_timeout=5&application_name=v".into(), Some("x".into()))
        );
        for bad in ["", "X", "1a", "a;drop", "a b"] {
            assert_eq!(split_schema(&format!("postgres://h/db?schema={bad}")).unwrap_err().errno, libc::EINVAL, "{bad}");
        }
    }

    #[test]
    fn numbered_parameters_become_dollars() {
        assert_eq!(dollar("SELECT a FROM t WHERE x = ?1 AND y = ?12"), "SELECT a FROM t WHERE x = $1 AND y = $12");
    }
}
