//! Typed reads of GGUF metadata, with errors that name the key.

use candle_core::quantized::gguf_file::{Content, Value};

use super::ModelError;

/// Metadata of one GGUF file.
pub struct GgufMeta<'a> {
    content: &'a Content,
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) if *x >= 0 => Some(*x as u64),
        Value::I16(x) if *x >= 0 => Some(*x as u64),
        Value::I32(x) if *x >= 0 => Some(*x as u64),
        Value::I64(x) if *x >= 0 => Some(*x as u64),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => as_u64(other).map(|x| x as f64),
    }
}

impl<'a> GgufMeta<'a> {
    /// Wraps parsed GGUF content.
    pub fn new(content: &'a Content) -> Self {
        GgufMeta { content }
    }

    /// A raw value.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn invalid(key: &str, what: &str) -> ModelError {
        ModelError::InvalidConfig(format!("GGUF metadata {key}: {what}"))
    }

    /// An unsigned integer, if present.
    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>, ModelError> {
        self.get(key)
            .map(|v| as_u64(v).ok_or_else(|| Self::invalid(key, "expected an unsigned integer")))
            .transpose()
    }

    /// A required unsigned integer, as usize.
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.u64_opt(key)?
            .map(|v| v as usize)
            .ok_or_else(|| Self::invalid(key, "missing"))
    }

    /// A float, if present.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key)
            .map(|v| as_f64(v).ok_or_else(|| Self::invalid(key, "expected a number")))
            .transpose()
    }

    /// A boolean, if present.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                _ => Err(Self::invalid(key, "expected a boolean")),
            })
            .transpose()
    }

    /// A string, if present.
    pub fn str_opt(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(Self::invalid(key, "expected a string")),
            })
            .transpose()
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>, ModelError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(Self::invalid(key, "expected an array of strings")),
                })
                .collect(),
            Some(_) => Err(Self::invalid(key, "expected an array")),
            None => Err(Self::invalid(key, "missing")),
        }
    }

    /// An array of numbers, if present.
    pub fn f64s_opt(&self, key: &str) -> Result<Option<Vec<f64>>, ModelError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_f64(v).ok_or_else(|| Self::invalid(key, "expected numbers")))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(Self::invalid(key, "expected an array")),
            None => Ok(None),
        }
    }
}
