//! The fields of a span in the JSON log format, written straight into the span's buffer.
//!
//! Every delivery has a span, and its fields are formatted when the span is made, although
//! they are read only when a line is logged inside it, which the hot path does not do.
//! tracing-subscriber's `JsonFields` first collects them into a map of `serde_json::Value`s,
//! then serializes that through an adaptor that checks UTF-8 at every write: about 15 000
//! instructions for the worker's delivery span, 6 % of what a delivery costs (callgrind).
//! This writes the same JSON object text, which the JSON event format parses back when it
//! does log a line.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormattedFields;

pub struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        writer.write_char('{')?;
        write_members(&mut writer, true, fields)
    }

    /// Fields recorded later reopen the object; a name recorded twice is there twice, and
    /// the last one counts when the text is parsed.
    fn add_fields(&self, current: &'writer mut FormattedFields<Self>, fields: &tracing::span::Record<'_>) -> fmt::Result {
        let text = &mut current.fields;
        let first = match text.pop() {
            Some('}') => text == "{",
            // Nothing formatted yet.
            _ => {
                text.clear();
                text.push('{');
                true
            }
        };
        write_members(&mut current.as_writer(), first, fields)
    }
}

/// Writes `fields` as members of the JSON object whose `{` is written, then closes it;
/// `first` says whether it has no member yet.
fn write_members(writer: &mut dyn Write, first: bool, fields: impl RecordFields) -> fmt::Result {
    let mut visitor = Visitor { writer, first, result: Ok(()) };
    fields.record(&mut visitor);
    visitor.result?;
    visitor.writer.write_char('}')
}

struct Visitor<'a> {
    writer: &'a mut dyn Write,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// One `"name":value` member; `value` writes the value's JSON text.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut dyn Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        // As tracing-subscriber's own format: a raw identifier's name without its `r#`.
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.writer.write_char(',')?;
            }
            write_string(self.writer, name)?;
            self.writer.write_char(':')?;
            value(self.writer)
        })();
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| write_string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| write_string(w, &format!("{value:?}")));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; serde_json writes them as null too.
        self.member(field, |w| if value.is_finite() { write!(w, "{value}") } else { w.write_str("null") });
    }
}

/// `text` as a JSON string: the bytes JSON does not allow raw escaped, the runs between them
/// copied (a byte below 0x80 is a whole character, so every run is valid UTF-8).
fn write_string(writer: &mut dyn Write, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    let mut start = 0;
    for (at, byte) in text.bytes().enumerate() {
        let escaped = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..0x20 => "",
            _ => continue,
        };
        writer.write_str(&text[start..at])?;
        if escaped.is_empty() {
            write!(writer, "\\u{byte:04x}")?;
        } else {
            writer.write_str(escaped)?;
        }
        start = at + 1;
    }
    writer.write_str(&text[start..])?;
    writer.write_char('"')
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::prelude::*;

    use super::JsonFields;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;

        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    /// The span list of the one line logged inside the spans `log` makes, as the relay's
    /// JSON format prints it.
    fn spans_of(log: impl FnOnce()) -> Value {
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(false).with_span_list(true);
        let subscriber = tracing_subscriber::registry().with(layer.fmt_fields(JsonFields).with_writer(lines.clone()));
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim_end()).unwrap_or_else(|e| panic!("{e}: {text}"));
        line["spans"].clone()
    }

    #[test]
    fn span_fields_are_the_json_the_json_format_reads_back() {
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} é 😀";
        let spans = spans_of(|| {
            let outer = tracing::warn_span!("outer");
            let _outer = outer.enter();
            let lane = "inbox";
            let span = tracing::warn_span!("deliver", text = awkward, r#type = "x", ?lane, n = -3i64, big = u64::MAX, yes = true, ratio = 0.5, nan = f64::NAN, later = tracing::field::Empty);
            span.record("later", "set");
            span.record("n", 4);
            span.in_scope(|| tracing::warn!("inside"));
        });
        assert_eq!(spans[0], json!({"name": "outer"}));
        let expected = json!({"name": "deliver", "text": awkward, "type": "x", "lane": "\"inbox\"", "n": 4, "big": u64::MAX, "yes": true, "ratio": 0.5, "nan": null, "later": "set"});
        assert_eq!(spans[1], expected);
    }
}
