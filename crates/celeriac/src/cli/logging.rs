//! The command line's log output: the level (`-l`, Celery's words or tracing directives), the
//! destination (`--logfile`) and the format (`--log-format text|json`), plus the layers a user
//! adds (an OpenTelemetry exporter, say) through [`run_with_layer`](super::run_with_layer).
//!
//! Libraries emit `tracing` events; this is the one place that installs a subscriber. The level
//! filters only the log output, never a layer the user added: `-l warning` quiets the log and
//! still exports every task span.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_subscriber::Registry;
use tracing_subscriber::filter::{LevelFilter, Targets, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// A layer the user adds to the command line's subscriber (see
/// [`run_with_layer`](super::run_with_layer)).
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync + 'static>;

/// The global logging flags of the command line.
#[derive(clap::Args, Debug, Default, Clone)]
pub(super) struct LogArgs {
    /// Log level: debug, info, warning, error, critical or fatal (any case; critical and
    /// fatal log errors), or tracing directives such as `info,celeriac_worker=debug`
    /// (default: RUST_LOG, else info).
    #[arg(long, short = 'l', global = true, value_name = "LEVEL", value_parser = parse_level)]
    pub(super) loglevel: Option<LogLevel>,
    /// Append the log to this file (created when missing) instead of standard error.
    #[arg(long, global = true, value_name = "PATH")]
    pub(super) logfile: Option<PathBuf>,
    /// Log line format: text, or json (one object a line: timestamp, level, target, message,
    /// fields and the fields of the enclosing spans, such as task_id and task_name).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(super) log_format: LogFormat,
}

impl LogArgs {
    /// These flags as arguments, for a pool child started by the worker: the child logs
    /// where, how and what its worker does.
    pub(super) fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        if let Some(l) = &self.loglevel {
            out.extend(["--loglevel".into(), l.spec.clone().into()]);
        }
        if let Some(f) = &self.logfile {
            out.extend(["--logfile".into(), f.clone().into_os_string()]);
        }
        if self.log_format == LogFormat::Json {
            out.extend(["--log-format".into(), "json".into()]);
        }
        out
    }

    /// The flags from a pool child's arguments (those [`LogArgs::to_args`] wrote); the
    /// defaults when they cannot be read.
    pub(super) fn from_child_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> LogArgs {
        #[derive(clap::Parser)]
        struct Child {
            #[command(flatten)]
            log: LogArgs,
        }
        <Child as clap::Parser>::try_parse_from(args).map_or_else(|_| LogArgs::default(), |c| c.log)
    }
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// A checked `-l` value: the directives as given, and the filter they make.
#[derive(Debug, Clone)]
pub(super) struct LogLevel {
    spec: String,
    filter: Targets,
}

/// The words `-l` accepts as a level, for error messages.
const LEVEL_WORDS: &str = "debug, info, warning, error, critical or fatal (any case)";

/// A level word as Celery spells it (or tracing does), in any case.
fn level_word(word: &str) -> Option<&'static str> {
    Some(match word.trim().to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "critical" | "fatal" => "error",
        "off" => "off",
        _ => return None,
    })
}

/// Parses `-l`: a level word, or comma-separated directives each of which is a level word or
/// `target=level`. Every word must be a level: a lone `bogus` is refused, not taken as a
/// target (which would log nothing).
pub(super) fn parse_level(s: &str) -> Result<LogLevel, String> {
    let mut normalized = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!(
                "empty directive in {s:?}; use {LEVEL_WORDS}, or directives such as \
                 info,celeriac_worker=debug"
            ));
        }
        match part.split_once('=') {
            None => match level_word(part) {
                Some(l) => normalized.push(l.to_owned()),
                None => {
                    return Err(format!(
                        "unknown log level {part:?}; use {LEVEL_WORDS}, or directives such as \
                         info,celeriac_worker=debug"
                    ));
                }
            },
            Some((target, level)) => {
                let target = target.trim();
                let valid_target = !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'));
                if !valid_target {
                    return Err(format!(
                        "invalid target {target:?} in {part:?}; a directive is target=level, \
                         e.g. celeriac_worker=debug"
                    ));
                }
                match level_word(level) {
                    Some(l) => normalized.push(format!("{target}={l}")),
                    None => {
                        return Err(format!(
                            "unknown log level {:?} in {part:?}; use {LEVEL_WORDS}",
                            level.trim()
                        ));
                    }
                }
            }
        }
    }
    let spec = normalized.join(",");
    let filter = spec
        .parse::<Targets>()
        .map_err(|e| format!("invalid log directives {s:?}: {e}"))?;
    Ok(LogLevel { spec, filter })
}

