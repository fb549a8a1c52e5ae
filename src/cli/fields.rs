//! `--fields a,b,c` of `volume list` and `volume inspect`: which keys of a volume to show, in
//! which order. The CLI asks the server for them (`?fields=`) and also picks them out of the
//! answer itself, so the output is the same whether or not the server filters.

use serde_json::Value;

/// The keys of a volume in the API's answers (`volume_json` in src/server/http.rs).
pub const VOLUME_FIELDS: [&str; 8] = ["id", "name", "cap_bytes", "used_bytes", "free_bytes", "files", "created_at", "attachments"];

/// The columns of `volume list` without `--fields`.
pub const LIST_DEFAULT: [&str; 4] = ["name", "cap_bytes", "used_bytes", "files"];

/// A checked `--fields` list: known volume keys, each once, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields(pub Vec<String>);

impl Fields {
    /// Parses `a,b,c` (spaces around names are fine).
    pub fn parse(s: &str) -> Result<Fields, String> {
        let valid = VOLUME_FIELDS.join(", ");
        let mut out: Vec<String> = Vec::new();
        for name in s.split(',').map(str::trim) {
            if name.is_empty() {
                return Err(format!("empty field name in {s:?} (valid fields: {valid})"));
            }
            if !VOLUME_FIELDS.contains(&name) {
                return Err(format!("unknown field {name:?} (valid fields: {valid})"));
            }
            if out.iter().any(|f| f == name) {
                return Err(format!("field {name:?} is given twice"));
            }
            out.push(name.to_string());
        }
        Ok(Fields(out))
    }

    /// The value of the `fields` query parameter.
    pub fn query(&self) -> String {
        self.0.join(",")
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(String::as_str).collect()
    }
}

/// The `fields` of one volume object, in that order; a key the answer lacks is left out.
pub fn select<'a, 'v>(vol: &'v Value, fields: &[&'a str]) -> Vec<(&'a str, &'v Value)> {
    fields.iter().filter_map(|&f| vol.get(f).map(|v| (f, v))).collect()
}

/// Pretty JSON of an object with only these pairs, in this order (serde_json keeps insertion
/// order: its `preserve_order` feature is on).
pub fn object_json(pairs: &[(&str, &Value)], _indent: &str) -> String {
    serde_json::to_string_pretty(&object(pairs)).unwrap_or_default()
}

fn object(pairs: &[(&str, &Value)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.to_string(), (*v).clone())).collect())
}

/// An array of volume objects, each with only `fields`, in order, as pretty JSON.
pub fn list_json(vols: &[Value], fields: &[&str]) -> String {
    let items: Vec<Value> = vols.iter().map(|v| object(&select(v, fields))).collect();
    serde_json::to_string_pretty(&items).unwrap_or_default()
}

