#![allow(clippy::unwrap_used, clippy::expect_used)]
//! read → write → read gives equal metadata and byte-identical tensor data,
//! on a synthetic file with every value type and on the real models when
//! present (CI fetches them; see scripts/fetch_models.py).

use tl_gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};

fn every_value_type() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.set("u8", Value::U8(200));
    w.set("i8", Value::I8(-100));
    w.set("u16", Value::U16(60000));
    w.set("i16", Value::I16(-30000));
    w.set("u32", Value::U32(4_000_000_000));
    w.set("i32", Value::I32(-2_000_000_000));
    w.set("f32", Value::F32(1.5e-6));
    w.set("bool", Value::Bool(true));
    w.set("string", Value::String("héllo ✓".into()));
    w.set("u64", Value::U64(u64::MAX));
    w.set("i64", Value::I64(i64::MIN));
    w.set("f64", Value::F64(-2.5e300));
    w.set("arr.f32", Value::Array(Array::F32(vec![1.0, -2.0])));
    w.set("arr.bool", Value::Array(Array::Bool(vec![true, false])));
    w.set(
        "arr.str",
        Value::Array(Array::String(vec!["".into(), "x".into()])),
    );
    w.set(
        "arr.nested",
        Value::Array(Array::Array(vec![
            Array::I64(vec![-1, 2]),
            Array::Array(vec![Array::U16(vec![7])]),
            Array::String(vec![]),
        ])),
    );
    w.add_tensor("t0", vec![3], GgmlType::F32, vec![1u8; 12])
        .expect("valid");
    w.add_tensor("t1", vec![256, 2], GgmlType::Q4_K, vec![2u8; 288])
        .expect("valid");
    w.add_tensor("t2", vec![5, 1, 1, 1], GgmlType::F16, vec![3u8; 10])
        .expect("valid");
    w
}

fn assert_same(a: &GgufFile, b: &GgufFile) {
    assert_eq!(a.metadata, b.metadata);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(
            (&x.name, &x.dims, x.ty, x.size),
            (&y.name, &y.dims, y.ty, y.size)
        );
        assert!(a.tensor_data(x) == b.tensor_data(y), "data of {}", x.name);
    }
}

#[test]
fn synthetic_round_trip() {
    let bytes = every_value_type().to_bytes().expect("serializes");
    let a = GgufFile::from_bytes(bytes).expect("parses");
    assert_eq!(a.metadata.get_u64("u32").expect("u32"), 4_000_000_000);
    assert_eq!(a.metadata.get_i64("i8").expect("i8"), -100);
    assert_eq!(a.metadata.get_u64("u8").expect("u8 as u64"), 200);
    assert!(
        a.metadata.get_u64("i8").is_err(),
        "negative is not unsigned"
    );
    assert_eq!(a.metadata.get_str("string").expect("str"), "héllo ✓");
    assert_eq!(a.tensor_data(&a.tensors[1]), &[2u8; 288][..]);
    let again = GgufWriter::from_file(&a).to_bytes().expect("serializes");
    let b = GgufFile::from_bytes(again.clone()).expect("parses");
    assert_same(&a, &b);
    // Writing is deterministic: a second pass gives the same bytes.
    let third = GgufWriter::from_file(&b).to_bytes().expect("serializes");
    assert_eq!(again, third);
}

#[test]
fn custom_alignment_is_respected() {
    let mut w = every_value_type();
    w.set("general.alignment", Value::U32(64));
    let f = GgufFile::from_bytes(w.to_bytes().expect("ok")).expect("parses");
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    for t in &f.tensors {
        assert_eq!(t.offset % 64, 0);
    }
}

#[test]
fn real_models_round_trip() {
    for name in [
        "qwen2.5-coder-0.5b-instruct-q4.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let path = tl_gguf::model_cache_dir().join(name);
        assert!(
            path.exists(),
            "{} missing: run `python3 scripts/fetch_models.py`",
            path.display()
        );
        let a = GgufFile::open(&path).expect("opens");
        let bytes = GgufWriter::from_file(&a).to_bytes().expect("serializes");
        let b = GgufFile::from_bytes(bytes).expect("parses");
        assert_same(&a, &b);
    }
}
