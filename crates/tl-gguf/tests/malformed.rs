#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Malformed files: each gives an error naming the problem (and the byte
//! offset where one applies), never a panic and never an allocation sized by
//! an unchecked count.

use tl_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value};

/// A small valid file: a few metadata values (incl. a nested array) and two
/// tensors.
fn valid() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set(
        "nested",
        Value::Array(Array::Array(vec![
            Array::U8(vec![1, 2]),
            Array::String(vec!["a".into()]),
        ])),
    );
    w.add_tensor("a", vec![4, 2], GgmlType::F32, vec![0u8; 32])
        .expect("valid tensor");
    w.add_tensor("b", vec![32], GgmlType::Q8_0, vec![0u8; 34])
        .expect("valid tensor");
    w.to_bytes().expect("serializes")
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Offset of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

#[test]
fn the_valid_file_parses() {
    let f = parse(valid()).expect("valid");
    assert_eq!(f.version, 3);
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.metadata.get_u32("llama.block_count").expect("present"), 2);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = valid();
    // Every prefix that cuts into the header or a tensor's data must fail
    // cleanly (the data section is required because tensors point into
    // it); only the zero padding after the last tensor may go.
    let f = parse(bytes.clone()).expect("valid");
    let end = f.data_offset as usize
        + f.tensors
            .iter()
            .map(|t| (t.offset + t.size) as usize)
            .max()
            .unwrap_or(0);
    assert!(end <= bytes.len() && end > bytes.len() / 2);
    for len in 0..end {
        let r = parse(bytes[..len].to_vec());
        assert!(r.is_err(), "prefix of {len} bytes parsed");
    }
}

#[test]
fn truncated_header_names_offset() {
    let bytes = valid();
    let e = parse(bytes[..10].to_vec()).expect_err("truncated");
    let msg = e.to_string();
    assert!(matches!(e, GgufError::Truncated { offset: 8, .. }), "{msg}");
    assert!(msg.contains("offset 8"), "{msg}");
}

#[test]
fn wrong_magic() {
    let mut bytes = valid();
    bytes[0..4].copy_from_slice(b"GGML");
    let e = parse(bytes).expect_err("bad magic");
    assert!(matches!(e, GgufError::BadMagic { .. }));
    assert!(e.to_string().contains("bad magic"));
}

#[test]
fn unknown_versions() {
    for v in [0u32, 1, 4, 0x0300_0000] {
        let mut bytes = valid();
        put_u32(&mut bytes, 4, v);
        let e = parse(bytes).expect_err("bad version");
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version } if version == v),
            "{e}"
        );
    }
}

#[test]
fn absurd_tensor_count() {
    let mut bytes = valid();
    put_u64(&mut bytes, 8, 1 << 60);
    let e = parse(bytes).expect_err("absurd");
    assert!(
        matches!(e, GgufError::AbsurdCount { what: "tensor count", count, offset: 8, .. } if count == 1 << 60),
        "{e}"
    );
}

