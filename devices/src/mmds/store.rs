//! The MMDS document and how its paths are answered.
//!
//! Invariant: the document, serialized, is never larger than the size limit: a `PUT` or
//! `PATCH` that would make it larger is refused and changes nothing.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Map, Value};

use super::token::{TokenAuthority, TokenError};

/// The store as the API and the net devices share it.
pub type SharedMmds = Arc<Mutex<MmdsStore>>;

/// Firecracker's MMDS versions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MmdsVersion {
    /// Plain GETs, no session tokens.
    #[default]
    V1,
    /// Every GET carries a session token from `PUT /latest/api/token`.
    V2,
}

/// How a value is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// The value as JSON (`Accept: application/json`).
    Json,
    /// EC2's IMDS plain text: an object's keys one per line (`key/` for an object), a string
    /// as itself.
    Imds,
}

/// Why a store operation failed (Firecracker's texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The document would exceed the size limit.
    #[error("The MMDS patch request doesn't fit.")]
    LimitExceeded,
    /// A `PATCH` before any `PUT`.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// No value at the path.
    #[error("The MMDS resource does not exist.")]
    NotFound,
    /// IMDS text has no form for numbers, booleans, arrays or null.
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// The document, its limit, the version and its tokens.
#[derive(Debug)]
pub struct MmdsStore {
    data: Value,
    initialized: bool,
    size_limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: TokenAuthority,
}

impl MmdsStore {
    /// An empty store whose document may take at most `size_limit` bytes serialized.
    pub fn new(size_limit: usize) -> Self {
        Self {
            data: Value::Null,
            initialized: false,
            size_limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: TokenAuthority::default(),
        }
    }

    /// A store to share between the API and the devices.
    pub fn shared(size_limit: usize) -> SharedMmds {
        Arc::new(Mutex::new(Self::new(size_limit)))
    }

    /// The size limit in bytes.
    pub fn size_limit(&self) -> usize {
        self.size_limit
    }

    /// Sets the version and whether answers are always IMDS text (`imds_compat`).
    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    /// The version guests are served with.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// Whether every answer is IMDS text, whatever the request's `Accept`.
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// `PUT /mmds`: replaces the document.
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        self.check_size(&data)?;
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// `PATCH /mmds`: merges `patch` into the document (JSON merge patch, RFC 7396: a `null`
    /// removes a key).
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut patched = self.data.clone();
        merge_patch(&mut patched, patch);
        self.check_size(&patched)?;
        self.data = patched;
        Ok(())
    }

    /// `GET /mmds`: the document (`{}` before any `PUT`, as Firecracker answers).
    pub fn data(&self) -> Value {
        match &self.data {
            Value::Null => Value::Object(Map::new()),
            data => data.clone(),
        }
    }

    fn check_size(&self, data: &Value) -> Result<(), StoreError> {
        // Serializing a Value cannot fail: its keys are strings.
        let len = serde_json::to_vec(data).map_or(usize::MAX, |bytes| bytes.len());
        if len > self.size_limit {
            return Err(StoreError::LimitExceeded);
        }
        Ok(())
    }

    /// The value at a guest's request path (`/a/b/`, repeated slashes folded, a trailing one
    /// ignored), written in `format`.
    pub fn lookup(&self, path: &str, format: OutputFormat) -> Result<String, StoreError> {
        let pointer = json_pointer(path);
        let value = self.data.pointer(&pointer).ok_or(StoreError::NotFound)?;
        let format = if self.imds_compat {
            OutputFormat::Imds
        } else {
            format
        };
        match format {
            OutputFormat::Json => Ok(value.to_string()),
            OutputFormat::Imds => imds_text(value),
        }
    }

    /// A new version 2 session token valid for `ttl_seconds`.
    pub fn new_token(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        self.tokens.issue(ttl_seconds, now)
    }

    /// Whether `token` was issued here and has not expired.
    pub fn token_is_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.is_valid(token, now)
    }
}

/// JSON merge patch (RFC 7396).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A request path as a JSON pointer: repeated slashes folded, a trailing slash dropped, `~`
/// and `/` inside keys being what the path says (the path cannot name a key with a `/`).
fn json_pointer(path: &str) -> String {
    let mut pointer = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        pointer.push('/');
        pointer.push_str(&segment.replace('~', "~0"));
    }
    pointer
}

fn imds_text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(key, value)| {
                if value.is_object() {
                    format!("{key}/")
                } else {
                    key.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(StoreError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> MmdsStore {
        let mut store = MmdsStore::new(51200);
        store
            .put(json!({
                "latest": {"meta-data": {"ami-id": "ami-1", "tags": {"a": "b"}}},
                "age": 43,
                "phones": ["+40", "+44"],
                "odd~key": "tilde"
            }))
            .unwrap();
        store
    }

    #[test]
    fn lookups_in_both_formats() {
        let s = store();
        assert_eq!(
            s.lookup("/latest/meta-data", OutputFormat::Imds).unwrap(),
            "ami-id\ntags/"
        );
        assert_eq!(
            s.lookup("//latest//meta-data/ami-id/", OutputFormat::Imds)
                .unwrap(),
            "ami-1"
        );
        assert_eq!(
            s.lookup("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "\"ami-1\""
        );
        assert_eq!(s.lookup("/age", OutputFormat::Json).unwrap(), "43");
        assert_eq!(
            s.lookup("/age", OutputFormat::Imds),
            Err(StoreError::UnsupportedValueType)
        );
        assert_eq!(s.lookup("/phones/1", OutputFormat::Imds).unwrap(), "+44");
        assert_eq!(s.lookup("/odd~key", OutputFormat::Imds).unwrap(), "tilde");
        assert_eq!(
            s.lookup("/nothing", OutputFormat::Json),
            Err(StoreError::NotFound)
        );
        assert!(s.lookup("/", OutputFormat::Json).unwrap().starts_with('{'));
    }

    #[test]
    fn imds_compat_always_answers_text() {
        let mut s = store();
        s.configure(MmdsVersion::V1, true);
        assert_eq!(
            s.lookup("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "ami-1"
        );
    }

    #[test]
    fn patches_merge_and_the_limit_holds() {
        let mut s = MmdsStore::new(64);
        assert_eq!(s.patch(&json!({"a": 1})), Err(StoreError::NotInitialized));
        assert_eq!(s.data(), json!({}));
        s.put(json!({"a": {"b": 1, "c": 2}, "d": 3})).unwrap();
        s.patch(&json!({"a": {"b": null, "e": 5}, "d": "x"}))
            .unwrap();
        assert_eq!(s.data(), json!({"a": {"c": 2, "e": 5}, "d": "x"}));
        let big = json!({"k": "v".repeat(100)});
        assert_eq!(s.put(big.clone()), Err(StoreError::LimitExceeded));
        assert_eq!(s.patch(&big), Err(StoreError::LimitExceeded));
        assert_eq!(
            s.data(),
            json!({"a": {"c": 2, "e": 5}, "d": "x"}),
            "unchanged"
        );
        // A patch that is not an object replaces the document.
        s.patch(&json!("plain")).unwrap();
        assert_eq!(s.data(), json!("plain"));
    }
}
