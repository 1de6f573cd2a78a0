//! Kiln's log: the process's [`log::Log`], writing one line per message to stderr or, once
//! `--log-path` or `PUT /logger` names one, to a file or named pipe.
//!
//! A line is `kiln: <message>`; with Firecracker's `show_level` and/or `show_log_origin` options a
//! tag follows the prefix: `kiln: [WARN:vmm/src/machine.rs:329] <message>`. Levels are the `log`
//! crate's, filtered at `Info` by default; `module` keeps only messages whose module path starts
//! with it (`vmm::machine`, `devices::virtio::net`, `api::http`; `kiln` is the binary's own).
//! The guest's console never comes here: it has its own sink (`--console`, `PUT /serial`).
//!
//! Invariants:
//! - a configuration is applied whole or not at all: the new output is opened before anything
//!   changes, so a refused `PUT /logger` leaves the log as it was;
//! - a line is handed to the kernel in one `write`, so lines of different threads never interleave;
//! - logging never fails its caller and never blocks on a pipe nobody reads (the output is
//!   `O_NONBLOCK`): a line that cannot be written is dropped and counted in the metrics'
//!   `logger.missed_log_count`.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};

use api::models::{LogLevel, Logger as LoggerConfig};
use log::{LevelFilter, Log, Metadata, Record};

use crate::metrics::METRICS;
use crate::output_file::{open_output, OutputError};

/// The level before anything configures one, and whenever a configuration leaves it out
/// (Firecracker's default; every message Kiln printed before it had levels is `Info` or above).
pub const DEFAULT_LEVEL: LevelFilter = LevelFilter::Info;

/// The process's logger, installed by [`install`].
pub static LOGGER: Logger = Logger::new();

/// Errors in installing or configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// `log_path` could not be opened.
    #[error("log_path {0}")]
    Output(#[from] OutputError),
    /// Another logger was installed first.
    #[error("installing the logger: another logger is already installed")]
    Install,
}

/// The `log` crate's filter for an API level.
pub fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::Off,
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    }
}

/// What the logger does with a message.
struct Settings {
    level: LevelFilter,
    show_level: bool,
    show_log_origin: bool,
    module: Option<String>,
    /// The log file; `None` is stderr.
    output: Option<File>,
}

/// A logger; the process has one, [`LOGGER`].
pub struct Logger {
    settings: Mutex<Settings>,
}

impl Logger {
    /// A logger writing every `Info`-or-above message to stderr without a tag.
    pub const fn new() -> Self {
        Self {
            settings: Mutex::new(Settings {
                level: DEFAULT_LEVEL,
                show_level: false,
                show_log_origin: false,
                module: None,
                output: None,
            }),
        }
    }

    fn settings(&self) -> MutexGuard<'_, Settings> {
        // A thread that panicked while logging left whole settings behind: keep logging.
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `config` with Firecracker's `PUT /logger` semantics: the level is the given one or
    /// [`DEFAULT_LEVEL`] when absent; every other field changes only when given. Returns the new
    /// level. On error nothing changes.
    pub fn configure(&self, config: &LoggerConfig) -> Result<LevelFilter, LoggerError> {
        let output = config.log_path.as_deref().map(open_output).transpose()?;
        let mut settings = self.settings();
        settings.level = config.level.map_or(DEFAULT_LEVEL, level_filter);
        if let Some(output) = output {
            settings.output = Some(output);
        }
        if let Some(show_level) = config.show_level {
            settings.show_level = show_level;
        }
        if let Some(show_log_origin) = config.show_log_origin {
            settings.show_log_origin = show_log_origin;
        }
        if let Some(module) = &config.module {
            settings.module = Some(module.clone());
        }
        Ok(settings.level)
    }
}

impl Default for Logger {
    fn default() -> Self {
        Self::new()
    }
}

/// The line for `record`, newline included.
fn format_line(settings: &Settings, record: &Record<'_>) -> String {
    let mut tag = Vec::new();
    if settings.show_level {
        tag.push(record.level().to_string());
    }
    if settings.show_log_origin {
        let line = record
            .line()
            .map_or_else(|| "?".to_string(), |l| l.to_string());
        tag.push(format!("{}:{line}", record.file().unwrap_or("?")));
    }
    if tag.is_empty() {
        format!("kiln: {}\n", record.args())
    } else {
        format!("kiln: [{}] {}\n", tag.join(":"), record.args())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.settings().level
    }

    fn log(&self, record: &Record<'_>) {
        let mut settings = self.settings();
        if record.level() > settings.level {
            return;
        }
        if let Some(module) = &settings.module {
            if !record.module_path().is_some_and(|m| m.starts_with(module)) {
                return;
            }
        }
        let line = format_line(&settings, record);
        let written = match &mut settings.output {
            Some(file) => file.write_all(line.as_bytes()),
            None => io::stderr().lock().write_all(line.as_bytes()),
        };
        if written.is_err() {
            METRICS.logger.missed_log_count.inc();
        }
    }

    fn flush(&self) {}
}