/// The filter in force: `-l`, else `RUST_LOG` (tracing's own syntax accepted too; a value
/// that cannot be read is reported and info used), else info.
// The command line is a binary's front end: reading RUST_LOG here is its job.
#[allow(clippy::disallowed_methods)]
fn filter(level: Option<&LogLevel>) -> Targets {
    if let Some(l) = level {
        return l.filter.clone();
    }
    let Ok(spec) = std::env::var("RUST_LOG") else {
        return Targets::new().with_default(tracing::Level::INFO);
    };
    match parse_level(&spec) {
        Ok(l) => l.filter,
        Err(strict) => spec.parse::<Targets>().unwrap_or_else(|_| {
            eprintln!("warning: RUST_LOG: {strict}; using info");
            Targets::new().with_default(tracing::Level::INFO)
        }),
    }
}

/// Opens `path` for appending, creating it when missing.
fn open_logfile(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))
}

/// Installs the process's subscriber: the log output (level, file, format) and the user's
/// `extra` layers. Fails only when the log file cannot be opened.
pub(super) fn init(args: &LogArgs, extra: Vec<BoxedLayer>) -> anyhow::Result<()> {
    let targets = filter(args.loglevel.as_ref());
    let spec = args.loglevel.as_ref().map(|l| l.spec.clone());
    let (writer, ansi) = match &args.logfile {
        Some(path) => (BoxMakeWriter::new(Mutex::new(open_logfile(path)?)), false),
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
    };
    // Spans at info and above pass whatever the level, so that a warning logged inside a
    // task still names it (task_id, task_name) at `-l warning`; a span alone prints nothing.
    let hint = Filter::<Registry>::max_level_hint(&targets)
        .map_or(LevelFilter::INFO, |h| h.max(LevelFilter::INFO));
    let filter = filter_fn(move |m| {
        (m.is_span() && *m.level() <= tracing::Level::INFO)
            || targets.would_enable(m.target(), m.level())
    })
    .with_max_level_hint(hint);
    let output: BoxedLayer = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_target(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => JsonLayer { writer }.with_filter(filter).boxed(),
    };
    let mut layers = vec![output];
    layers.extend(extra);
    // A subscriber set already (by a test, or by the user's own main) stays.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    if let Some(spec) = spec {
        tracing::debug!(filter = %spec, "log filter");
    }
    Ok(())
}

/// Writes each event as one JSON object on its own line.
struct JsonLayer {
    writer: BoxMakeWriter,
}

/// A span's fields, kept in its extensions as they are recorded.
#[derive(Default)]
struct SpanFields(Map<String, Value>);

/// Collects fields as JSON values.
struct Collect<'a>(&'a mut Map<String, Value>);

impl Visit for Collect<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.0.insert(field.name().to_owned(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error and its causes, as the CLI prints errors (`{:#}`).
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            let _ = write!(text, ": {s}");
            source = s.source();
        }
        self.0.insert(field.name().to_owned(), text.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%display` fields arrive here too, printed with their Display.
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields::default();
        attrs.record(&mut Collect(&mut fields.0));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(fields) = ext.get_mut::<SpanFields>() {
            values.record(&mut Collect(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Map::new();
        event.record(&mut Collect(&mut fields));
        let message = fields.remove("message").unwrap_or(Value::Null);
        // The fields of the spans around the event, outermost first, the innermost winning.
        let mut span_fields = Map::new();
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                spans.push(Value::from(span.name()));
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    span_fields.extend(f.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        let line = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": meta.level().as_str(),
            "target": meta.target(),
            "message": message,
            "fields": fields,
            "span": span_fields,
            "spans": spans,
        });
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        // One write a line, so that lines from several threads never interleave.
        let _ = self.writer.make_writer().write_all(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_level_words_in_any_case() {
        for (word, spec) in [
            ("debug", "debug"),
            ("INFO", "info"),
            ("Warning", "warn"),
            ("WARNING", "warn"),
            ("warn", "warn"),
            ("error", "error"),
            ("CRITICAL", "error"),
            ("fatal", "error"),
            ("trace", "trace"),
        ] {
            assert_eq!(parse_level(word).unwrap().spec, spec, "{word}");
        }
    }

    #[test]
    fn directives_are_normalized() {
        let l = parse_level("WARNING, celeriac_worker=Debug,my_app::tasks=critical").unwrap();
        assert_eq!(
            l.spec, "warn,celeriac_worker=debug,my_app::tasks=error",
            "{l:?}"
        );
    }

    #[test]
    fn unknown_words_are_refused_naming_the_accepted_ones() {
        for bad in [
            "bogus",
            "warnings",
            "",
            "info,",
            "celeriac=loud",
            "=debug",
            "a b=info",
        ] {
            let e = parse_level(bad).unwrap_err();
            assert!(
                e.contains("debug, info, warning, error, critical or fatal")
                    || e.contains("target=level")
                    || e.contains("empty directive"),
                "{bad:?}: {e}"
            );
        }
        assert!(parse_level("bogus").unwrap_err().contains("\"bogus\""));
    }
}