/// The table of `volume list`: a header and one line per volume, the columns in `fields` order.
pub fn table(vols: &[Value], fields: &[&str]) -> String {
    let row = |cells: &mut dyn FnMut(&str) -> String| -> String {
        let line: Vec<String> = fields
            .iter()
            .map(|&f| {
                let c = cells(f);
                match f {
                    "name" => format!("{c:<24}"),
                    "files" => format!("{c:>8}"),
                    _ => format!("{c:>12}"),
                }
            })
            .collect();
        line.join(" ").trim_end().to_string()
    };
    let mut out = vec![row(&mut |f| f.trim_end_matches("_bytes").trim_end_matches("_at").to_uppercase())];
    for vol in vols {
        out.push(row(&mut |f| match f {
            "name" => vol[f].as_str().unwrap_or("").to_string(),
            "cap_bytes" | "used_bytes" | "free_bytes" => super::human(vol[f].as_u64().unwrap_or(0)),
            "attachments" => vol[f].as_array().map_or(0, Vec::len).to_string(),
            _ => vol[f].as_u64().unwrap_or(0).to_string(),
        }));
    }
    out.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vols() -> Vec<Value> {
        vec![
            json!({"name": "data", "cap_bytes": 2u64 << 30, "used_bytes": 4096, "free_bytes": (2u64 << 30) - 4096, "files": 3, "created_at": 1700000000}),
            json!({"name": "shared", "cap_bytes": 64u64 << 20, "used_bytes": 0, "free_bytes": 64u64 << 20, "files": 1, "created_at": 1700000001}),
        ]
    }

    #[test]
    fn parse_keeps_order_and_rejects_unknown_empty_and_repeated_names() {
        assert_eq!(Fields::parse("used_bytes,name").unwrap().names(), ["used_bytes", "name"]);
        assert_eq!(Fields::parse(" cap_bytes , free_bytes ").unwrap().query(), "cap_bytes,free_bytes");
        let err = Fields::parse("name,size").unwrap_err();
        assert!(err.contains("\"size\""), "{err}");
        for f in VOLUME_FIELDS {
            assert!(err.contains(f), "the error lists the valid field {f}: {err}");
        }
        assert!(Fields::parse("name,,cap_bytes").is_err());
        assert!(Fields::parse("").is_err());
        assert!(Fields::parse("name,name").unwrap_err().contains("twice"));
    }

    #[test]
    fn select_picks_the_fields_in_order_whatever_the_server_sent() {
        let full = &vols()[0];
        assert_eq!(select(full, &["used_bytes", "name"]), vec![("used_bytes", &json!(4096)), ("name", &json!("data"))]);
        // A server that already filtered, or one that lacks a key: what is there, in order.
        let filtered = json!({"name": "data"});
        assert_eq!(select(&filtered, &["used_bytes", "name"]), vec![("name", &json!("data"))]);
    }

    #[test]
    fn object_json_is_serde_jsons_pretty_form_in_the_given_order() {
        let full = &vols()[0];
        // In sorted key order it is exactly what serde_json prints for the filtered object.
        let sorted = ["cap_bytes", "files", "name"];
        let filtered: serde_json::Map<String, Value> = sorted.iter().map(|k| (k.to_string(), full[*k].clone())).collect();
        assert_eq!(object_json(&select(full, &sorted), ""), serde_json::to_string_pretty(&filtered).unwrap());
        assert_eq!(object_json(&select(full, &["used_bytes", "name"]), ""), "{\n  \"used_bytes\": 4096,\n  \"name\": \"data\"\n}");
        assert_eq!(object_json(&[], ""), "{}");
        // Nested values are indented as serde_json would.
        let nested = json!({"a": [1, 2]});
        assert_eq!(object_json(&select(&nested, &["a"]), ""), serde_json::to_string_pretty(&nested).unwrap());
    }

    #[test]
    fn list_json_parses_back_to_objects_with_only_the_fields() {
        let out = list_json(&vols(), &["name", "free_bytes"]);
        let back: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, json!([{"name": "data", "free_bytes": (2u64 << 30) - 4096}, {"name": "shared", "free_bytes": 64u64 << 20}]));
        assert!(out.find("\"name\"").unwrap() < out.find("\"free_bytes\"").unwrap(), "keys in the given order: {out}");
        assert_eq!(list_json(&[], &["name"]), "[]");
    }

    #[test]
    fn table_default_columns_are_the_old_layout() {
        let vols = vols();
        let mut want = format!("{:<24} {:>12} {:>12} {:>8}\n", "NAME", "CAP", "USED", "FILES");
        want += &format!("{:<24} {:>12} {:>12} {:>8}\n", "data", "2.0 GiB", "4.0 KiB", 3);
        want += &format!("{:<24} {:>12} {:>12} {:>8}\n", "shared", "64.0 MiB", "0 B", 1);
        assert_eq!(table(&vols, &LIST_DEFAULT), want);
    }

    #[test]
    fn table_with_fields_prints_only_those_columns_in_order() {
        let out = table(&vols(), &["files", "name"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, ["   FILES NAME", "       3 data", "       1 shared"]);
        let out = table(&vols(), &["free_bytes"]);
        assert_eq!(out, format!("{:>12}\n{:>12}\n{:>12}\n", "FREE", "2.0 GiB", "64.0 MiB"));
    }
}
