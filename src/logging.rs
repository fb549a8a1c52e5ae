//! One logging setup for every binary: `tracing` events and spans, filtered by `RUST_LOG`
//! (default `info`), written to stderr as text or, on the host, as JSON lines; the guest agent
//! can also copy them to a file.
//!
//! What is logged: one line per lifecycle event (server start, session opened or resumed, lease
//! released or expired, attachment state changes, a limit hit, a stalled connection cut off),
//! never one per byte. Guest requests run inside a `request` span (at debug level) so that
//! `RUST_LOG=volumefs=debug` shows each one with its sandbox and session.

use std::io::IsTerminal;
use std::path::Path;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// One JSON object per line (host only).
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Installs the global subscriber. `file`, if given, receives the same lines as text.
pub fn init(format: Format, file: Option<&Path>) -> Result<(), String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = match format {
        Format::Text => fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).with_filter(filter()).boxed(),
        #[cfg(feature = "host")]
        Format::Json => fmt::layer().json().with_writer(std::io::stderr).with_filter(filter()).boxed(),
        #[cfg(not(feature = "host"))]
        Format::Json => return Err("JSON logs are a host feature".into()),
    };
    let file = match file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("cannot open log file {}: {e}", p.display()))?;
            Some(fmt::layer().with_ansi(false).with_writer(std::sync::Mutex::new(f)).with_filter(filter()).boxed())
        }
        None => None,
    };
    tracing_subscriber::registry().with(stderr).with(file).try_init().map_err(|e| format!("cannot set up logging: {e}"))
}
