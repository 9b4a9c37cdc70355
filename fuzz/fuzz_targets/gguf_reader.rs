//! Fuzzes the GGUF reader: any byte string must parse or give an error,
//! never panic, hang or allocate beyond the input's size; a file that parses
//! must round-trip through the writer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tl_gguf::{GgufFile, GgufWriter};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes(data.to_vec()) {
        for t in &f.tensors {
            let _ = f.tensor_data(t);
        }
        for (_, v) in f.metadata.iter() {
            let _ = v.display_short(4);
        }
        // Compared as bytes, not values: NaN metadata never equals itself.
        if let Ok(bytes) = GgufWriter::from_file(&f).to_bytes() {
            let g = GgufFile::from_bytes(bytes.clone()).expect("written file parses");
            let again = GgufWriter::from_file(&g).to_bytes().expect("writes");
            assert!(bytes == again, "write → read → write changed the bytes");
        }
    }
});
