//! Paged KV cache and its block manager.
//!
//! Layout: the cache is one preallocated pool of `n_blocks` blocks per layer
//! for K and another for V. A block holds [`BLOCK_SIZE`] token slots for all
//! KV heads, stored head-major: `[head][slot][dim]` as f16 (llama.cpp's
//! default cache type). A sequence owns a block table (`SeqKv::blocks`);
//! token `t` of the sequence lives in block `blocks[t / BLOCK_SIZE]`, slot
//! `t % BLOCK_SIZE`. Nothing is ever copied as a context grows: a new block
//! is taken from the free list when the last one fills.
//!
//! The block manager keeps reference counts so that blocks can be shared
//! (prefix caching, `n > 1` completions) and frees a block when its count
//! drops to zero.

use half::f16;

use crate::error::{ModelError, Result};

/// Tokens per block.
pub const BLOCK_SIZE: usize = 16;

/// Free list and reference counts of the block pool.
#[derive(Debug)]
pub struct BlockManager {
    free: Vec<u32>,
    refs: Vec<u32>,
}

impl BlockManager {
    pub fn new(n_blocks: usize) -> Self {
        BlockManager {
            // Popped from the end: hand out low ids first.
            free: (0..n_blocks as u32).rev().collect(),
            refs: vec![0; n_blocks],
        }
    }

    pub fn n_total(&self) -> usize {
        self.refs.len()
    }

    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    /// Takes a free block (reference count 1), or `None` when the pool is empty.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Adds a reference to an allocated block.
    pub fn retain(&mut self, b: u32) -> Result<()> {
        match self.refs.get_mut(b as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(ModelError::Kv(format!("retain of unallocated block {b}"))),
        }
    }

    /// Drops a reference; the block returns to the free list at zero.
    pub fn release(&mut self, b: u32) -> Result<()> {
        match self.refs.get_mut(b as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                if *r == 0 {
                    self.free.push(b);
                }
                Ok(())
            }
            _ => Err(ModelError::Kv(format!("release of unallocated block {b}"))),
        }
    }

    pub fn ref_count(&self, b: u32) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }
}

/// One sequence's view of the cache: its block table and length.
#[derive(Clone, Debug, Default)]
pub struct SeqKv {
    pub blocks: Vec<u32>,
    /// Tokens written so far.
    pub len: usize,
}

impl SeqKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes room for `n` more tokens, allocating blocks as needed. On failure
    /// nothing is allocated.
    pub fn reserve(&mut self, mgr: &mut BlockManager, n: usize) -> Result<()> {
        let need_blocks = (self.len + n).div_ceil(BLOCK_SIZE);
        let extra = need_blocks.saturating_sub(self.blocks.len());
        if extra > mgr.n_free() {
            return Err(ModelError::KvFull {
                needed: extra,
                free: mgr.n_free(),
            });
        }
        for _ in 0..extra {
            match mgr.allocate() {
                Some(b) => self.blocks.push(b),
                None => {
                    return Err(ModelError::KvFull {
                        needed: extra,
                        free: 0,
                    })
                }
            }
        }
        Ok(())
    }

    /// Returns every block to the manager.
    pub fn free(&mut self, mgr: &mut BlockManager) -> Result<()> {
        for b in self.blocks.drain(..) {
            mgr.release(b)?;
        }
        self.len = 0;
        Ok(())
    }

    /// (block, slot) of token position `t`.
    pub fn slot(&self, t: usize) -> Option<(u32, usize)> {
        self.blocks
            .get(t / BLOCK_SIZE)
            .map(|&b| (b, t % BLOCK_SIZE))
    }
}

