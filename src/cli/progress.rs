//! Progress of uploads and downloads: bytes, rate and (when the size is known) ETA, drawn on
//! stderr by indicatif. Nothing is drawn when stderr is not a terminal, with `--quiet`, or for a
//! transfer that is over within [`DELAY`]: quick commands and scripts see no progress at all.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{self, IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// How long a transfer runs before its progress is shown.
pub const DELAY: Duration = Duration::from_millis(500);

pub struct Progress {
    label: String,
    len: Option<u64>,
    pos: u64,
    start: Instant,
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A transfer of `len` bytes (unknown: `None`) named `label` (a path, say).
    pub fn new(label: &str, len: Option<u64>, quiet: bool) -> Progress {
        let enabled = !quiet && io::stderr().is_terminal();
        Progress { label: label.to_string(), len, pos: 0, start: Instant::now(), enabled, bar: None }
    }

    /// A progress that never draws.
    pub fn hidden() -> Progress {
        Progress::new("", None, true)
    }

    pub fn add(&mut self, n: u64) {
        self.pos += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.pos);
        } else if self.enabled && self.start.elapsed() >= DELAY {
            self.bar = Some(self.draw());
        }
    }

    fn draw(&self) -> ProgressBar {
        let template = match self.len {
            Some(_) => "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            None => "{prefix} {spinner} {binary_bytes} {binary_bytes_per_sec}",
        };
        let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(self.len, ProgressDrawTarget::stderr())
            .with_style(style)
            .with_prefix(self.label.clone())
            .with_elapsed(self.start.elapsed())
            .with_position(self.pos);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// Removes the bar (before a result or an error is printed).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A `Read` that counts what passes through it. With an expected length, it stops there and a
/// source that ends early is an error (an upload with `Content-Length` must send exactly that).
///
/// A read error is also kept in `failed`: the HTTP client turns it into a broken request, and
/// the caller reports the cause instead.
pub struct ReadProgress<R> {
    inner: R,
    pub progress: Progress,
    expect: Option<u64>,
    pub failed: Option<String>,
}

impl<R: Read> ReadProgress<R> {
    pub fn new(inner: R, progress: Progress, expect: Option<u64>) -> ReadProgress<R> {
        ReadProgress { inner, progress, expect, failed: None }
    }
}

impl<R: Read> Read for ReadProgress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = match self.expect {
            Some(len) => buf.len().min(len.saturating_sub(self.progress.pos) as usize),
            None => buf.len(),
        };
        if want == 0 && !buf.is_empty() {
            return Ok(0);
        }
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        if n == 0 && self.expect.is_some() {
            let m = format!("it shrank while it was sent ({} of {} bytes)", self.progress.pos, self.expect.unwrap_or(0));
            self.failed = Some(m.clone());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, m));
        }
        self.progress.add(n as u64);
        Ok(n)
    }
}

/// A `Write` that counts what passes through it.
pub struct WriteProgress<W> {
    pub inner: W,
    pub progress: Progress,
}

impl<W: Write> Write for WriteProgress<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_reads_stop_at_the_expected_length_and_fail_short() {
        let mut r = ReadProgress::new(&b"0123456789"[..], Progress::hidden(), Some(4));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"0123");
        let mut r = ReadProgress::new(&b"01"[..], Progress::hidden(), Some(4));
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("2 of 4 bytes"), "{e}");
        let mut r = ReadProgress::new(&b"0123456789"[..], Progress::hidden(), None);
        assert_eq!(r.read_to_end(&mut Vec::new()).unwrap(), 10);
        assert_eq!(r.progress.pos, 10);
    }

    #[test]
    fn quiet_progress_never_draws() {
        let mut p = Progress::new("x", Some(10), true);
        p.start -= DELAY * 2;
        p.add(5);
        assert!(p.bar.is_none());
    }
}
