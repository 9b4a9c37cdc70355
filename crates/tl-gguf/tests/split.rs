#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Split models: parts written as llama.cpp's `gguf-split` lays them out
//! are joined by `GgufFile::open` into the file they were split from (same
//! metadata, same tensors with the same bytes); a missing part, a part
//! that says it is another part, or a tensor count other than
//! `split.tensors.count` is an error naming the part.

use std::path::{Path, PathBuf};

use tl_gguf::reader::split_path;
use tl_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tl-gguf-split-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.alignment", Value::U32(64));
    for i in 0..7u8 {
        let n = 32 * (u64::from(i) + 1);
        let bytes: Vec<u8> = (0..n * 4).map(|j| (j as u8).wrapping_mul(i + 3)).collect();
        w.add_tensor(format!("t{i}"), vec![n], GgmlType::F32, bytes)
            .unwrap();
    }
    w.add_tensor("q", vec![256, 2], GgmlType::Q4_K, vec![9u8; 288])
        .unwrap();
    w
}

/// Writes `model()` in `parts` parts under `d`; the first part's path.
fn write_parts(d: &Path, parts: u16) -> PathBuf {
    let first = d.join(format!("m-00001-of-{parts:05}.gguf"));
    for (i, w) in model().into_split(parts).unwrap().iter().enumerate() {
        w.write_file(split_path(&first, i as u64, u64::from(parts)).unwrap())
            .unwrap();
    }
    first
}

#[test]
fn parts_join_into_the_whole_file() {
    let d = dir("join");
    let whole = GgufFile::from_bytes(model().to_bytes().unwrap()).unwrap();
    for parts in [1u16, 2, 3, 8] {
        let first = write_parts(&d, parts);
        let f = GgufFile::open(&first).unwrap();
        assert_eq!(f.tensors.len(), whole.tensors.len(), "{parts}");
        for t in &whole.tensors {
            let got = f.tensor(&t.name).unwrap();
            assert_eq!((&got.dims, got.ty), (&t.dims, t.ty), "{}", t.name);
            assert_eq!(f.tensor_data(got), whole.tensor_data(t), "{}", t.name);
            assert_eq!(got.offset % 64, 0, "{}", t.name);
            // Where the tensor is in its part's own file (one part is a
            // single file).
            let (part, at) = f.tensor_location(got);
            let file = f.parts.get(part).map_or(first.clone(), |p| p.path.clone());
            let bytes = std::fs::read(file).unwrap();
            assert_eq!(
                &bytes[at as usize..(at + got.size) as usize],
                whole.tensor_data(t),
                "{}",
                t.name
            );
        }
        assert_eq!(
            f.parts.len(),
            if parts > 1 { usize::from(parts) } else { 0 }
        );
        // The order of the tensors is kept.
        let names: Vec<_> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        let want: Vec<_> = whole.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, want);
        assert_eq!(
            f.metadata.opt_str("general.architecture").unwrap(),
            Some("llama")
        );
        assert_eq!(
            f.metadata.opt_u64("split.count").unwrap(),
            Some(u64::from(parts))
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn split_err(r: tl_gguf::Result<GgufFile>) -> (PathBuf, String) {
    match r {
        Err(GgufError::Split { path, reason }) => (path, reason),
        Err(e) => panic!("not a split error: {e}"),
        Ok(_) => panic!("opened"),
    }
}

#[test]
fn bad_parts_are_errors_naming_the_part() {
    let d = dir("bad");
    let first = write_parts(&d, 3);
    let second = split_path(&first, 1, 3).unwrap();
    let third = split_path(&first, 2, 3).unwrap();

    // Opening a later part names the first.
    let (path, reason) = split_err(GgufFile::open(&second));
    assert_eq!(path, second);
    assert!(
        reason.contains("part 2 of 3") && reason.contains("m-00001-of-00003.gguf"),
        "{reason}"
    );

    // A missing part.
    std::fs::rename(&third, d.join("away.gguf")).unwrap();
    let (path, reason) = split_err(GgufFile::open(&first));
    assert_eq!(path, third);
    assert_eq!(reason, "part 3 of 3 is missing");

    // A part in the place of another: the third where the second should be.
    std::fs::rename(&second, d.join("second.gguf")).unwrap();
    std::fs::rename(d.join("away.gguf"), &second).unwrap();
    let (path, reason) = split_err(GgufFile::open(&first));
    assert_eq!(path, second);
    assert_eq!(reason, "expected part 2 of 3, the file says part 3 of 3");
    std::fs::rename(&second, &third).unwrap();
    std::fs::rename(d.join("second.gguf"), &second).unwrap();
    assert!(GgufFile::open(&first).is_ok());

    // A tensor count other than split.tensors.count.
    let mut parts = model().into_split(3).unwrap();
    parts[0].set("split.tensors.count", Value::I32(99));
    parts[0].write_file(&first).unwrap();
    let (path, reason) = split_err(GgufFile::open(&first));
    assert_eq!(path, first);
    assert_eq!(
        reason,
        "split.tensors.count is 99, the 3 parts hold 8 tensors"
    );

    // A first part that isn't named like one.
    let odd = d.join("model.gguf");
    parts[0].set("split.tensors.count", Value::I32(8));
    parts[0].write_file(&odd).unwrap();
    let (path, reason) = split_err(GgufFile::open(&odd));
    assert_eq!(path, odd);
    assert!(
        reason.contains("does not end in -00001-of-00003.gguf"),
        "{reason}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn split_paths_are_llama_cpp_s() {
    let p = Path::new("/m/qwen-7b-00001-of-00004.gguf");
    assert_eq!(
        split_path(p, 3, 4),
        Some(PathBuf::from("/m/qwen-7b-00004-of-00004.gguf"))
    );
    assert_eq!(split_path(p, 0, 3), None);
    assert_eq!(split_path(Path::new("/m/qwen.gguf"), 1, 2), None);
}
