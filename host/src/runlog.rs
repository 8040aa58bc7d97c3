//! The run directory's `log.txt`: every log event at info level and above, whatever the
//! terminal shows, appended once the engine knows the run directory (a resumed run appends
//! to the same file). The binary installs [`RunLog`] as a `tracing` writer.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

static FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Start (or continue) logging into `path`.
pub fn open(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

/// Stop logging into the file.
pub fn close() {
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// A `tracing_subscriber` writer that goes to the open run log, or nowhere.
#[derive(Clone, Copy, Default)]
pub struct RunLog;

impl Write for RunLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RunLog {
    type Writer = RunLog;

    fn make_writer(&'a self) -> Self::Writer {
        RunLog
    }
}