/// The element type of the KV cache (`--kv-type`).
///
/// Quantized rows keep their values and their scales in separate pools with
/// the cache's block layout, so the attention kernels read both with plain
/// aligned loads:
/// - `q8_0`: int8 values, one f16 scale per 32 (llama.cpp's `q8_0`:
///   `d = amax / 127`, `q = round(x / d)`);
/// - `q4_0`: 4-bit values packed as llama.cpp's `q4_0` (byte `j` of a group
///   of 32 holds value `j` in its low nibble and `j + 16` in its high one),
///   one f16 scale per 32 (`d = max / -8` of the value with the largest
///   magnitude, `x = (q - 8) d`);
/// - `fp8`: FP8 E4M3 values (round to nearest even, saturating at ±448),
///   one f16 scale per head row (per token and KV head, `d = amax / 448`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
    Fp8,
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "q8_0" => Ok(KvType::Q8_0),
            "q4_0" => Ok(KvType::Q4_0),
            "fp8" | "fp8_e4m3" | "e4m3" => Ok(KvType::Fp8),
            _ => Err(format!(
                "unknown KV cache type '{s}' (expected f16, q8_0, q4_0 or fp8)"
            )),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl KvType {
    pub const ALL: [KvType; 4] = [KvType::F16, KvType::Q8_0, KvType::Q4_0, KvType::Fp8];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
            KvType::Fp8 => "fp8",
        }
    }

    /// Bytes of values in one head row of `hd` values (scales apart).
    pub fn row_bytes(self, hd: usize) -> usize {
        match self {
            KvType::F16 => 2 * hd,
            KvType::Q8_0 | KvType::Fp8 => hd,
            KvType::Q4_0 => hd / 2,
        }
    }

    /// f16 scales of one head row.
    pub fn row_scales(self, hd: usize) -> usize {
        match self {
            KvType::F16 => 0,
            KvType::Q8_0 | KvType::Q4_0 => hd / 32,
            KvType::Fp8 => 1,
        }
    }

    /// Bytes of one head row, scales included.
    pub fn row_total(self, hd: usize) -> usize {
        self.row_bytes(hd) + 2 * self.row_scales(hd)
    }

    /// Whether a head dimension can be stored in this type.
    pub fn check_head_dim(self, hd: usize) -> Result<()> {
        let ok = match self {
            KvType::F16 => true,
            KvType::Q8_0 | KvType::Q4_0 => hd.is_multiple_of(32),
            KvType::Fp8 => hd.is_multiple_of(2),
        };
        if ok {
            Ok(())
        } else {
            Err(ModelError::Kv(format!(
                "KV cache type {self} needs a head dimension divisible by 32; this model's is {hd}"
            )))
        }
    }

    /// Quantizes one head row `x` into `q` (`row_bytes`) and `d`
    /// (`row_scales`). The CUDA cache writer computes the same bytes.
    pub fn quantize_row(self, x: &[f32], q: &mut [u8], d: &mut [f16]) {
        match self {
            KvType::F16 => {
                for (c, v) in q.chunks_exact_mut(2).zip(x) {
                    c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            KvType::Q8_0 => {
                for ((xs, qs), dd) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d) {
                    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let s = amax / 127.0;
                    let id = if s != 0.0 { 1.0 / s } else { 0.0 };
                    *dd = f16::from_f32(s);
                    for (o, v) in qs.iter_mut().zip(xs) {
                        *o = (v * id).round() as i8 as u8;
                    }
                }
            }
            KvType::Q4_0 => {
                for ((xs, qs), dd) in x.chunks_exact(32).zip(q.chunks_exact_mut(16)).zip(d) {
                    let (mut amax, mut max) = (0.0f32, 0.0f32);
                    for &v in xs {
                        if amax < v.abs() {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    let s = max / -8.0;
                    let id = if s != 0.0 { 1.0 / s } else { 0.0 };
                    *dd = f16::from_f32(s);
                    let nib = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                    for (j, o) in qs.iter_mut().enumerate() {
                        *o = nib(xs[j]) | (nib(xs[j + 16]) << 4);
                    }
                }
            }
            KvType::Fp8 => {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let s = f16::from_f32(amax / 448.0);
                d[0] = s;
                let s = s.to_f32();
                let id = if s > 0.0 { 1.0 / s } else { 0.0 };
                for (o, v) in q.iter_mut().zip(x) {
                    *o = fp8_e4m3(v * id);
                }
            }
        }
    }

    /// Dequantizes one head row into `out` (`hd` values).
    pub fn dequantize_row(self, q: &[u8], d: &[f16], out: &mut [f32]) {
        match self {
            KvType::F16 => {
                for (o, c) in out.iter_mut().zip(q.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            KvType::Q8_0 => {
                for ((os, qs), dd) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).zip(d) {
                    let s = dd.to_f32();
                    for (o, &v) in os.iter_mut().zip(qs) {
                        *o = f32::from(v as i8) * s;
                    }
                }
            }
            KvType::Q4_0 => {
                for ((os, qs), dd) in out.chunks_exact_mut(32).zip(q.chunks_exact(16)).zip(d) {
                    let s = dd.to_f32();
                    for (j, &b) in qs.iter().enumerate() {
                        os[j] = f32::from((b & 15) as i8 - 8) * s;
                        os[j + 16] = f32::from((b >> 4) as i8 - 8) * s;
                    }
                }
            }
            KvType::Fp8 => {
                let s = d[0].to_f32();
                for (o, &v) in out.iter_mut().zip(q) {
                    *o = FP8_E4M3[v as usize] * s;
                }
            }
        }
    }
}

/// Rotates each block of `n` values of `x` by the orthonormal Walsh–Hadamard
/// matrix of size `n` (Sylvester's order, entries ±1/√n; it is symmetric
/// and its own inverse): a fast transform, `n log n` additions then one
/// scale. `n` is a power of two dividing `x.len()`.
pub fn hadamard(x: &mut [f32], n: usize) {
    debug_assert!(n.is_power_of_two() && x.len().is_multiple_of(n));
    let c = (1.0 / (n as f64).sqrt()) as f32;
    for b in x.chunks_exact_mut(n) {
        let mut s = 1;
        while s < n {
            for i in (0..n).step_by(2 * s) {
                for j in i..i + s {
                    let (a, d) = (b[j], b[j + s]);
                    b[j] = a + d;
                    b[j + s] = a - d;
                }
            }
            s *= 2;
        }
        for v in b.iter_mut() {
            *v *= c;
        }
    }
}

/// The rotation block sizes of a quantized cache (as llama.cpp's): K (and
/// the queries) by the largest power of two ≥ 64 dividing the head
/// dimension, V (and the attention output, rotated back) by 64; 0 where no
/// rotation applies (an f16 cache, a head dimension not a multiple of 64).
/// An orthonormal rotation leaves every Q·K product and the attention
/// output unchanged while spreading outlier channels (Qwen2's K biases)
/// over the whole block, so the quantization step of a 32-value group no
/// longer follows one huge channel. FP8 is not rotated: its error is
/// relative to each value, so an outlier costs the other channels nothing,
/// and rotating spreads the outlier's error over all of them (measured:
/// Qwen2.5-0.5B perplexity +39.8% over f16 rotated, +3.7% not; see
/// docs/BENCHMARKS.md).
pub fn rotations(ty: KvType, hd: usize) -> (usize, usize) {
    if !matches!(ty, KvType::Q8_0 | KvType::Q4_0) || !hd.is_multiple_of(64) {
        return (0, 0);
    }
    let mut k = 64;
    while hd.is_multiple_of(2 * k) {
        k *= 2;
    }
    (k, 64)
}

/// `x` as FP8 E4M3 (OCP `e4m3fn`: bias 7, no infinities), rounded to
/// nearest even and saturated at ±448. The CUDA writer (`fp8_e4m3` in
/// kernels.cu) computes the same code.
pub fn fp8_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0;
    }
    if a >= 448.0 {
        return sign | 0x7e;
    }
    if a < 0.015625 {
        // Subnormals: multiples of 2^-9 (code 8 is the smallest normal).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let e = ((a.to_bits() >> 23) as i32) - 127; // -6 ..= 8
    let mut m = (a * f32::from_bits(((127 + 3 - e) as u32) << 23)).round_ties_even() as i32; // 8 ..= 16
    let mut e = e;
    if m == 16 {
        m = 8;
        e += 1;
    }
    let code = (((e + 7) << 3) | (m - 8)) as u8;
    sign | code.min(0x7e)
}

/// The values of the 256 FP8 E4M3 codes (the two NaN codes read as 0).
pub static FP8_E4M3: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut c = 0;
    while c < 256 {
        let e = (c >> 3) & 15;
        let m = (c & 7) as u32;
        let mag = if e == 0 {
            // m * 2^-9, exact in f32.
            f32::from_bits(((127 - 9) << 23) as u32) * m as f32
        } else if e == 15 && m == 7 {
            0.0
        } else {
            f32::from_bits(((e as u32 + 120) << 23) | (m << 20))
        };
        t[c] = if c & 0x80 != 0 { -mag } else { mag };
        c += 1;
    }
    t
};

/// The rows of one KV head in one block as the attention kernels read them.
pub enum HeadRows<'a> {
    /// f16 values in place.
    F16(&'a [f16]),
    /// Values dequantized into the caller's scratch.
    F32(&'a [f32]),
}

impl HeadRows<'_> {
    #[inline]
    pub fn at(&self, i: usize) -> f32 {
        match self {
            HeadRows::F16(r) => r[i].to_f32(),
            HeadRows::F32(r) => r[i],
        }
    }
}

/// The K and V pools of every layer, in host memory or (for a model on a
/// GPU) in device memory with the same block layout.
pub struct KvCache {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_blocks: usize,
    pub kv_type: KvType,
    /// f16 pools (type f16).
    k: Vec<f16>,
    v: Vec<f16>,
    /// Quantized pools: values (`row_bytes` per head row) and scales.
    kq: Vec<u8>,
    vq: Vec<u8>,
    kd: Vec<f16>,
    vd: Vec<f16>,
    /// The rotated K and V rows of a write (quantized types).
    rot: Vec<f32>,
    /// Where each of the model's layers is stored (`NOT_HELD` for a layer
    /// the cache has no room for); empty: every layer, in order.
    layer_map: Vec<usize>,
    pub(crate) device: Option<crate::cuda::DeviceKv>,
}

/// A layer a [`KvCache`] made by [`KvCache::new_for_layers`] leaves out.
const NOT_HELD: usize = usize::MAX;

impl KvCache {
    /// Bytes one token occupies across all layers (K and V), scales included.
    pub fn bytes_per_token(
        ty: KvType,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * n_layers * n_kv_heads * ty.row_total(head_dim)
    }

    /// An f16 cache in host memory.
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        n_blocks: usize,
    ) -> Result<Self> {
        Self::new_typed(KvType::F16, n_layers, n_kv_heads, head_dim, n_blocks)
    }

    /// A cache of type `ty` in host memory.
    pub fn new_typed(
        ty: KvType,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        n_blocks: usize,
    ) -> Result<Self> {
        ty.check_head_dim(head_dim)?;
        let rows = n_layers
            .checked_mul(n_blocks)
            .and_then(|x| x.checked_mul(n_kv_heads * BLOCK_SIZE))
            .ok_or_else(|| ModelError::Kv("cache size overflows".into()))?;
        let mut c = KvCache {
            n_layers,
            n_kv_heads,
            head_dim,
            n_blocks,
            kv_type: ty,
            k: Vec::new(),
            v: Vec::new(),
            kq: Vec::new(),
            vq: Vec::new(),
            kd: Vec::new(),
            vd: Vec::new(),
            rot: Vec::new(),
            layer_map: Vec::new(),
            device: None,
        };
        let bytes = rows.saturating_mul(2 * ty.row_total(head_dim));
        let oom = || ModelError::Kv(format!("cannot allocate {bytes} bytes of KV cache"));
        fn zeroed<T: Clone>(v: &mut Vec<T>, n: usize, z: T) -> std::result::Result<(), ()> {
            v.try_reserve_exact(n).map_err(|_| ())?;
            v.resize(n, z);
            Ok(())
        }
        if ty == KvType::F16 {
            let n = rows * head_dim;
            zeroed(&mut c.k, n, f16::ZERO)
                .and_then(|_| zeroed(&mut c.v, n, f16::ZERO))
                .map_err(|_| oom())?;
        } else {
            let (nq, nd) = (
                rows * ty.row_bytes(head_dim),
                rows * ty.row_scales(head_dim),
            );
            zeroed(&mut c.kq, nq, 0)
                .and_then(|_| zeroed(&mut c.vq, nq, 0))
                .and_then(|_| zeroed(&mut c.kd, nd, f16::ZERO))
                .and_then(|_| zeroed(&mut c.vd, nd, f16::ZERO))
                .map_err(|_| oom())?;
        }
        Ok(c)
    }

    /// A host cache of type `ty` with room for the layers `il` where
    /// `held[il]` only (`held.len()` is the model's layer count): the
    /// self-speculation draft, which runs a subset of the layers, keeps K
    /// and V of those alone. A forward that runs a layer left out fails
    /// (see [`KvCache::holds_layer`]).
    pub fn new_for_layers(
        ty: KvType,
        held: &[bool],
        n_kv_heads: usize,
        head_dim: usize,
        n_blocks: usize,
    ) -> Result<Self> {
        let n_held = held.iter().filter(|&&h| h).count();
        let mut c = Self::new_typed(ty, n_held, n_kv_heads, head_dim, n_blocks)?;
        let mut next = 0;
        c.layer_map = held
            .iter()
            .map(|&h| {
                if h {
                    next += 1;
                    next - 1
                } else {
                    NOT_HELD
                }
            })
            .collect();
        c.n_layers = held.len();
        Ok(c)
    }

    /// Whether the cache has room for layer `il`'s K and V.
    pub fn holds_layer(&self, il: usize) -> bool {
        if self.layer_map.is_empty() {
            il < self.n_layers
        } else {
            self.layer_map.get(il).is_some_and(|&m| m != NOT_HELD)
        }
    }

    /// Layers the cache has room for.
    pub fn held_layers(&self) -> usize {
        (0..self.n_layers)
            .filter(|&il| self.holds_layer(il))
            .count()
    }

    /// Bytes of the host pools (K and V, scales included); 0 for a cache
    /// in device memory.
    pub fn host_bytes(&self) -> usize {
        (self.k.len() + self.v.len() + self.kd.len() + self.vd.len()) * 2
            + self.kq.len()
            + self.vq.len()
    }

    /// A cache whose pools live in device memory.
    pub(crate) fn new_on_device(
        ty: KvType,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        n_blocks: usize,
        device: crate::cuda::DeviceKv,
    ) -> Result<Self> {
        Ok(KvCache {
            n_layers,
            n_kv_heads,
            head_dim,
            n_blocks,
            kv_type: ty,
            k: Vec::new(),
            v: Vec::new(),
            kq: Vec::new(),
            vq: Vec::new(),
            kd: Vec::new(),
            vd: Vec::new(),
            rot: Vec::new(),
            layer_map: Vec::new(),
            device: Some(device),
        })
    }

    /// Whether the pools are in host memory (readable by the CPU kernels).
    pub fn is_host(&self) -> bool {
        self.device.is_none()
    }

    /// This cache, if its pools are in host memory.
    pub fn host(&self) -> Result<&Self> {
        match self.device {
            None => Ok(self),
            Some(_) => Err(ModelError::Kv(
                "this KV cache is in GPU memory; the CPU kernels cannot read it".into(),
            )),
        }
    }

    /// This cache, mutably, if its pools are in host memory.
    pub fn host_mut(&mut self) -> Result<&mut Self> {
        self.host()?;
        Ok(self)
    }

    /// The K/query and V/output rotation block sizes of this cache
    /// ([`rotations`]).
    pub fn rotations(&self) -> (usize, usize) {
        rotations(self.kv_type, self.head_dim)
    }

    pub fn block_elems(&self) -> usize {
        self.n_kv_heads * BLOCK_SIZE * self.head_dim
    }

    /// Index of the first head row of `head` in `block` of `layer`.
    fn head_row(&self, layer: usize, block: u32, head: usize) -> usize {
        // A layer left out maps past the pools: the forward checks
        // `holds_layer` first, so only a bug reaches the bounds check.
        let layer = if self.layer_map.is_empty() {
            layer
        } else {
            self.layer_map.get(layer).copied().unwrap_or(NOT_HELD)
        };
        ((layer.wrapping_mul(self.n_blocks) + block as usize) * self.n_kv_heads + head)
            .wrapping_mul(BLOCK_SIZE)
    }

    /// Writes one token's K and V rows (`n_kv_heads * head_dim` values each,
    /// head-major) into `block`/`slot` of `layer` (a quantized cache rotates
    /// them first, see [`rotations`]).
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, k_row: &[f32], v_row: &[f32]) {
        let hd = self.head_dim;
        let ty = self.kv_type;
        let (rb, rs) = (ty.row_bytes(hd), ty.row_scales(hd));
        let (kr, vr) = self.rotations();
        // Rotated copies of both rows in a buffer kept between calls
        // (`rotations` gives both blocks or neither).
        let mut rot = std::mem::take(&mut self.rot);
        let (k_row, v_row) = if kr > 0 {
            rot.clear();
            rot.extend_from_slice(k_row);
            rot.extend_from_slice(v_row);
            let (k, v) = rot.split_at_mut(k_row.len());
            hadamard(k, kr);
            hadamard(v, vr);
            (&k[..], &v[..])
        } else {
            (k_row, v_row)
        };
        for h in 0..self.n_kv_heads {
            let row = self.head_row(layer, block, h) + slot;
            let (ks, vs) = (&k_row[h * hd..(h + 1) * hd], &v_row[h * hd..(h + 1) * hd]);
            if ty == KvType::F16 {
                let dst = row * hd;
                for (d, s) in self.k[dst..dst + hd].iter_mut().zip(ks) {
                    *d = f16::from_f32(*s);
                }
                for (d, s) in self.v[dst..dst + hd].iter_mut().zip(vs) {
                    *d = f16::from_f32(*s);
                }
            } else {
                ty.quantize_row(
                    ks,
                    &mut self.kq[row * rb..(row + 1) * rb],
                    &mut self.kd[row * rs..(row + 1) * rs],
                );
                ty.quantize_row(
                    vs,
                    &mut self.vq[row * rb..(row + 1) * rb],
                    &mut self.vd[row * rs..(row + 1) * rs],
                );
            }
        }
        self.rot = rot;
    }

    /// K of one head in one block of an f16 cache: `BLOCK_SIZE` rows of
    /// `head_dim` (empty for a quantized cache; see [`Self::k_rows`]).
    pub fn k_head(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        self.f16_head(&self.k, layer, block, head)
    }

    /// V of one head in one block of an f16 cache, as [`Self::k_head`].
    pub fn v_head(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        self.f16_head(&self.v, layer, block, head)
    }

    fn f16_head<'a>(&self, pool: &'a [f16], layer: usize, block: u32, head: usize) -> &'a [f16] {
        let s = self.head_row(layer, block, head) * self.head_dim;
        pool.get(s..s + BLOCK_SIZE * self.head_dim).unwrap_or(&[])
    }

    /// K rows of one head in one block: in place for f16, dequantized into
    /// `scratch` (rows `slots`) otherwise.
    pub fn k_rows<'a>(
        &'a self,
        layer: usize,
        block: u32,
        head: usize,
        slots: std::ops::Range<usize>,
        scratch: &'a mut Vec<f32>,
    ) -> HeadRows<'a> {
        self.rows(false, layer, block, head, slots, scratch)
    }

    /// V rows of one head in one block, as [`Self::k_rows`].
    pub fn v_rows<'a>(
        &'a self,
        layer: usize,
        block: u32,
        head: usize,
        slots: std::ops::Range<usize>,
        scratch: &'a mut Vec<f32>,
    ) -> HeadRows<'a> {
        self.rows(true, layer, block, head, slots, scratch)
    }

    fn rows<'a>(
        &'a self,
        is_v: bool,
        layer: usize,
        block: u32,
        head: usize,
        slots: std::ops::Range<usize>,
        scratch: &'a mut Vec<f32>,
    ) -> HeadRows<'a> {
        let ty = self.kv_type;
        if ty == KvType::F16 {
            return HeadRows::F16(if is_v {
                self.v_head(layer, block, head)
            } else {
                self.k_head(layer, block, head)
            });
        }
        scratch.resize(BLOCK_SIZE * self.head_dim, 0.0);
        self.dequantize_rows(is_v, layer, block, head, slots, scratch);
        HeadRows::F32(scratch)
    }

    /// Dequantizes rows `slots` of one head in one block of a quantized
    /// cache into `out` (`BLOCK_SIZE * head_dim`, row `s` at `s * head_dim`).
    pub fn dequantize_rows(
        &self,
        is_v: bool,
        layer: usize,
        block: u32,
        head: usize,
        slots: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let (ty, hd) = (self.kv_type, self.head_dim);
        let (q, d) = if is_v {
            (&self.vq, &self.vd)
        } else {
            (&self.kq, &self.kd)
        };
        let (rb, rs) = (ty.row_bytes(hd), ty.row_scales(hd));
        let r0 = self.head_row(layer, block, head);
        for s in slots {
            let row = r0 + s;
            ty.dequantize_row(
                &q[row * rb..(row + 1) * rb],
                &d[row * rs..(row + 1) * rs],
                &mut out[s * hd..(s + 1) * hd],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_refcounts() {
        let mut m = BlockManager::new(3);
        let a = m.allocate().expect("free");
        let b = m.allocate().expect("free");
        assert_eq!((a, b, m.n_free()), (0, 1, 1));
        m.retain(a).expect("allocated");
        m.release(a).expect("allocated");
        assert_eq!(m.n_free(), 1, "still referenced once");
        m.release(a).expect("allocated");
        assert_eq!(m.n_free(), 2);
        assert!(m.release(a).is_err(), "double free is an error");
        assert!(m.retain(7).is_err());
    }

    #[test]
    fn sequences_grow_block_by_block_and_fail_cleanly() {
        let mut m = BlockManager::new(4);
        let mut s = SeqKv::new();
        s.reserve(&mut m, 17).expect("fits");
        assert_eq!(s.blocks.len(), 2);
        s.len = 17;
        s.reserve(&mut m, 15).expect("fits in the 2nd block");
        assert_eq!(s.blocks.len(), 2);
        let err = s.reserve(&mut m, 100).expect_err("too big");
        assert!(matches!(err, ModelError::KvFull { .. }));
        assert_eq!(m.n_free(), 2, "a failed reserve allocates nothing");
        assert_eq!(s.slot(16), Some((s.blocks[1], 0)));
        s.free(&mut m).expect("frees");
        assert_eq!(m.n_free(), 4);
    }

    #[test]
    fn writes_land_in_their_slots() {
        let mut c = KvCache::new(2, 2, 4, 3).expect("alloc");
        let k: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let v: Vec<f32> = (0..8).map(|x| -(x as f32)).collect();
        c.write(1, 2, 5, &k, &v);
        let kh = c.k_head(1, 2, 1);
        assert_eq!(
            kh[5 * 4..6 * 4]
                .iter()
                .map(|x| x.to_f32())
                .collect::<Vec<_>>(),
            [4.0, 5.0, 6.0, 7.0]
        );
        let vh = c.v_head(1, 2, 0);
        assert_eq!(vh[5 * 4].to_f32(), -0.0);
        assert_eq!(vh[5 * 4 + 3].to_f32(), -3.0);
        assert!(
            c.k_head(0, 2, 1).iter().all(|x| x.to_f32() == 0.0),
            "other layer untouched"
        );
    }

    /// A deterministic spread of values: magnitudes over several octaves,
    /// both signs, exact ties of the largest magnitude.
    fn sample_rows(n: usize) -> Vec<Vec<f32>> {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut rows: Vec<Vec<f32>> = (0..n)
            .map(|r| {
                let scale = 2f32.powi(r as i32 % 12 - 6);
                (0..64).map(|_| rnd() * scale).collect()
            })
            .collect();
        rows.push(vec![0.0; 64]);
        let mut tie = vec![0.25f32; 64];
        tie[3] = -1.0;
        tie[7] = 1.0;
        tie[40] = 1.0;
        tie[33] = -1.0;
        rows.push(tie);
        rows
    }

    /// q8_0 and q4_0 rows hold exactly llama.cpp's block bytes (tl-core's
    /// quantizers, which the committed llama.cpp fixtures check), values
    /// and scales in their separate pools.
    #[test]
    fn legacy_quant_rows_are_llama_cpp_blocks() {
        use tl_core::GgmlType;
        for (ty, g, qb) in [
            (KvType::Q8_0, GgmlType::Q8_0, 32),
            (KvType::Q4_0, GgmlType::Q4_0, 16),
        ] {
            for x in sample_rows(40) {
                let mut q = vec![0u8; ty.row_bytes(64)];
                let mut d = vec![f16::ZERO; ty.row_scales(64)];
                ty.quantize_row(&x, &mut q, &mut d);
                let mut blocks = vec![0u8; 2 * (2 + qb)];
                tl_core::quant::quantize(g, &x, &mut blocks).expect("quantize");
                for b in 0..2 {
                    let blk = &blocks[b * (2 + qb)..(b + 1) * (2 + qb)];
                    assert_eq!(d[b].to_le_bytes(), [blk[0], blk[1]], "{ty} scale");
                    assert_eq!(&q[b * qb..(b + 1) * qb], &blk[2..], "{ty} values");
                }
                let mut back = vec![0.0f32; 64];
                ty.dequantize_row(&q, &d, &mut back);
                let mut want = vec![0.0f32; 64];
                tl_core::quant::dequantize(g, &blocks, &mut want).expect("dequantize");
                assert_eq!(back, want, "{ty} dequantized");
            }
        }
    }

    /// Every finite E4M3 code decodes and encodes back to itself, and the
    /// encoder picks the nearest code (ties to the even one), saturating.
    #[test]
    fn fp8_e4m3_round_trips_and_rounds_to_nearest() {
        for c in 0..=255u8 {
            if c & 0x7f == 0x7f {
                continue; // NaN
            }
            let v = FP8_E4M3[c as usize];
            let back = fp8_e4m3(v);
            if v == 0.0 {
                assert_eq!(back & 0x7f, 0);
            } else {
                assert_eq!(back, c, "code {c:#x} = {v}");
            }
        }
        assert_eq!(FP8_E4M3[0x7e], 448.0);
        assert_eq!(FP8_E4M3[0x01], 2f32.powi(-9));
        assert_eq!(FP8_E4M3[0x08], 2f32.powi(-6));
        assert_eq!(fp8_e4m3(1e9), 0x7e);
        assert_eq!(fp8_e4m3(-500.0), 0xfe);
        let finite: Vec<f32> = (0..=0x7eu8).map(|c| FP8_E4M3[c as usize]).collect();
        for x in sample_rows(24).into_iter().flatten() {
            let x = x * 300.0;
            let got = FP8_E4M3[fp8_e4m3(x) as usize];
            let best = finite
                .iter()
                .map(|v| (v - x.abs()).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((got.abs() - x.abs()).abs(), best, "{x} -> {got}");
            assert!(got == 0.0 || got.signum() == x.signum());
        }
        // Halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1): even.
        assert_eq!(FP8_E4M3[fp8_e4m3(1.0625) as usize], 1.0);
        assert_eq!(FP8_E4M3[fp8_e4m3(1.1875) as usize], 1.25);
    }

    /// Each type's round trip error is within its step: half a quantization
    /// step of the row's or group's scale.
    #[test]
    fn quantized_rows_round_trip_within_their_step() {
        for ty in KvType::ALL {
            for x in sample_rows(30) {
                let mut q = vec![0u8; ty.row_bytes(64)];
                let mut d = vec![f16::ZERO; ty.row_scales(64)];
                ty.quantize_row(&x, &mut q, &mut d);
                let mut back = vec![0.0f32; 64];
                ty.dequantize_row(&q, &d, &mut back);
                for (g, (xs, bs)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (a, b) in xs.iter().zip(bs) {
                        let err = (a - b).abs();
                        let bound = match ty {
                            KvType::F16 => a.abs() * 2f32.powi(-11) + 1e-7,
                            // Half a step of d = amax/127, d rounded to f16.
                            KvType::Q8_0 => amax / 127.0 * 0.502 + amax * 2e-3,
                            // A step of d = amax/8 (the negative side of the
                            // range is one step longer), d rounded to f16.
                            KvType::Q4_0 => amax / 8.0 * 1.01,
                            // Relative 2^-4 (3 mantissa bits) of the value,
                            // or the subnormal step of the row's scale.
                            KvType::Fp8 => a.abs() / 16.0 + d[0].to_f32() * 2f32.powi(-9),
                        };
                        assert!(err <= bound, "{ty} group {g}: {a} -> {b}");
                    }
                }
            }
        }
    }

    /// A quantized cache stores and reads back rows at their slots.
    #[test]
    fn quantized_cache_rows_land_in_their_slots() {
        for ty in [KvType::Q8_0, KvType::Q4_0, KvType::Fp8] {
            let mut c = KvCache::new_typed(ty, 2, 2, 32, 3).expect("alloc");
            let k: Vec<f32> = (0..64).map(|x| x as f32 / 8.0).collect();
            let v: Vec<f32> = (0..64).map(|x| -(x as f32) / 8.0).collect();
            c.write(1, 2, 5, &k, &v);
            let mut buf = Vec::new();
            let kr = c.k_rows(1, 2, 1, 5..6, &mut buf);
            let got: Vec<f32> = (0..32).map(|d| kr.at(5 * 32 + d)).collect();
            for (g, w) in got.iter().zip(&k[32..]) {
                // Within a q4_0 step of the largest value (7.875 / 8).
                assert!((g - w).abs() <= 1.0, "{ty}");
            }
            let vr = c.v_rows(1, 2, 0, 5..6, &mut buf);
            assert!((vr.at(5 * 32 + 31) - v[31]).abs() < 0.3, "{ty}");
            let mut other = Vec::new();
            let z = c.k_rows(0, 2, 1, 0..16, &mut other);
            assert!(
                (0..16 * 32).all(|i| z.at(i) == 0.0),
                "other layer untouched"
            );
        }
        assert!(KvCache::new_typed(KvType::Q8_0, 1, 1, 48, 1).is_err());
    }

    /// The fast transform is the product with Sylvester's orthonormal
    /// Hadamard matrix (llama.cpp's `ggml_gen_hadamard`), which is its own
    /// inverse; and the block sizes follow llama.cpp's choice.
    #[test]
    fn hadamard_is_the_sylvester_matrix_and_its_own_inverse() {
        for n in [64usize, 128, 256] {
            let mut h = vec![0.0f64; n * n];
            h[0] = 1.0 / (n as f64).sqrt();
            let mut s = 1;
            while s < n {
                for i in 0..s {
                    for j in 0..s {
                        let v = h[i * n + j];
                        h[(i + s) * n + j] = v;
                        h[i * n + j + s] = v;
                        h[(i + s) * n + j + s] = -v;
                    }
                }
                s *= 2;
            }
            let x: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut y = x.clone();
            hadamard(&mut y, n);
            for b in 0..2 {
                for i in 0..n {
                    let want: f64 = (0..n).map(|j| h[i * n + j] * f64::from(x[b * n + j])).sum();
                    assert!(
                        (f64::from(y[b * n + i]) - want).abs() < 1e-4,
                        "n {n} row {i}"
                    );
                }
            }
            hadamard(&mut y, n);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-4);
            }
        }
        assert_eq!(rotations(KvType::Q8_0, 64), (64, 64));
        assert_eq!(rotations(KvType::Q4_0, 128), (128, 64));
        assert_eq!(rotations(KvType::Q8_0, 256), (256, 64));
        assert_eq!(rotations(KvType::Q8_0, 192), (64, 64));
        assert_eq!(rotations(KvType::Q8_0, 96), (0, 0));
        assert_eq!(rotations(KvType::F16, 128), (0, 0));
        assert_eq!(rotations(KvType::Fp8, 128), (0, 0));
    }
}
