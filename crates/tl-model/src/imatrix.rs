//! Importance matrices ("imatrix") for quantization, read as llama-quantize
//! reads them (`common/imatrix-loader.cpp` and `load_imatrix` in
//! `tools/quantize/quantize.cpp` of llama.cpp).
//!
//! An importance matrix gives, for each weight matrix a model multiplies
//! activations by, one weight per input column: the mean of the squared
//! activations that column met on some calibration text. The quantizers
//! then spend their precision where the activations are large
//! (`tl_core::quant::quantize_weighted`).
//!
//! Two file formats:
//! - GGUF (llama-imatrix's default): per matrix `<name>.in_sum2` (F32,
//!   `[n_cols, n_experts]`, the sums of squared activations) and
//!   `<name>.counts` (F32, `[1, n_experts]`, how many activations each sum
//!   has), with the keys `imatrix.datasets`, `imatrix.chunk_count` and
//!   `imatrix.chunk_size`. A weight is `in_sum2 / count`, or 1 for an
//!   expert that saw no token.
//! - The legacy `.dat` format: an `i32` entry count, then per entry the
//!   name (`i32` length and bytes), `i32` ncall, `i32` value count and the
//!   f32 values (already averaged, times ncall); optionally an `i32` chunk
//!   count and a dataset name. A weight is `value / ncall` (the value itself
//!   when ncall is 0).
//!
//! Entries are keyed by the weight's tensor name (`blk.0.attn_q.weight`);
//! an expert tensor's entry holds one run of `n_cols` weights per expert.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tl_gguf::{GgmlType, GgufFile, Value};

use crate::quantize::QuantizeError;

/// A loaded importance matrix: per-tensor column weights, normalized as
/// llama-quantize normalizes them, and where they came from.
#[derive(Clone, Default)]
pub struct Imatrix {
    /// The file as it was named on the command line (llama-quantize writes
    /// this string to `quantize.imatrix.file`).
    pub file: String,
    /// Tensor name -> weights (`n_cols * n_experts`).
    pub entries: BTreeMap<String, Vec<f32>>,
    /// Calibration data sets named by the file (the first one goes to
    /// `quantize.imatrix.dataset`).
    pub datasets: Vec<String>,
    /// Chunks of calibration text it was computed on (0: not recorded).
    pub chunk_count: i64,
    /// Read from the legacy `.dat` format.
    pub legacy: bool,
}

