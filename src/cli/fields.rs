//! `--fields a,b,c` of `volume list` and `volume inspect`: which keys of a volume to show, in
//! which order. The CLI asks the server for them (`?fields=`) and also picks them out of the
//! answer itself, so the output is the same whether or not the server filters.

use serde_json::Value;

/// The keys of a volume in the API's answers (`volume_json` in src/server/http.rs).
pub const VOLUME_FIELDS: [&str; 6] = ["name", "cap", "used", "free", "inodes", "created"];

/// The columns of `volume list` without `--fields`.
pub const LIST_DEFAULT: [&str; 4] = ["name", "cap", "used", "inodes"];

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

/// Pretty JSON as serde_json writes it, but with an object's keys in the order given (serde_json's
/// own map sorts them).
pub fn object_json(pairs: &[(&str, &Value)], indent: &str) -> String {
    if pairs.is_empty() {
        return "{}".into();
    }
    let inner = format!("{indent}  ");
    let lines: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let key = Value::String(k.to_string());
            let value = serde_json::to_string_pretty(v).unwrap_or_default().replace('\n', &format!("\n{inner}"));
            format!("{inner}{key}: {value}")
        })
        .collect();
    format!("{{\n{}\n{indent}}}", lines.join(",\n"))
}

/// An array of volume objects, each with only `fields`, in order, as pretty JSON.
pub fn list_json(vols: &[Value], fields: &[&str]) -> String {
    if vols.is_empty() {
        return "[]".into();
    }
    let items: Vec<String> = vols.iter().map(|v| format!("  {}", object_json(&select(v, fields), "  "))).collect();
    format!("[\n{}\n]", items.join(",\n"))
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
                    "inodes" => format!("{c:>8}"),
                    _ => format!("{c:>12}"),
                }
            })
            .collect();
        line.join(" ").trim_end().to_string()
    };
    let mut out = vec![row(&mut |f| f.to_uppercase())];
    for vol in vols {
        out.push(row(&mut |f| match f {
            "name" => vol[f].as_str().unwrap_or("").to_string(),
            "cap" | "used" | "free" => super::human(vol[f].as_u64().unwrap_or(0)),
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
            json!({"name": "data", "cap": 2u64 << 30, "used": 4096, "free": (2u64 << 30) - 4096, "inodes": 3, "created": 1700000000}),
            json!({"name": "shared", "cap": 64u64 << 20, "used": 0, "free": 64u64 << 20, "inodes": 1, "created": 1700000001}),
        ]
    }

    #[test]
    fn parse_keeps_order_and_rejects_unknown_empty_and_repeated_names() {
        assert_eq!(Fields::parse("used,name").unwrap().names(), ["used", "name"]);
        assert_eq!(Fields::parse(" cap , free ").unwrap().query(), "cap,free");
        let err = Fields::parse("name,size").unwrap_err();
        assert!(err.contains("\"size\""), "{err}");
        for f in VOLUME_FIELDS {
            assert!(err.contains(f), "the error lists the valid field {f}: {err}");
        }
        assert!(Fields::parse("name,,cap").is_err());
        assert!(Fields::parse("").is_err());
        assert!(Fields::parse("name,name").unwrap_err().contains("twice"));
    }

    #[test]
    fn select_picks_the_fields_in_order_whatever_the_server_sent() {
        let full = &vols()[0];
        assert_eq!(select(full, &["used", "name"]), vec![("used", &json!(4096)), ("name", &json!("data"))]);
        // A server that already filtered, or one that lacks a key: what is there, in order.
        let filtered = json!({"name": "data"});
        assert_eq!(select(&filtered, &["used", "name"]), vec![("name", &json!("data"))]);
    }

    #[test]
    fn object_json_is_serde_jsons_pretty_form_in_the_given_order() {
        let full = &vols()[0];
        // In sorted key order it is exactly what serde_json prints for the filtered object.
        let sorted = ["cap", "inodes", "name"];
        let filtered: serde_json::Map<String, Value> = sorted.iter().map(|k| (k.to_string(), full[*k].clone())).collect();
        assert_eq!(object_json(&select(full, &sorted), ""), serde_json::to_string_pretty(&filtered).unwrap());
        assert_eq!(object_json(&select(full, &["used", "name"]), ""), "{\n  \"used\": 4096,\n  \"name\": \"data\"\n}");
        assert_eq!(object_json(&[], ""), "{}");
        // Nested values are indented as serde_json would.
        let nested = json!({"a": [1, 2]});
        assert_eq!(object_json(&select(&nested, &["a"]), ""), serde_json::to_string_pretty(&nested).unwrap());
    }

    #[test]
    fn list_json_parses_back_to_objects_with_only_the_fields() {
        let out = list_json(&vols(), &["name", "free"]);
        let back: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, json!([{"name": "data", "free": (2u64 << 30) - 4096}, {"name": "shared", "free": 64u64 << 20}]));
        assert!(out.find("\"name\"").unwrap() < out.find("\"free\"").unwrap(), "keys in the given order: {out}");
        assert_eq!(list_json(&[], &["name"]), "[]");
    }

    #[test]
    fn table_default_columns_are_the_old_layout() {
        let vols = vols();
        let mut want = format!("{:<24} {:>12} {:>12} {:>8}\n", "NAME", "CAP", "USED", "INODES");
        want += &format!("{:<24} {:>12} {:>12} {:>8}\n", "data", "2.0 GiB", "4.0 KiB", 3);
        want += &format!("{:<24} {:>12} {:>12} {:>8}\n", "shared", "64.0 MiB", "0 B", 1);
        assert_eq!(table(&vols, &LIST_DEFAULT), want);
    }

    #[test]
    fn table_with_fields_prints_only_those_columns_in_order() {
        let out = table(&vols(), &["inodes", "name"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, ["  INODES NAME", "       3 data", "       1 shared"]);
        let out = table(&vols(), &["free"]);
        assert_eq!(out, format!("{:>12}\n{:>12}\n{:>12}\n", "FREE", "2.0 GiB", "64.0 MiB"));
    }
}