#[test]
fn absurd_metadata_count() {
    let mut bytes = valid();
    put_u64(&mut bytes, 16, u64::MAX);
    let e = parse(bytes).expect_err("absurd");
    assert!(
        matches!(
            e,
            GgufError::AbsurdCount {
                what: "metadata count",
                offset: 16,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn absurd_string_length() {
    let mut bytes = valid();
    // The first key's length prefix sits right after the 24-byte header.
    put_u64(&mut bytes, 24, 1 << 62);
    let e = parse(bytes).expect_err("absurd");
    assert!(
        matches!(e, GgufError::AbsurdCount { count, offset: 24, .. } if count == 1 << 62),
        "{e}"
    );
}

#[test]
fn absurd_array_length() {
    let mut bytes = valid();
    // "nested" key, then type 9 (array), elem type 9, then the u64 count.
    let key = find(&bytes, b"nested");
    let count_at = key + 6 + 4 + 4;
    put_u64(&mut bytes, count_at, 1 << 61);
    let e = parse(bytes).expect_err("absurd");
    assert!(
        matches!(e, GgufError::AbsurdCount { what: "array length", offset, .. } if offset == count_at as u64),
        "{e}"
    );
}

#[test]
fn unknown_value_type() {
    let mut bytes = valid();
    let key = find(&bytes, b"llama.block_count");
    let ty_at = key + "llama.block_count".len();
    put_u32(&mut bytes, ty_at, 99);
    let e = parse(bytes).expect_err("bad type");
    assert!(
        matches!(&e, GgufError::UnknownValueType { type_id: 99, offset, key } if *offset == ty_at as u64 && key == "llama.block_count"),
        "{e}"
    );
}

#[test]
fn invalid_utf8_key() {
    let mut bytes = valid();
    let key = find(&bytes, b"llama.block_count");
    bytes[key + 2] = 0xff;
    let e = parse(bytes).expect_err("bad utf8");
    assert!(
        matches!(e, GgufError::InvalidUtf8 { what: "a metadata key", offset } if offset == key as u64 + 2),
        "{e}"
    );
}

#[test]
fn unknown_tensor_type() {
    let mut bytes = valid();
    // Tensor info "b": name, n_dims=1, dim 32, then the type id.
    let name = find(&bytes, b"\x01\x00\x00\x00\x00\x00\x00\x00b");
    let ty_at = name + 9 + 4 + 8;
    put_u32(&mut bytes, ty_at, 36);
    let e = parse(bytes).expect_err("bad dtype");
    assert!(
        matches!(&e, GgufError::UnknownTensorType { type_id: 36, name, offset } if name == "b" && *offset == ty_at as u64),
        "{e}"
    );
}

#[test]
fn tensor_data_past_end() {
    let mut bytes = valid();
    let name = find(&bytes, b"\x01\x00\x00\x00\x00\x00\x00\x00b");
    let off_at = name + 9 + 4 + 8 + 4;
    put_u64(&mut bytes, off_at, 1 << 20);
    let e = parse(bytes).expect_err("past end");
    assert!(
        matches!(&e, GgufError::DataPastEnd { name, .. } if name == "b"),
        "{e}"
    );
    // An offset so large that offset + size overflows u64.
    let mut bytes = valid();
    put_u64(&mut bytes, off_at, u64::MAX - 31);
    let e = parse(bytes).expect_err("overflow");
    assert!(matches!(e, GgufError::DataPastEnd { .. }), "{e}");
}

#[test]
fn misaligned_offset() {
    let mut bytes = valid();
    let name = find(&bytes, b"\x01\x00\x00\x00\x00\x00\x00\x00b");
    let off_at = name + 9 + 4 + 8 + 4;
    put_u64(&mut bytes, off_at, 33);
    let e = parse(bytes).expect_err("misaligned");
    assert!(
        matches!(&e, GgufError::Misaligned { name, data_offset: 33, alignment: 32 } if name == "b"),
        "{e}"
    );
}

#[test]
fn duplicate_tensor_names() {
    let mut bytes = valid();
    let at = find(&bytes, b"\x01\x00\x00\x00\x00\x00\x00\x00b");
    bytes[at + 8] = b'a';
    let e = parse(bytes).expect_err("duplicate");
    assert!(
        matches!(&e, GgufError::DuplicateTensor { name, offset } if name == "a" && *offset == at as u64),
        "{e}"
    );
}

#[test]
fn duplicate_metadata_keys() {
    let mut w = GgufWriter::new();
    w.set("k1", Value::U8(1));
    w.set("k2", Value::U8(2));
    let mut bytes = w.to_bytes().expect("serializes");
    let at = find(&bytes, b"k2");
    bytes[at + 1] = b'1';
    let e = parse(bytes).expect_err("duplicate");
    assert!(
        matches!(&e, GgufError::DuplicateKey { key, .. } if key == "k1"),
        "{e}"
    );
}

#[test]
fn too_many_dims_and_partial_blocks() {
    let mut bytes = valid();
    let at = find(&bytes, b"\x01\x00\x00\x00\x00\x00\x00\x00b");
    put_u32(&mut bytes, at + 9, 7);
    let e = parse(bytes).expect_err("dims");
    assert!(e.to_string().contains("7 dimensions"), "{e}");

    let mut bytes = valid();
    put_u64(&mut bytes, at + 9 + 4, 33); // Q8_0 needs multiples of 32
    let e = parse(bytes).expect_err("partial block");
    assert!(e.to_string().contains("block size 32"), "{e}");
}

#[test]
fn bad_alignment_and_bool() {
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(24));
    let bytes = w.to_bytes().expect("serializes");
    let e = parse(bytes).expect_err("alignment");
    assert!(
        matches!(e, GgufError::BadAlignment { alignment: 24, .. }),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.set("flag", Value::Bool(true));
    let mut bytes = w.to_bytes().expect("serializes");
    let at = find(&bytes, b"flag") + 4 + 4;
    bytes[at] = 7;
    let e = parse(bytes).expect_err("bool");
    assert!(e.to_string().contains("neither 0 nor 1"), "{e}");
}

#[test]
fn deeply_nested_arrays_are_refused() {
    let mut a = Array::U8(vec![1]);
    for _ in 0..20 {
        a = Array::Array(vec![a]);
    }
    let mut w = GgufWriter::new();
    w.set("deep", Value::Array(a));
    let e = parse(w.to_bytes().expect("serializes")).expect_err("deep");
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    // A cheap deterministic stand-in for the fuzzer: flip bytes everywhere.
    let bytes = valid();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = bytes.clone();
        let n = 1 + (state % 4) as usize;
        for k in 0..n {
            let pos = ((state >> (8 * k)) as usize) % b.len();
            b[pos] = (state >> (3 * k)) as u8;
        }
        let _ = parse(b);
    }
}