/// Installs [`LOGGER`] as the process's logger, at [`DEFAULT_LEVEL`]. Call once, before anything
/// logs: messages logged earlier are lost.
pub fn install() -> Result<(), LoggerError> {
    log::set_logger(&LOGGER).map_err(|_| LoggerError::Install)?;
    log::set_max_level(DEFAULT_LEVEL);
    Ok(())
}

/// Applies `config` to the process's logger (see [`Logger::configure`]).
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let level = LOGGER.configure(config)?;
    // The log macros check this before calling the logger at all.
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-logger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn log_to(logger: &Logger, level: Level, module: &str, message: &str) {
        logger.log(
            &Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .module_path(Some(module))
                .file(Some("vmm/src/machine.rs"))
                .line(Some(42))
                .build(),
        );
    }

    fn to_file(logger: &Logger, path: &Path, extra: LoggerConfig) -> LevelFilter {
        logger
            .configure(&LoggerConfig {
                log_path: Some(path.to_path_buf()),
                ..extra
            })
            .unwrap()
    }

    #[test]
    fn default_lines_are_kiln_colon_message() {
        let settings = Settings {
            level: DEFAULT_LEVEL,
            show_level: false,
            show_log_origin: false,
            module: None,
            output: None,
        };
        let record = Record::builder()
            .args(format_args!("api: GET / -> 200 in 12 us"))
            .level(Level::Info)
            .file(Some("api/src/http/server.rs"))
            .line(Some(69))
            .build();
        assert_eq!(
            format_line(&settings, &record),
            "kiln: api: GET / -> 200 in 12 us\n"
        );
    }

    #[test]
    fn file_output_with_level_origin_and_filters() {
        let dir = scratch("file");
        let path = dir.join("kiln.log");
        let logger = Logger::new();
        let level = to_file(
            &logger,
            &path,
            LoggerConfig {
                level: Some(LogLevel::Warning),
                show_level: Some(true),
                ..LoggerConfig::default()
            },
        );
        assert_eq!(level, LevelFilter::Warn);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        log_to(
            &logger,
            Level::Info,
            "vmm::machine",
            "dropped: below the level",
        );
        log_to(&logger, Level::Warn, "vmm::machine", "kept");
        logger
            .configure(&LoggerConfig {
                level: Some(LogLevel::Debug),
                show_log_origin: Some(true),
                module: Some("devices".into()),
                ..LoggerConfig::default()
            })
            .unwrap();
        log_to(
            &logger,
            Level::Debug,
            "vmm::machine",
            "dropped: other module",
        );
        log_to(&logger, Level::Debug, "devices::virtio::net", "debug kept");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "kiln: [WARN] kept\nkiln: [DEBUG:vmm/src/machine.rs:42] debug kept\n"
        );
        // A level left out goes back to Info, as in Firecracker; appending keeps earlier lines.
        let level = to_file(&logger, &path, LoggerConfig::default());
        assert_eq!(level, LevelFilter::Info);
        log_to(&logger, Level::Debug, "devices::x", "dropped again");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    #[test]
    fn a_symlink_is_refused_and_changes_nothing() {
        let dir = scratch("symlink");
        let target = dir.join("target.log");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let logger = Logger::new();
        let err = logger
            .configure(&LoggerConfig {
                log_path: Some(link.clone()),
                level: Some(LogLevel::Trace),
                ..LoggerConfig::default()
            })
            .unwrap_err();
        assert!(
            matches!(&err, LoggerError::Output(OutputError::Symlink(p)) if *p == link),
            "{err}"
        );
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!target.exists(), "nothing created through the link");
        assert_eq!(logger.settings().level, DEFAULT_LEVEL);
        assert!(logger.settings().output.is_none());
        let missing = dir.join("no/such/dir.log");
        assert!(matches!(
            open_output(&missing),
            Err(OutputError::Open { .. })
        ));
    }

    #[test]
    fn a_named_pipe_without_a_reader_is_accepted() {
        let dir = scratch("fifo");
        let fifo = dir.join("log.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let logger = Logger::new();
        to_file(&logger, &fifo, LoggerConfig::default());
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        log_to(&logger, Level::Error, "kiln", "into the pipe");
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut buf = [0u8; 64];
        let n = io::Read::read(&mut reader, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"kiln: into the pipe\n");
    }

    #[test]
    fn api_levels_map_to_log_filters() {
        assert_eq!(level_filter(LogLevel::Warning), LevelFilter::Warn);
        assert_eq!(level_filter(LogLevel::Off), LevelFilter::Off);
        assert_eq!(level_filter(LogLevel::Trace), LevelFilter::Trace);
    }
}
