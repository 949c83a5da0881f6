//! JSON text exactly as Python's `orjson.dumps` writes it — what the Python saev uses for
//! `metadata.json`, `shards.json` and the store hash — so files and directory names agree byte
//! for byte: compact (no spaces) by default, or `OPT_INDENT_2` (two spaces, `": "`, one list item
//! per line, `[]`/`{}` when empty); keys in insertion order unless sorted (`OPT_SORT_KEYS`);
//! non-ASCII as raw UTF-8; no trailing newline.
//!
//! ```text
//! dumps(&json!({"b": [1], "a": true}), false, true) == r#"{"a":true,"b":[1]}"#
//! ```

use serde_json::Value;

fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write(v: &Value, indent: bool, sort: bool, level: usize, out: &mut String) {
    let nl = |out: &mut String, level: usize| {
        if indent {
            out.push('\n');
            out.push_str(&"  ".repeat(level));
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => string(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                nl(out, level + 1);
                write(x, indent, sort, level + 1, out);
            }
            nl(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = m.keys().collect();
            if sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                nl(out, level + 1);
                string(k, out);
                out.push_str(if indent { ": " } else { ":" });
                write(&m[k], indent, sort, level + 1, out);
            }
            nl(out, level);
            out.push('}');
        }
    }
}

/// `orjson.dumps(value, option=(OPT_INDENT_2 if indent) | (OPT_SORT_KEYS if sort_keys))`.
pub(crate) fn dumps(v: &Value, indent: bool, sort_keys: bool) -> String {
    let mut out = String::new();
    write(v, indent, sort_keys, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_orjson_formatting() {
        // Reference strings from orjson 3.x.
        let v = json!({"b": [1, -2], "a": true, "c": "é\"x", "d": null, "e": []});
        assert_eq!(
            dumps(&v, false, true),
            r#"{"a":true,"b":[1,-2],"c":"é\"x","d":null,"e":[]}"#
        );
        assert_eq!(
            dumps(&json!({"layers": [-2], "n": 3}), true, false),
            "{\n  \"layers\": [\n    -2\n  ],\n  \"n\": 3\n}"
        );
    }
}
