//! The vocabulary of a GGUF file: ggml tensor types with their block
//! geometry, and metadata values with their on-disk type tags (GGUF v3).

/// A ggml tensor type this exporter writes. The discriminant is the id
/// stored in the file's tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    BF16 = 30,
}

impl GgmlType {
    /// Values per block (a row's length must be a multiple of it).
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of a tensor of `n` values (n a multiple of the block length).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }

    /// ggml's name, as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }
}

/// A metadata value. Arrays hold one element type; the writer tags them
/// by it (integers the converter writes into arrays are INT32).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
    ArrF32(Vec<f32>),
}

impl Value {
    /// The GGUF value type id (for an array: ARRAY, 9).
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::ArrStr(_) | Value::ArrI32(_) | Value::ArrF32(_) => 9,
        }
    }
}

/// Metadata in write order. Setting a key that is already present replaces
/// its value in place, as the converter's dict does (Gemma 3 rewrites
/// several keys and they keep their first position).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kvs(pub Vec<(String, Value)>);

impl Kvs {
    pub fn set(&mut self, key: impl Into<String>, v: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => self.0.push((key, v)),
        }
    }

    /// Remove a key and append it at the end, as llama-quantize's
    /// gguf_set_val_* does for the keys it writes.
    pub fn set_last(&mut self, key: &str, v: Value) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_string(), v));
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn extend(&mut self, other: Kvs) {
        for (k, v) in other.0 {
            self.set(k, v);
        }
    }
}