impl std::fmt::Debug for Imatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imatrix")
            .field("file", &self.file)
            .field("entries", &self.entries.len())
            .field("datasets", &self.datasets)
            .field("chunk_count", &self.chunk_count)
            .field("legacy", &self.legacy)
            .finish()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> QuantizeError {
    QuantizeError::Imatrix {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// A C string: the bytes up to the first NUL, as `std::string(char *)` takes them.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Imatrix {
    /// Reads the importance matrix at `path` (GGUF or legacy, told apart by
    /// the GGUF magic), normalizing the sums to weights as llama-quantize
    /// does. `file` is recorded as given.
    pub fn load(path: &Path) -> Result<Self, QuantizeError> {
        let bytes = std::fs::read(path).map_err(|err| QuantizeError::Io {
            path: path.to_owned(),
            err,
        })?;
        let mut m = if bytes.starts_with(b"GGUF") {
            Self::from_gguf(path, bytes)?
        } else {
            Self::from_legacy(path, &bytes)?
        };
        m.file = path.to_string_lossy().into_owned();
        Ok(m)
    }

    fn from_gguf(path: &Path, bytes: Vec<u8>) -> Result<Self, QuantizeError> {
        let f = GgufFile::from_bytes(bytes)
            .map_err(|e| bad(path, format!("not a readable GGUF file: {e}")))?;
        if f.tensors.is_empty() {
            return Err(bad(path, "no data (the GGUF file has no tensors)"));
        }
        let md = &f.metadata;
        let (datasets, count_key, size_key) = (
            md.get("imatrix.datasets"),
            md.get("imatrix.chunk_count"),
            md.get("imatrix.chunk_size"),
        );
        if datasets.is_none() || count_key.is_none() || size_key.is_none() {
            return Err(bad(
                path,
                "missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size): is this an importance matrix written by llama-imatrix or tl imatrix?",
            ));
        }
        let mut out = Imatrix::default();
        if let Some(Value::Array(tl_gguf::Array::String(v))) = datasets {
            out.datasets.clone_from(v);
        }
        out.chunk_count = match count_key {
            Some(Value::U32(n)) => i64::from(*n),
            Some(other) => {
                return Err(bad(
                    path,
                    format!("imatrix.chunk_count must be a u32, found {other:?}"),
                ))
            }
            None => 0,
        };

        // name -> (in_sum2, counts)
        let mut pairs: BTreeMap<String, (Option<usize>, Option<usize>)> = BTreeMap::new();
        for (i, t) in f.tensors.iter().enumerate() {
            if let Some(name) = t.name.strip_suffix(".in_sum2") {
                pairs.entry(name.to_owned()).or_default().0 = Some(i);
            } else if let Some(name) = t.name.strip_suffix(".counts") {
                pairs.entry(name.to_owned()).or_default().1 = Some(i);
            }
        }
        for (name, pair) in pairs {
            let (Some(si), Some(ci)) = pair else {
                return Err(bad(
                    path,
                    format!("entry '{name}': mismatched sums and counts (needs both {name}.in_sum2 and {name}.counts)"),
                ));
            };
            let (st, ct) = (&f.tensors[si], &f.tensors[ci]);
            if st.ty != GgmlType::F32 || ct.ty != GgmlType::F32 {
                return Err(bad(
                    path,
                    format!(
                        "entry '{name}': sums and counts must be F32, found {} and {}",
                        st.ty, ct.ty
                    ),
                ));
            }
            let sums = f32s(f.tensor_data(st));
            let counts: Vec<i64> = f32s(f.tensor_data(ct))
                .iter()
                .map(|&c| c.round() as i64)
                .collect();
            let ncounts = counts.len();
            if ncounts == 0 || !sums.len().is_multiple_of(ncounts) {
                return Err(bad(
                    path,
                    format!(
                        "entry '{name}': {} sums are not a whole number of runs for {ncounts} counts",
                        sums.len()
                    ),
                ));
            }
            let ne0 = sums.len() / ncounts;
            let mut e = vec![0f32; sums.len()];
            for (j, &c) in counts.iter().enumerate() {
                let count = c as f32;
                let run = j * ne0..(j + 1) * ne0;
                if count > 0.0 {
                    for (w, &s) in e[run.clone()].iter_mut().zip(&sums[run]) {
                        *w = s / count;
                    }
                } else {
                    e[run].fill(1.0);
                }
            }
            out.entries.insert(name, e);
        }
        Ok(out)
    }

    fn from_legacy(path: &Path, bytes: &[u8]) -> Result<Self, QuantizeError> {
        let mut r = Reader { bytes, pos: 0 };
        let not_imatrix = || {
            bad(
                path,
                "neither GGUF nor the legacy imatrix format (no data or a truncated header)",
            )
        };
        let n_entries = r.i32().ok_or_else(not_imatrix)?;
        if n_entries < 1 {
            return Err(not_imatrix());
        }
        let mut out = Imatrix {
            legacy: true,
            ..Default::default()
        };
        for i in 0..n_entries {
            let trunc = |what: &str| {
                bad(
                    path,
                    format!(
                        "entry {} of {n_entries}: {what} (truncated or not an imatrix file)",
                        i + 1
                    ),
                )
            };
            let len = r.i32().ok_or_else(|| trunc("no name length"))?;
            let len = usize::try_from(len).map_err(|_| trunc("negative name length"))?;
            let name = c_string(r.take(len).ok_or_else(|| trunc("name cut short"))?);
            let ncall = r.i32().ok_or_else(|| trunc("no call count"))?;
            let nval = r.i32().ok_or_else(|| trunc("no value count"))?;
            let nval = usize::try_from(nval)
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| trunc(&format!("entry '{name}': bad value count {nval}")))?;
            let data = r
                .take(nval.saturating_mul(4))
                .ok_or_else(|| trunc(&format!("entry '{name}': {nval} values cut short")))?;
            let sums = f32s(data);
            let e = if ncall > 0 {
                let n = i64::from(ncall) as f32;
                sums.iter().map(|&s| s / n).collect()
            } else {
                sums
            };
            out.entries.insert(name, e);
        }
        // The trailer (chunk count, dataset name) is optional.
        if let Some(n_calls) = r.i32() {
            out.chunk_count = i64::from(n_calls);
            if let Some(len) = r.i32() {
                if let Ok(len @ 1..) = usize::try_from(len) {
                    if let Some(name) = r.take(len) {
                        out.datasets.push(c_string(name));
                    }
                }
            }
        }
        Ok(out)
    }

    /// llama-quantize's `--exclude-weights` / `--include-weights`: drops
    /// the entries whose name contains any `exclude` string, or keeps only
    /// those containing an `include` string.
    pub fn filter(&mut self, include: &[String], exclude: &[String]) {
        if !exclude.is_empty() {
            self.entries
                .retain(|name, _| !exclude.iter().any(|x| name.contains(x.as_str())));
        }
        if !include.is_empty() {
            self.entries
                .retain(|name, _| include.iter().any(|x| name.contains(x.as_str())));
        }
    }

    /// Fails on the first non-finite weight, as llama.cpp does before
    /// quantizing anything.
    pub fn check_finite(&self) -> Result<(), QuantizeError> {
        for (name, e) in &self.entries {
            if let Some(i) = e.iter().position(|v| !v.is_finite()) {
                return Err(bad(
                    Path::new(&self.file),
                    format!(
                        "entry '{name}': weight {i} is {} (non-finite values are refused)",
                        e[i]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The metadata llama-quantize adds to a model quantized with this
    /// matrix, in its order: `quantize.imatrix.file`, `.dataset` (when the
    /// file names one), `.entries_count`, `.chunks_count` (when known). The
    /// strings are cut to 127 bytes, as llama-quantize's fixed buffers cut
    /// them (here at a character boundary).
    pub fn metadata(&self) -> Vec<(&'static str, Value)> {
        fn cut(s: &str) -> String {
            let mut end = s.len().min(127);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_owned()
        }
        let mut kv = vec![("quantize.imatrix.file", Value::String(cut(&self.file)))];
        if let Some(d) = self.datasets.first() {
            kv.push(("quantize.imatrix.dataset", Value::String(cut(d))));
        }
        // llama.cpp writes integer overrides as u32 of the absolute value.
        let u32_of = |n: i64| Value::U32(n.unsigned_abs() as u32);
        kv.push((
            "quantize.imatrix.entries_count",
            u32_of(self.entries.len() as i64),
        ));
        if self.chunk_count > 0 {
            kv.push(("quantize.imatrix.chunks_count", u32_of(self.chunk_count)));
        }
        kv
    }
}

/// Little-endian f32s of `bytes` (whole values only).
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A cursor over the legacy file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Writes `m`'s entries in the legacy `.dat` format (ncall 1, so the
/// weights read back unchanged), with its chunk count and first data set.
pub fn write_legacy(m: &Imatrix, path: &Path) -> Result<(), QuantizeError> {
    let mut b = Vec::new();
    b.extend((m.entries.len() as i32).to_le_bytes());
    for (name, e) in &m.entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1i32.to_le_bytes());
        b.extend((e.len() as i32).to_le_bytes());
        for v in e {
            b.extend(v.to_le_bytes());
        }
    }
    b.extend((m.chunk_count as i32).to_le_bytes());
    let ds = m.datasets.first().map(String::as_str).unwrap_or("");
    b.extend((ds.len() as i32).to_le_bytes());
    b.extend(ds.as_bytes());
    std::fs::write(path, b).map_err(|err| QuantizeError::Io {
        path: PathBuf::from(path),
        err,
    })
}

/// The sums one weight matrix (or stack of expert matrices) collects:
/// per matrix `n_cols` sums of squared input activations, and how many
/// activation rows went into each matrix's sums.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImatrixStats {
    /// `n_cols * n_mat` sums, matrix after matrix.
    pub values: Vec<f32>,
    /// One count per matrix (one for a plain weight).
    pub counts: Vec<i64>,
}

/// Gathers an importance matrix from the CPU forward, as llama-imatrix's
/// `collect_imatrix` does (`tools/imatrix/imatrix.cpp`): for each weight
/// product, the squares of its input activations summed per input column
/// in f32 (llama.cpp's `std::vector<float>`), row after row, and the
/// number of rows. As there:
/// - only weights named `blk.*` are counted, and `output.weight` with
///   `process_output` (a tied output matrix, `token_embd.weight`, never);
/// - plain products of fewer than 16 rows are skipped (llama.cpp's
///   "small batches" rule); expert products are always counted, each
///   (token, chosen expert) pair adding its row to that expert's sums;
/// - a fused matrix split into row ranges (`attn_qkv`, Phi-3's `ffn_up`)
///   is one entry, counted once per product of its input.
///
/// Installed on a runner with [`crate::generate::Runner::set_imatrix`];
/// without one the forward does no extra work.
#[derive(Clone, Debug, Default)]
pub struct ImatrixCollector {
    /// Also count the output projection (`output.weight`).
    pub process_output: bool,
    /// Tensor name -> its sums (sorted by name, as llama-imatrix sorts
    /// the entries it writes).
    pub stats: BTreeMap<String, ImatrixStats>,
}

/// A weight's tensor name without the row-range suffix that a part of a
/// fused or stacked matrix carries (`blk.0.attn_qkv.weight[q]`).
pub(crate) fn tensor_name(name: &str) -> &str {
    match name.find('[') {
        Some(i) => &name[..i],
        None => name,
    }
}

/// llama-imatrix refuses to go on after non-finite sums.
fn non_finite(name: &str) -> crate::error::ModelError {
    crate::error::ModelError::BadConfig(format!("imatrix: non-finite activations reached {name}"))
}

impl ImatrixCollector {
    pub fn new(process_output: bool) -> Self {
        ImatrixCollector {
            process_output,
            stats: BTreeMap::new(),
        }
    }

    /// Whether products with the weight named `name` are counted.
    pub fn wants(&self, name: &str) -> bool {
        let name = tensor_name(name);
        name.starts_with("blk.") || (self.process_output && name == "output.weight")
    }

    fn entry(
        &mut self,
        name: &str,
        cols: usize,
        n_mat: usize,
    ) -> crate::error::Result<&mut ImatrixStats> {
        let e = self.stats.entry(name.to_owned()).or_default();
        if e.values.is_empty() {
            e.values = vec![0.0; cols * n_mat];
            e.counts = vec![0; n_mat];
        } else if e.values.len() != cols * n_mat || e.counts.len() != n_mat {
            return Err(crate::error::ModelError::BadConfig(format!(
                "imatrix: inconsistent size for {name} ({} vs {})",
                e.values.len(),
                cols * n_mat
            )));
        }
        Ok(e)
    }

    /// A plain product `x[m, cols] · Wᵀ` with the weight named `name`.
    pub fn dense(&mut self, name: &str, x: &[f32], m: usize) -> crate::error::Result<()> {
        if m < 16 || !self.wants(name) || m == 0 {
            return Ok(());
        }
        let cols = x.len() / m;
        let name = tensor_name(name);
        let e = self.entry(name, cols, 1)?;
        for row in x[..m * cols].chunks_exact(cols) {
            for (a, v) in e.values.iter_mut().zip(row) {
                *a += v * v;
            }
        }
        e.counts[0] += m as i64;
        if !e.values.iter().all(|v| v.is_finite()) {
            return Err(non_finite(name));
        }
        Ok(())
    }

    /// Rows `x` (of `cols` each) that went into expert `expert` of the
    /// `n_expert` stacked in the tensor named `name`.
    pub fn expert(
        &mut self,
        name: &str,
        n_expert: usize,
        expert: usize,
        x: &[f32],
        cols: usize,
    ) -> crate::error::Result<()> {
        if !self.wants(name) || cols == 0 || expert >= n_expert {
            return Ok(());
        }
        let name = tensor_name(name);
        let e = self.entry(name, cols, n_expert)?;
        let acc = &mut e.values[expert * cols..(expert + 1) * cols];
        let mut rows = 0i64;
        for row in x.chunks_exact(cols) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v * v;
            }
            rows += 1;
        }
        e.counts[expert] += rows;
        if !acc.iter().all(|v| v.is_finite()) {
            return Err(non_finite(name));
        }
        Ok(())
    }

    /// Chunks the sums cover, as llama-imatrix records them: the largest
    /// count divided by the chunk size.
    pub fn chunk_count(&self, chunk_size: usize) -> i64 {
        let max = self
            .stats
            .values()
            .flat_map(|e| e.counts.iter().copied())
            .max()
            .unwrap_or(0);
        max / chunk_size.max(1) as i64
    }

    /// The file llama-imatrix writes (GGUF): `general.type` = "imatrix",
    /// `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`,
    /// then per entry (sorted by name) `<name>.in_sum2` (F32
    /// `[n_cols, n_mat]`) and `<name>.counts` (F32 `[1, n_mat]`).
    pub fn to_gguf(
        &self,
        datasets: &[String],
        chunk_size: usize,
    ) -> Result<tl_gguf::GgufWriter<'static>, QuantizeError> {
        let mut w = tl_gguf::GgufWriter::new();
        w.set("general.type", Value::String("imatrix".into()));
        w.set(
            "imatrix.datasets",
            Value::Array(tl_gguf::Array::String(datasets.to_vec())),
        );
        w.set(
            "imatrix.chunk_count",
            Value::U32(self.chunk_count(chunk_size) as u32),
        );
        w.set("imatrix.chunk_size", Value::U32(chunk_size as u32));
        let gguf_err = |e: tl_gguf::GgufError| QuantizeError::Imatrix {
            path: PathBuf::from("imatrix"),
            reason: e.to_string(),
        };
        for (name, e) in &self.stats {
            let (nval, nmat) = (e.values.len(), e.counts.len());
            if nval == 0 || nmat == 0 {
                continue;
            }
            let sums: Vec<u8> = e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let counts: Vec<u8> = e
                .counts
                .iter()
                .flat_map(|&c| (c as f32).to_le_bytes())
                .collect();
            w.add_tensor(
                format!("{name}.in_sum2"),
                vec![(nval / nmat) as u64, nmat as u64],
                GgmlType::F32,
                sums,
            )
            .map_err(gguf_err)?;
            w.add_tensor(
                format!("{name}.counts"),
                vec![1, nmat as u64],
                GgmlType::F32,
                counts,
            )
            .map_err(gguf_err)?;
        }
        Ok(w)
    }

    /// Writes the GGUF file of [`ImatrixCollector::to_gguf`] to `path`.
    pub fn write_gguf(
        &self,
        path: &Path,
        datasets: &[String],
        chunk_size: usize,
    ) -> Result<(), QuantizeError> {
        let bytes = self
            .to_gguf(datasets, chunk_size)?
            .to_bytes()
            .map_err(|e| bad(path, e.to_string()))?;
        std::fs::write(path, bytes).map_err(|err| QuantizeError::Io {
            path: path.to_owned(),
            err,
        })
    }

    /// Writes the legacy `.dat` file as llama-imatrix's
    /// `save_imatrix_legacy` does: entries with no data left out; per
    /// entry ncall = ⌈max count / chunk size⌉ and the values
    /// `sum / count · ncall` (1 · ncall for an expert that saw nothing);
    /// then the chunk count and the data set's name.
    pub fn write_legacy(
        &self,
        path: &Path,
        dataset: &str,
        chunk_size: usize,
    ) -> Result<(), QuantizeError> {
        let cs = chunk_size.max(1) as i64;
        let stored: Vec<(&String, &ImatrixStats)> = self
            .stats
            .iter()
            .filter(|(_, e)| !e.counts.is_empty() && e.counts.iter().any(|&c| c != 0))
            .collect();
        let mut b = Vec::new();
        b.extend((stored.len() as i32).to_le_bytes());
        for (name, e) in stored {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            let max = e.counts.iter().copied().max().unwrap_or(0);
            let ncall = ((max + cs - 1) / cs) as i32;
            b.extend(ncall.to_le_bytes());
            let nval = e.values.len();
            b.extend((nval as i32).to_le_bytes());
            let per = nval / e.counts.len();
            for (i, &v) in e.values.iter().enumerate() {
                let mut count = e.counts[i / per.max(1)] as f32;
                let mut value = v;
                if count == 0.0 {
                    value = 1.0;
                    count = 1.0;
                }
                b.extend(((value / count) * ncall as f32).to_le_bytes());
            }
        }
        b.extend((self.chunk_count(chunk_size) as i32).to_le_bytes());
        b.extend((dataset.len() as i32).to_le_bytes());
        b.extend(dataset.as_bytes());
        std::fs::write(path, b).map_err(|err| QuantizeError::Io {
            path: path.to_owned(),
            err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_round_trip_and_truncations() {
        let dir = std::env::temp_dir().join(format!("tl-imatrix-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join("m.dat");
        let mut m = Imatrix {
            chunk_count: 5,
            datasets: vec!["wiki.txt".into()],
            ..Default::default()
        };
        m.entries
            .insert("blk.0.attn_q.weight".into(), vec![0.5, 2.0, 3.0]);
        m.entries.insert("output.weight".into(), vec![1.0; 4]);
        assert!(write_legacy(&m, &p).is_ok());
        let back = Imatrix::load(&p).ok();
        let back = back.as_ref();
        assert_eq!(back.map(|b| b.entries.clone()), Some(m.entries.clone()));
        assert_eq!(back.map(|b| b.chunk_count), Some(5));
        assert_eq!(
            back.map(|b| b.datasets.clone()),
            Some(vec!["wiki.txt".into()])
        );
        assert_eq!(back.map(|b| b.legacy), Some(true));
        // Every truncation inside the entries is an error naming the file.
        let bytes = std::fs::read(&p).unwrap_or_default();
        let entries_end = bytes.len() - 4 - 4 - "wiki.txt".len();
        for cut in 0..entries_end {
            std::fs::write(&p, &bytes[..cut]).ok();
            let e = Imatrix::load(&p).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("m.dat")),
                "cut at {cut}: {e:?}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn collector_rules() {
        let mut c = ImatrixCollector::new(false);
        let x: Vec<f32> = (0..16 * 4).map(|i| (i % 5) as f32 - 2.0).collect();
        // Fewer than 16 rows: skipped, as llama-imatrix skips small batches.
        assert!(c.dense("blk.0.attn_q.weight", &x[..15 * 4], 15).is_ok());
        assert!(c.stats.is_empty());
        // Names outside `blk.*` (and output.weight without
        // process_output) are not collected.
        assert!(c.dense("output.weight", &x, 16).is_ok());
        assert!(c.dense("token_embd.weight", &x, 16).is_ok());
        assert!(c.stats.is_empty());
        assert!(c.dense("blk.0.attn_qkv.weight[q]", &x, 16).is_ok());
        let e = &c.stats["blk.0.attn_qkv.weight"];
        assert_eq!(e.counts, vec![16]);
        let want: Vec<f32> = (0..4)
            .map(|j| (0..16).map(|r| x[r * 4 + j] * x[r * 4 + j]).sum())
            .collect();
        assert_eq!(e.values, want);
        // Experts: one run of sums and one count per expert.
        assert!(c
            .expert("blk.0.ffn_down_exps.weight[expert 2]", 3, 2, &x[..8], 4)
            .is_ok());
        let e = &c.stats["blk.0.ffn_down_exps.weight"];
        assert_eq!(e.counts, vec![0, 0, 2]);
        assert_eq!(e.values.len(), 12);
        assert_eq!(c.chunk_count(8), 2);
        assert!(c
            .dense("blk.1.ffn_up.weight", &[f32::INFINITY; 64], 16)
            .is_err());
        c.process_output = true;
        assert!(c.dense("output.weight", &x, 16).is_ok());
        assert!(c.stats.contains_key("output.weight"));
    }

    #[test]
    fn filters_and_metadata() {
        let mut m = Imatrix {
            file: "x".repeat(200),
            ..Default::default()
        };
        for n in [
            "blk.0.attn_q.weight",
            "blk.0.ffn_down.weight",
            "output.weight",
        ] {
            m.entries.insert(n.into(), vec![1.0]);
        }
        let mut a = m.clone();
        a.filter(&[], &["ffn".into()]);
        assert_eq!(a.entries.len(), 2);
        let mut b = m.clone();
        b.filter(&["attn".into(), "output".into()], &[]);
        assert_eq!(b.entries.len(), 2);
        let kv = m.metadata();
        assert_eq!(kv.len(), 2);
        assert_eq!(kv[0].1, Value::String("x".repeat(127)));
        assert_eq!(kv[1], ("quantize.imatrix.entries_count", Value::U32(3)));
        m.entries.insert("bad".into(), vec![f32::NAN]);
        assert!(m.check_finite().is_err());
    }
}
