//! The CUDA executor: each forward stage as kernel launches on the step's
//! device buffers (see `forward.rs` for the stages, tl-cuda's
//! `kernels.cu` for the kernels).

use tl_cuda::{raw_arg, Arg, Gpu};

use super::weights::{DevMat, Kind};
use super::{cuda_err, profiling, ptr, CudaModel, CudaState, DeviceKv, MetaLayout};
use crate::attention::AttnParams;
use crate::config::{FfnAct, RopeLayout};
use crate::error::{ModelError, Result};
use crate::forward::{Exec, Probe};
use crate::kv::KvType;
use crate::model::Model;

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct RopeArgs {
    pub(super) n_heads: i32,
    pub(super) n_kv_heads: i32,
    pub(super) hd: i32,
    pub(super) n_rot: i32,
    pub(super) neox: i32,
    pub(super) base: f32,
    pub(super) eps: f32,
    pub(super) q_scale: f32,
    /// The KV cache type: 0 f16, 1 q8_0, 2 q4_0, 3 fp8.
    pub(super) kv_type: i32,
    /// Hadamard rotation block sizes of K/queries and V (`kv::rotations`).
    pub(super) k_rot: i32,
    pub(super) v_rot: i32,
    /// YaRN scaling (1 on): see `rope_head` in kernels.cu.
    pub(super) yarn: i32,
    pub(super) freq_scale: f32,
    pub(super) ext_factor: f32,
    pub(super) mscale: f32,
    pub(super) corr_lo: f32,
    pub(super) corr_hi: f32,
    /// Attention temperature (`Config::attn_temp`; scale 0: off).
    pub(super) temp_scale: f32,
    pub(super) temp_floor: i32,
}

impl RopeArgs {
    /// The YaRN fields for `n_rot` rotated values at `base` (off without
    /// YaRN), as tl-core's `rope_cache_yarn` derives them.
    pub(super) fn with_yarn(
        mut self,
        y: Option<crate::config::Yarn>,
        n_rot: usize,
        base: f32,
    ) -> Self {
        if let Some(y) = y {
            let [lo, hi] = tl_core::cpu::kernels::rope_yarn_corr_dims(
                n_rot,
                y.n_ctx_orig,
                base,
                y.beta_fast,
                y.beta_slow,
            );
            let mut mscale = y.attn_factor;
            if y.ext_factor != 0.0 {
                mscale *= 1.0 + 0.1 * (1.0 / y.freq_scale).ln();
            }
            self.yarn = 1;
            self.freq_scale = y.freq_scale;
            self.ext_factor = y.ext_factor;
            self.mscale = mscale;
            self.corr_lo = lo;
            self.corr_hi = hi;
        }
        self
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct AttnArgs {
    pub(super) n_heads: i32,
    pub(super) n_kv_heads: i32,
    pub(super) max_blocks: i32,
    pub(super) window: i32,
    pub(super) scale: f32,
    pub(super) chunk: i32,
    /// The output is rotated back by this Hadamard block (V was rotated).
    pub(super) v_rot: i32,
    /// Scores soft-capped to `tanh(s / cap) * cap` when > 0 (Gemma 2).
    pub(super) softcap: f32,
    /// A sink logit per query head (gpt-oss), or 0.
    pub(super) sinks: u64,
}

pub(super) struct CudaExec<'a> {
    pub(super) gpu: &'a Gpu,
    pub(super) cm: &'a CudaModel,
    pub(super) m: &'a Model,
    pub(super) kv: &'a DeviceKv,
    pub(super) cs: &'a mut CudaState,
    pub(super) n: usize,
    pub(super) n_out: usize,
    pub(super) stride: usize,
    pub(super) meta: u64,
    pub(super) lay: MetaLayout,
    pub(super) greedy: bool,
    /// A layer whose FFN residual add is left to the next norm kernel.
    pub(super) pending_ffn: Option<usize>,
    /// Prefill attention tiles in the step metadata (0 on decode steps).
    pub(super) n_tiles: usize,
    /// A prefill step whose attention runs on `fa_prefill` (f16 cache,
    /// head dim 64/128, not turned off): how it splits each tile's keys,
    /// (splits, keys a split). `None`: the per-row kernel.
    pub(super) fa_split: Option<(usize, usize)>,
    /// The current layer's FFN was a mixture of experts, done whole by
    /// [`Exec::ffn_gate_up`].
    pub(super) moe: bool,
    /// Every sequence of the step feeds one token (a decode step).
    pub(super) decode_shaped: bool,
}

/// How a prefill step's `fa_prefill` spreads each tile's keys over blocks,
/// as (splits, keys a split): one split while the step's `blocks` (tiles ×
/// heads) fill the card (four per multiprocessor), else enough splits of
/// at least 128 keys (whole 64-key tiles) to fill it. A 512-row chunk of
/// a 14-head model has 112 blocks, a ninth of the 1,056 an H100 runs at
/// once, and at 8k tokens of context each of them walks 8k keys.
pub(super) fn fa_split(blocks: usize, max_keys: usize, sms: usize) -> (usize, usize) {
    const BK: usize = 64;
    let target = 4 * sms.max(1);
    let key_tiles = max_keys.div_ceil(BK);
    if blocks == 0 || blocks >= target || key_tiles < 4 {
        return (1, 0);
    }
    let want = target.div_ceil(blocks).min(key_tiles / 2).min(64);
    if want <= 1 {
        return (1, 0);
    }
    // Whole tiles a split, rounded down: at least `want` splits.
    let per = (key_tiles / want) * BK;
    (max_keys.div_ceil(per), per)
}

/// Products of up to this many rows run as quantized matrix-vector
/// kernels (8 rows a launch) on 8-bit activations, and such steps are
/// captured as graphs; larger ones (prefill) dequantize the weight to f16
/// for cuBLAS.
pub(super) const GEMV_ROWS: usize = 64;

/// A prompt step's (token, expert) pairs in expert order
/// ([`CudaExec::moe_groups`]): (expert, first place, count) of each expert
/// with pairs, and the device array of each place's expert.
pub(super) struct MoeGroups {
    segs: Vec<(usize, usize, usize)>,
    expert: u64,
}

/// Positions per block of the split-KV decode attention (`chunk` of
/// kernels.cu): a 4k context is 16 blocks per (token, head) pair.
pub(super) const ATTN_CHUNK: usize = 256;

/// Products of at least this many rows (and at most `GEMV_ROWS`) run on
/// the tensor cores (`mmq_*` of kernels.cu) instead of the 8-row GEMVs;
/// `TL_CUDA_MMQ_MIN=N` moves the threshold (`TL_CUDA_MMQ_MIN=65`: off), to
/// compare the two.
pub(super) fn mmq_min_rows() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("TL_CUDA_MMQ_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(9)
    })
}

/// The chunk size of a step's attention (0: unsplit, for prefill steps,
/// which have blocks enough) and the grid's chunks per pair, enough for
/// the longest context `stride` table entries hold.
pub(super) fn attn_chunks(n: usize, stride: usize) -> (usize, usize) {
    if n > GEMV_ROWS {
        return (0, 1);
    }
    // The kernel's merge keeps every chunk's weight in shared memory (room
    // for 2048): chunks grow past 256 positions only beyond 512k.
    let positions = stride * crate::kv::BLOCK_SIZE;
    let mut chunk = ATTN_CHUNK;
    while positions.div_ceil(chunk) > 2048 {
        chunk *= 2;
    }
    (chunk, positions.div_ceil(chunk).max(1))
}

/// Whether prefill steps (more than `GEMV_ROWS` rows) attend with the
/// tensor-core `fa_prefill` kernel (f16 caches, head dims 64 and 128) or
/// with the row-per-block `attention_*` kernel (other caches and head
/// dims always): `TL_CUDA_FA=0` picks the latter, to compare the two.
pub(super) fn fa_prefill() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TL_CUDA_FA").map_or(FA_DEFAULT, |v| v != "0"))
}

/// `fa_prefill`'s default: on. Measured on an H100 (0.5B Q8_0 shape,
/// pp512 / pp2048 / pp8192): 86.6k / 73.8k / 43.5k tok/s with it against
/// 67.9k / 41.9k / 16.1k with the per-row kernel, and the GPU tests pass
/// with it (docs/BENCHMARKS.md, "Prefill attention on the tensor cores").
const FA_DEFAULT: bool = true;

/// The cache type as `RopeArgs::kv_type` gives it to the kernels.
pub(super) fn kv_type_code(ty: KvType) -> i32 {
    match ty {
        KvType::F16 => 0,
        KvType::Q8_0 => 1,
        KvType::Q4_0 => 2,
        KvType::Fp8 => 3,
    }
}

/// The suffix of the `attention_*` kernel that reads a cache of type `ty`.
/// The `gated` kernel's activation code.
pub(super) fn act_code(a: FfnAct) -> i32 {
    match a {
        FfnAct::Silu => 0,
        FfnAct::Gelu => 1,
        FfnAct::SwigluOai => 2,
    }
}

pub(super) fn attn_suffix(ty: KvType) -> &'static str {
    match ty {
        KvType::F16 => "",
        KvType::Q8_0 => "_q8_0",
        KvType::Q4_0 => "_q4_0",
        KvType::Fp8 => "_fp8",
    }
}

/// How many blocks share one row of the greedy argmax (≈1024 logits each).
pub(super) fn argmax_parts(vocab: usize) -> usize {
    vocab.div_ceil(1024).clamp(1, 128)
}

pub(super) fn grid1(n: usize, per: usize) -> (u32, u32, u32) {
    (n.div_ceil(per) as u32, 1, 1)
}

/// The device buffers a product may use besides its input and output: the
/// 8-bit activations and their scales (read, already written, by products
/// of up to `GEMV_ROWS` rows), and f16 copies of the input and the weight
/// (larger products).
#[derive(Clone, Copy)]
pub(super) struct MatScratch {
    pub(super) xq: u64,
    pub(super) xd: u64,
    pub(super) xh: u64,
    pub(super) wh: u64,
    /// The staged tensor-core products' split-K partial sums
    /// (`MMQS_PART_FLOATS` floats) and their per-tile counters
    /// (`MMQS_TILES`, zeroed); 0 when absent (no split then).
    pub(super) part: u64,
    pub(super) cnt: u64,
}

/// Whether products of 9..=64 rows take the staged tensor-core kernels
/// (`mmqs_*` of kernels.cu: operands copied into shared memory with
/// cp.async, chunks ahead) rather than the direct ones (`mmq_*`); on by
/// default, `TL_CUDA_MMQS=0` keeps the direct ones (measured on an H100,
/// 1.5B shape Q4_K/Q6_K, batch 16 / 32 / 64: 4,877 / 7,923 / 10,239 tok/s
/// against 3,922 / 5,281 / 6,340; 0.5B Q8_0 unchanged; docs/BENCHMARKS.md).
/// A step uses them when its `MatScratch::part` is set, which the model's
/// state does only when this is on and the card took their shared-memory
/// size (`mmqs_prepare`).
pub(super) fn mmqs_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TL_CUDA_MMQS").map_or(true, |v| v != "0"))
}

/// Whether prompt products (more than `GEMV_ROWS` rows) of the weight
/// kinds the staged kernels take run on them (their activations quantized
/// to 8 bits) rather than on cuBLAS after an f16 dequantization of the
/// weight: `TL_CUDA_MMQS_PREFILL=1` turns it on. Off by default: slower
/// than cuBLAS there (H100, 1.5B shape: pp512 24,377 against 34,223 tok/s,
/// pp2048 23,530 against 31,846).
pub(super) fn mmqs_prefill() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TL_CUDA_MMQS_PREFILL").is_ok_and(|v| v == "1"))
}

/// Steps of more than `GEMV_ROWS` rows and at most this many run their
/// products on the staged kernels in groups of 64 rows, like
/// `mmqs_prefill` does for every prompt. Decode steps (one token a
/// sequence) of up to `MMQS_DECODE_ROWS` always do: on an H100 a 128-row
/// decode step of the 1.5B shape gave 9,998 tok/s this way against 8,535
/// on dequantization + cuBLAS (docs/BENCHMARKS.md, 2026-12-08). Other
/// steps (prompt chunks) of up to `TL_CUDA_MMQS_ROWS` rows (default
/// `GEMV_ROWS`: none) take them too.
pub(super) const MMQS_DECODE_ROWS: usize = 128;

pub(super) fn mmqs_rows() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("TL_CUDA_MMQS_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(GEMV_ROWS)
    })
}

/// Whether weight `w` can take a staged product of rows of `k` values.
fn mmqs_fits(w: &DevMat, k: usize) -> bool {
    w.kind.has_mmq() && k.is_multiple_of(mmqs_ch(w.kind)) && w.ptrs.iter().all(|p| p % 16 == 0)
}

/// Weight rows per block of the staged products (`MMQS_ROWS`).
pub(super) const MMQS_ROWS: usize = 64;
/// Chunks in flight (`MMQS_STAGES`).
const MMQS_STAGES: usize = 3;
/// At most this many K splits, and at most this many row tiles split.
pub(super) const MMQS_SPLITS: usize = 8;
pub(super) const MMQS_TILES: usize = 256;
/// The partial-sum buffer: every split of every split tile at 64 rows.
pub(super) const MMQS_PART_FLOATS: usize = MMQS_SPLITS * GEMV_ROWS * MMQS_TILES * MMQS_ROWS;

/// K values per staged chunk (`mmqs_ch`).
fn mmqs_ch(kind: Kind) -> usize {
    match kind {
        Kind::Q4K | Kind::Q5K | Kind::Q6K => 256,
        _ => 128,
    }
}

/// `mmqs_stride` of kernels.cu.
fn mmqs_stride(b: usize) -> usize {
    match b {
        0 => 0,
        1..=7 => 4,
        8..=15 => b,
        _ if b % 32 == 16 => b,
        _ => b + 16,
    }
}

/// Dynamic shared memory of a staged product with `mt` activation rows
/// (`MMQS_STAGES · mmqs_stage_bytes` of kernels.cu).
pub(super) fn mmqs_smem(kind: Kind, mt: usize) -> usize {
    let bytes: [usize; 4] = match kind {
        Kind::Q8_0 => [128, 8, 0, 0],
        Kind::Q4_0 => [64, 8, 0, 0],
        Kind::Q5_0 => [64, 8, 16, 0],
        Kind::Q4_1 => [64, 8, 0, 8],
        Kind::Q5_1 => [64, 8, 16, 8],
        Kind::Q4K => [144, 0, 0, 0],
        Kind::Q5K => [176, 0, 0, 0],
        Kind::Q6K => [128, 2, 64, 16],
        _ => [0; 4],
    };
    let ch = mmqs_ch(kind);
    let w: usize = bytes.iter().map(|&b| MMQS_ROWS * mmqs_stride(b)).sum();
    MMQS_STAGES * (w + mt * (ch + 16) + mt * mmqs_stride(ch / 8))
}

/// Raises the staged products' shared-memory limit (once per context);
/// an error where the card allows less (they are not used then).
pub(super) fn mmqs_prepare(gpu: &Gpu) -> Result<()> {
    for kind in [
        Kind::Q8_0,
        Kind::Q4_0,
        Kind::Q5_0,
        Kind::Q4K,
        Kind::Q6K,
        Kind::Q4_1,
        Kind::Q5_1,
        Kind::Q5K,
    ] {
        gpu.set_max_smem(
            &format!("mmqs_{}", kind.suffix()),
            mmqs_smem(kind, GEMV_ROWS) as u32,
        )
        .map_err(cuda_err)?;
    }
    Ok(())
}

/// K splits of a staged product of `n` rows and `k` inputs: enough row
/// tiles × splits for two blocks per SM, each split at least two chunks.
pub(super) fn mmqs_splits(kind: Kind, n: usize, k: usize, sms: usize, have_part: bool) -> usize {
    let tiles = n.div_ceil(MMQS_ROWS);
    if !have_part || tiles > MMQS_TILES || tiles >= 2 * sms {
        return 1;
    }
    let chunks = k / mmqs_ch(kind);
    (2 * sms)
        .div_ceil(tiles)
        .min(MMQS_SPLITS)
        .min(chunks / 2)
        .max(1)
}

fn launch(
    gpu: &Gpu,
    name: &str,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[Arg],
) -> Result<()> {
    gpu.launch(name, grid, block, smem, args).map_err(cuda_err)
}

/// Warps per row of the matrix-vector kernels for weight `w`: long rows
/// are split so that each warp's share is at most ~4 iterations of its
/// unrolled loop (`units_per_row` in kernels.cu; f16 rows are read 8
/// values a lane).
fn gemv_split(w: &DevMat) -> usize {
    match w.kind.units(w.k).div_ceil(32) {
        0..=4 => 1,
        5..=8 => 2,
        _ => 4,
    }
}

/// The `n` values at `x` quantized to 8 bits (blocks of 32) into `xq`,
/// their scales into `xd`.
fn quant_q8(gpu: &Gpu, x: u64, xq: u64, xd: u64, n: usize) -> Result<()> {
    launch(
        gpu,
        "quant_q8",
        grid1(n, 256),
        256,
        0,
        &[Arg::Ptr(x), Arg::Ptr(xq), Arg::Ptr(xd), Arg::I64(n as i64)],
    )
}

/// `out[m, ..] = x[m, K] · Wᵀ` on the 8-row matrix-vector kernels, any
/// number of rows (8 a launch): f16 weights read the f32 rows `x`, the
/// others the 8-bit rows `xq` and their scales `xd`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemv_rows(
    gpu: &Gpu,
    w: &DevMat,
    x: u64,
    xq: u64,
    xd: u64,
    m: usize,
    o: u64,
    ldo: usize,
) -> Result<()> {
    let k = w.k;
    let split = gemv_split(w);
    let grid = grid1(w.n, 4 / split);
    // Up to 8 rows a launch; the launches of one weight follow each
    // other, so after the first its blocks come from L2.
    for r0 in (0..m).step_by(8) {
        let mc = (m - r0).min(8);
        let o = o + (r0 * ldo * 4) as u64;
        let mut args = vec![w.arg()];
        if w.kind == Kind::F16 {
            args.push(Arg::Ptr(x + (r0 * k * 4) as u64));
        } else {
            args.push(Arg::Ptr(xq + (r0 * k) as u64));
            args.push(Arg::Ptr(xd + (r0 * k / 32 * 4) as u64));
        }
        args.extend([
            Arg::Ptr(o),
            Arg::I32(w.n as i32),
            Arg::I32(k as i32),
            Arg::I32(ldo as i32),
            Arg::I32(split as i32),
        ]);
        launch(
            gpu,
            &format!("gemv_{}_{mc}", w.kind.suffix()),
            grid,
            128,
            0,
            &args,
        )?;
    }
    Ok(())
}

/// `out[m, ..] (row stride ldo) = x[m, K] · Wᵀ` for each matrix of
/// `mats`, their outputs side by side. Up to 8 rows, the quantized
/// products read `x` as the kernel that wrote it also left it: 8-bit
/// values in the activation buffers (`q8_args`).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_on(
    gpu: &Gpu,
    mmq_min: usize,
    staged_max: usize,
    sc: MatScratch,
    mats: &[&DevMat],
    x: u64,
    m: usize,
    out: u64,
    ldo: usize,
) -> Result<()> {
    let k = mats[0].k;
    let mut col = 0usize;
    let small = m <= GEMV_ROWS;
    let MatScratch {
        xq,
        xd,
        xh,
        wh,
        part,
        cnt,
    } = sc;
    // Prompts on the staged kernels (every matrix of the set must take
    // them): the rows quantized to 8 bits instead of converted to f16.
    let staged_prompt = !small
        && part != 0
        && mmq_min <= GEMV_ROWS
        && (mmqs_prefill() || m <= staged_max)
        && mats.iter().all(|w| mmqs_fits(w, k));
    if staged_prompt {
        quant_q8(gpu, x, xq, xd, m * k)?;
    } else if !small {
        let n = m * k;
        launch(
            gpu,
            "to_f16",
            grid1(n, 256),
            256,
            0,
            &[Arg::Ptr(x), Arg::Ptr(xh), Arg::I64(n as i64)],
        )?;
    }
    for w in mats {
        let o = out + (col * 4) as u64;
        // The tensor-core product: all m rows in one launch, each weight
        // byte read once. Narrow products split K over 2 or 4 warps so
        // that the card's SMs all have work; where a narrow product's
        // warp would still walk more than 16 blocks of K (ffn_down),
        // the GEMVs' lanes over K win (measured on an H200,
        // 0.5B shape at 64 rows: ffn_down 35.6 µs tensor-core, 19.3 µs
        // GEMV; gate_up 18.7 against 28.1).
        let blocks = w.n.div_ceil(64);
        let sms = gpu.sm_count.max(1);
        let split = if blocks < sms {
            4usize
        } else if blocks < 2 * sms {
            2
        } else {
            1
        };
        if staged_prompt || (small && part != 0 && m >= mmq_min && mmqs_fits(w, k)) {
            let tiles = w.n.div_ceil(MMQS_ROWS) as u32;
            let (grid, mt) = if staged_prompt {
                ((m.div_ceil(64) as u32, tiles, 1), 64)
            } else {
                let splits = mmqs_splits(w.kind, w.n, k, sms, part != 0);
                ((tiles, splits as u32, 1), m.div_ceil(8) * 8)
            };
            launch(
                gpu,
                &format!("mmqs_{}", w.kind.suffix()),
                grid,
                128,
                mmqs_smem(w.kind, mt) as u32,
                &[
                    w.arg(),
                    Arg::Ptr(xq),
                    Arg::Ptr(xd),
                    Arg::Ptr(o),
                    Arg::I32(w.n as i32),
                    Arg::I32(k as i32),
                    Arg::I32(ldo as i32),
                    Arg::I32(m as i32),
                    Arg::Ptr(part),
                    Arg::Ptr(cnt),
                ],
            )?;
        } else if small && m >= mmq_min && w.kind.has_mmq() && (split == 1 || k / 32 / split <= 16)
        {
            launch(
                gpu,
                &format!("mmq_{}", w.kind.suffix()),
                grid1(w.n, 64 / split),
                128,
                0,
                &[
                    w.arg(),
                    Arg::Ptr(xq),
                    Arg::Ptr(xd),
                    Arg::Ptr(o),
                    Arg::I32(w.n as i32),
                    Arg::I32(k as i32),
                    Arg::I32(ldo as i32),
                    Arg::I32(m as i32),
                    Arg::I32(split as i32),
                ],
            )?;
        } else if small {
            gemv_rows(gpu, w, x, xq, xd, m, o, ldo)?;
        } else {
            let wp = if w.kind == Kind::F16 {
                w.ptrs[0]
            } else {
                let nb = w.n * w.k / 32;
                launch(
                    gpu,
                    &format!("dequant_f16_{}", w.kind.suffix()),
                    grid1(nb, 256),
                    256,
                    0,
                    &[
                        w.arg(),
                        Arg::Ptr(wh),
                        Arg::I32(w.n as i32),
                        Arg::I32(w.k as i32),
                    ],
                )?;
                wh
            };
            gpu.gemm_f16_nt(m, w.n, k, xh, wp, o, ldo)
                .map_err(cuda_err)?;
        }
        col += w.n;
    }
    Ok(())
}

impl CudaExec<'_> {
    fn l(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        launch(self.gpu, name, grid, block, smem, args)
    }

    fn parallel(&self) -> bool {
        self.m.config.norm_placement == crate::config::NormPlacement::Parallel
    }

    fn meta_at(&self, off: usize) -> u64 {
        self.meta + (off * 4) as u64
    }

    /// `out[m, ..] (row stride ldo) = x[m, K] · Wᵀ` for each matrix of
    /// `mats` ([`matmul_on`] on this step's buffers).
    fn matmul(&self, mats: &[&DevMat], x: u64, m: usize, out: u64, ldo: usize) -> Result<()> {
        let sc = MatScratch {
            xq: ptr(&self.cs.xq),
            xd: ptr(&self.cs.xd),
            xh: ptr(&self.cs.xh),
            wh: ptr(&self.cs.wh),
            part: ptr(&self.cs.mmqs_part),
            cnt: ptr(&self.cs.mmqs_cnt),
        };
        let mmq_min = self.cm.mmq_min.load(std::sync::atomic::Ordering::Relaxed);
        let staged_max = if self.decode_shaped {
            mmqs_rows().max(MMQS_DECODE_ROWS)
        } else {
            mmqs_rows()
        };
        matmul_on(self.gpu, mmq_min, staged_max, sc, mats, x, m, out, ldo)
    }

    /// The 8-bit activation buffers as kernel arguments when this step's
    /// products take quantized activations (≤ 8 rows), else null pointers.
    fn q8_args(&self) -> [Arg; 2] {
        if self.n <= GEMV_ROWS {
            [Arg::Ptr(ptr(&self.cs.xq)), Arg::Ptr(ptr(&self.cs.xd))]
        } else {
            [Arg::Ptr(0), Arg::Ptr(0)]
        }
    }

    /// Charges the GPU time from here to the next mark to `label`.
    fn mark(&self, label: &'static str) -> Result<()> {
        if profiling() {
            self.gpu.mark(label).map_err(cuda_err)?;
        }
        Ok(())
    }

    fn norm_threads(d: usize) -> u32 {
        (d.div_ceil(32) * 32).clamp(32, 1024) as u32
    }

    /// Whether the norms are LayerNorms (1) rather than RMS norms (0), as
    /// the kernels take it.
    fn ln(&self) -> i32 {
        i32::from(self.m.config.norm == crate::config::NormKind::Layer)
    }

    /// `x += post_norm?(o) · residual_scale` (`post` 0 for none; with
    /// attention and FFN in parallel `x = (o + x) + attn_o`), then with
    /// `norm` `xn = norm(x) · w` (`Some(0)`: `xn = x`), quantized to 8
    /// bits too when `quant`.
    fn add_norm(&self, post: u64, norm: Option<u64>, quant: bool) -> Result<()> {
        let c = &self.m.config;
        let [q0, q1] = if quant {
            self.q8_args()
        } else {
            [Arg::Ptr(0), Arg::Ptr(0)]
        };
        let xn = if norm.is_none() { 0 } else { ptr(&self.cs.xn) };
        let par = if c.norm_placement == crate::config::NormPlacement::Parallel {
            ptr(&self.cs.attn_o)
        } else {
            0
        };
        self.l(
            "add_norm",
            (self.n as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::Ptr(ptr(&self.cs.o)),
                Arg::Ptr(post),
                Arg::Ptr(norm.unwrap_or(0)),
                Arg::Ptr(xn),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                q0,
                q1,
                Arg::F32(if par == 0 { c.residual_scale } else { 1.0 }),
                Arg::I32(self.ln()),
                Arg::Ptr(par),
            ],
        )
    }

    /// `x += post_ffn_norm?(o)` of layer `il`.
    fn flush_residual(&self, il: usize) -> Result<()> {
        self.add_norm(ptr(&self.cm.layers[il].post_ffn_norm), None, false)
    }

    /// Everything after the stages: the greedy argmax.
    pub(super) fn finish(&mut self) -> Result<()> {
        self.mark("argmax")?;
        let r = self.finish_argmax();
        self.mark("end")?;
        r
    }

    fn finish_argmax(&mut self) -> Result<()> {
        if self.greedy {
            let v = self.m.config.vocab;
            let parts = argmax_parts(v);
            let (pv, pi) = (ptr(&self.cs.arg_v), ptr(&self.cs.arg_i));
            self.l(
                "argmax_part",
                (parts as u32, self.n_out as u32, 1),
                256,
                0,
                &[
                    Arg::Ptr(ptr(&self.cs.logits)),
                    Arg::I32(v as i32),
                    Arg::Ptr(pv),
                    Arg::Ptr(pi),
                ],
            )?;
            self.l(
                "argmax_final",
                (self.n_out as u32, 1, 1),
                32,
                0,
                &[
                    Arg::Ptr(pv),
                    Arg::Ptr(pi),
                    Arg::I32(parts as i32),
                    Arg::Ptr(ptr(&self.cs.ids)),
                ],
            )?;
        }
        Ok(())
    }

    /// `out = norm(x) · w` per row of this step (`w` 0: a copy), quantized
    /// to 8 bits too with `q0`, `q1`.
    fn norm_rows(&self, x: u64, w: u64, out: u64, q0: Arg, q1: Arg) -> Result<()> {
        let c = &self.m.config;
        self.l(
            "rms_norm",
            (self.n as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(x),
                Arg::Ptr(w),
                Arg::Ptr(out),
                Arg::Ptr(0),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                q0,
                q1,
                Arg::I32(self.ln()),
            ],
        )
    }

    /// The gated activation of `rows` rows of `f` (gate and up side by
    /// side in `gu`), into `out`, quantized to 8 bits too with `q0`, `q1`.
    fn gated_rows(&self, gu: u64, out: u64, f: usize, rows: usize, q0: Arg, q1: Arg) -> Result<()> {
        let total = rows * f;
        let act = act_code(self.m.config.ffn_act);
        self.l(
            "gated",
            grid1(total, 256),
            256,
            0,
            &[
                Arg::Ptr(gu),
                Arg::Ptr(out),
                Arg::I32(f as i32),
                Arg::I64(total as i64),
                Arg::I32(act),
                q0,
                q1,
            ],
        )
    }

    /// One product per (token, expert) slot of the step (`gemv_*_id`):
    /// `out[slot] = x[row] · W[ids[slot]]ᵀ` with `row` the slot's token
    /// (`per_slot` false) or the slot itself; `xq`/`xd` the 8-bit rows
    /// (f32 rows `x` for f16 experts).
    #[allow(clippy::too_many_arguments)]
    fn expert_products(
        &self,
        w: &DevMat,
        ids: u64,
        per_slot: bool,
        x: u64,
        xq: u64,
        xd: u64,
        out: u64,
        ldo: usize,
    ) -> Result<()> {
        let c = &self.m.config;
        let k = w.k;
        let n_rows = w.n / c.n_expert;
        let split = gemv_split(w);
        let slots = self.n * c.n_expert_used;
        let grid = (n_rows.div_ceil(4 / split) as u32, slots as u32, 1);
        let mut args = vec![
            w.arg(),
            Arg::Ptr(ids),
            Arg::I32(c.n_expert_used as i32),
            Arg::I32(i32::from(per_slot)),
        ];
        if w.kind == Kind::F16 {
            args.push(Arg::Ptr(x));
        } else {
            args.push(Arg::Ptr(xq));
            args.push(Arg::Ptr(xd));
        }
        args.extend([
            Arg::Ptr(out),
            Arg::I32(n_rows as i32),
            Arg::I32(k as i32),
            Arg::I32(ldo as i32),
            Arg::I32(split as i32),
        ]);
        self.l(&format!("gemv_{}_id", w.kind.suffix()), grid, 128, 0, &args)
    }

    /// A mixture-of-experts FFN over the step's rows (`xn` → `o`), as the
    /// CPU's `moe_ffn`: router logits, softmax, the top experts of each
    /// token and their weights on the device (`moe_route`), each (token,
    /// expert) slot's gate/up, activation and down product reading its
    /// expert's rows in place, the weighted sum in rank order, and the
    /// shared expert (qwen2moe) behind its sigmoid gate. Nothing crosses
    /// to the host, so decode steps stay one graph.
    fn moe_ffn(&mut self, il: usize) -> Result<()> {
        self.mark("moe")?;
        let c = &self.m.config;
        let (n, d, f, k) = (self.n, c.d_model, c.ffn, c.n_expert_used);
        let (Some(mw), Some(mb)) = (&self.cm.layers[il].moe, &self.cs.moe) else {
            return Err(ModelError::Device(format!(
                "layer {il}: mixture-of-experts buffers missing"
            )));
        };
        let xn = ptr(&self.cs.xn);
        let (xq, xd) = (ptr(&self.cs.xq), ptr(&self.cs.xd));
        if n > GEMV_ROWS {
            // Small steps left xn's 8-bit copy in xq; prompts make it.
            quant_q8(self.gpu, xn, xq, xd, n * d)?;
        }
        // The router on the matrix-vector kernels at every step size: an
        // f16 or 8-bit product of f32 rows, never f16 rows (the choice of
        // experts turns on small differences between router logits).
        match &mw.router_f32 {
            Some(w) => self.l(
                "router_f32",
                (c.n_expert as u32, n as u32, 1),
                128,
                0,
                &[
                    Arg::Ptr(xn),
                    Arg::Ptr(w.ptr),
                    Arg::Ptr(mb.logits.ptr),
                    Arg::I32(d as i32),
                    Arg::I32(c.n_expert as i32),
                ],
            )?,
            None => gemv_rows(
                self.gpu,
                &mw.router,
                xn,
                xq,
                xd,
                n,
                mb.logits.ptr,
                c.n_expert,
            )?,
        }
        self.l(
            "moe_route",
            (n as u32, 1, 1),
            32,
            0,
            &[
                Arg::Ptr(mb.logits.ptr),
                Arg::Ptr(ptr(&mw.router_b)),
                Arg::I32(c.n_expert as i32),
                Arg::I32(k as i32),
                Arg::I32(i32::from(c.moe_norm_weights)),
                Arg::I32(i32::from(
                    c.moe_gating == crate::config::MoeGating::SoftmaxSelected,
                )),
                Arg::Ptr(mb.ids.ptr),
                Arg::Ptr(mb.wts.ptr),
            ],
        )?;
        let ids = mb.ids.ptr;
        let groups = self.moe_groups(il)?;
        match &groups {
            Some(g) => self.grouped_gate_up(il, g)?,
            None => {
                for (i, (w, col)) in [(&mw.gate, 0usize), (&mw.up, f)].into_iter().enumerate() {
                    let out = mb.gu.ptr + (col * 4) as u64;
                    self.expert_products(w, ids, false, xn, xq, xd, out, 2 * f)?;
                    if let Some(b) = &mw.biases {
                        self.expert_bias(out, 2 * f, b[i].ptr, ids, f)?;
                    }
                }
            }
        }
        // The shared expert's products read xn's 8-bit copy before the
        // activations below replace it.
        let shared = match (&mw.shared, &mb.sh_gu, &mb.sh_act, &mb.sh_y, &mb.sh_z) {
            (Some(s), Some(gu), Some(act), Some(y), Some(z)) => Some((s, gu, act, y, z)),
            _ => None,
        };
        if let Some((s, gu, _, _, z)) = shared {
            let mats: Vec<&DevMat> = s.gate_up.mats.iter().collect();
            self.matmul(&mats, xn, n, gu.ptr, s.gate_up.n())?;
            self.matmul(&[&s.gate_inp], xn, n, z.ptr, 1)?;
        }
        let slots = n * k;
        // Row by row: the same in expert order (grouped) as in slot order.
        self.gated_rows(
            mb.gu.ptr,
            mb.act.ptr,
            f,
            slots,
            Arg::Ptr(mb.xq.ptr),
            Arg::Ptr(mb.xd.ptr),
        )?;
        match &groups {
            Some(g) => self.grouped_down(il, g)?,
            None => {
                self.expert_products(
                    &mw.down, ids, true, mb.act.ptr, mb.xq.ptr, mb.xd.ptr, mb.y.ptr, d,
                )?;
                if let Some(b) = &mw.biases {
                    self.expert_bias(mb.y.ptr, d, b[2].ptr, ids, d)?;
                }
            }
        }
        let (mut sy, mut sz) = (0u64, 0u64);
        if let Some((s, gu, act, y, z)) = shared {
            let [q0, q1] = self.q8_args();
            self.gated_rows(gu.ptr, act.ptr, c.ffn_shared, n, q0, q1)?;
            self.matmul(&[&s.down], act.ptr, n, y.ptr, d)?;
            (sy, sz) = (y.ptr, z.ptr);
        }
        self.l(
            "moe_combine",
            (n as u32, 1, 1),
            Self::norm_threads(d),
            0,
            &[
                Arg::Ptr(mb.y.ptr),
                Arg::Ptr(mb.wts.ptr),
                Arg::I32(k as i32),
                Arg::I32(d as i32),
                Arg::Ptr(ptr(&self.cs.o)),
                Arg::Ptr(sy),
                Arg::Ptr(sz),
            ],
        )
    }

    /// A prompt step's (token, expert) pairs grouped per expert, where
    /// `moe_grouped` is on and the step is not captured (more than
    /// `GEMV_ROWS` rows): the routing result read back (one sync a MoE
    /// layer), a counting sort by expert on the host, each slot's place
    /// and each place's expert uploaded, and the step's rows gathered into
    /// expert order (`sorted`). `None`: the per-pair path.
    fn moe_groups(&self, il: usize) -> Result<Option<MoeGroups>> {
        let c = &self.m.config;
        let (n, d, k, ne) = (self.n, c.d_model, c.n_expert_used, c.n_expert);
        // (A launch's grid has at most 65,535 rows: one a pair.)
        if !self
            .cm
            .moe_grouped
            .load(std::sync::atomic::Ordering::Relaxed)
            || n <= GEMV_ROWS
            || ne == 0
            || n * k > 65_535
        {
            return Ok(None);
        }
        let (Some(mw), Some(mb)) = (&self.cm.layers[il].moe, &self.cs.moe) else {
            return Ok(None);
        };
        // Each expert's rows must be a matrix of their own that the dense
        // products' f16 scratch can hold.
        let scratch = self.cm.max_mat.max(c.vocab * c.d_model);
        for w in [&mw.gate, &mw.up, &mw.down] {
            let rows = w.n / ne;
            if w.n % ne != 0
                || rows * w.k > scratch
                || (0..ne).any(|e| w.rows_view(e * rows, rows).is_none())
            {
                return Ok(None);
            }
        }
        let slots = n * k;
        let mut raw = vec![0u8; slots * 4];
        self.gpu.dtoh(&mut raw, mb.ids.ptr).map_err(cuda_err)?;
        let mut count = vec![0usize; ne];
        let mut ids = Vec::with_capacity(slots);
        for b in raw.chunks_exact(4) {
            let e = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let e = usize::try_from(e)
                .ok()
                .filter(|&e| e < ne)
                .ok_or_else(|| ModelError::Device(format!("layer {il}: routed to expert {e}")))?;
            count[e] += 1;
            ids.push(e);
        }
        let mut start = vec![0usize; ne];
        let mut segs = Vec::new();
        let mut at = 0;
        for e in 0..ne {
            start[e] = at;
            if count[e] > 0 {
                segs.push((e, at, count[e]));
            }
            at += count[e];
        }
        let mut perm = vec![0i32; slots];
        let mut expert = vec![0i32; slots];
        for (slot, &e) in ids.iter().enumerate() {
            let j = start[e];
            start[e] += 1;
            perm[j] = slot as i32;
            expert[j] = e as i32;
        }
        let bytes: Vec<u8> = perm
            .iter()
            .chain(&expert)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        self.gpu.htod(mb.perm.ptr, &bytes).map_err(cuda_err)?;
        // The copy reads `bytes`, which ends here.
        self.gpu.sync().map_err(cuda_err)?;
        self.copy_rows(
            ptr(&self.cs.xn),
            mb.sorted.ptr,
            mb.perm.ptr,
            d,
            k,
            false,
            slots,
        )?;
        Ok(Some(MoeGroups {
            segs,
            expert: mb.perm.ptr + (slots * 4) as u64,
        }))
    }

    /// Rows through an index (`copy_rows`): gather `dst[r] = src[idx[r] /
    /// div]` or scatter `dst[idx[r]] = src[r]`, `rows` rows of `d`.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        src: u64,
        dst: u64,
        idx: u64,
        d: usize,
        div: usize,
        scatter: bool,
        rows: usize,
    ) -> Result<()> {
        self.l(
            "copy_rows",
            (d.div_ceil(256).min(8) as u32, rows as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(src),
                Arg::Ptr(dst),
                Arg::Ptr(idx),
                Arg::I32(d as i32),
                Arg::I32(div as i32),
                Arg::I32(i32::from(scatter)),
            ],
        )
    }

    /// One expert's rows of `w` (a stacked set) as a matrix.
    fn expert_view(&self, w: &DevMat, e: usize) -> Result<DevMat> {
        let rows = w.n / self.m.config.n_expert.max(1);
        w.rows_view(e * rows, rows)
            .ok_or_else(|| ModelError::Device(format!("expert {e}: no view of its rows")))
    }

    /// `m` rows at `x` (f32, width `k`) through `mats` into `out` (stride
    /// `ldo`); rows the products take as 8-bit (up to `GEMV_ROWS`) are
    /// quantized into the step's buffer first, as the norms do for decode.
    fn rows_product(
        &self,
        mats: &[&DevMat],
        x: u64,
        m: usize,
        k: usize,
        out: u64,
        ldo: usize,
    ) -> Result<()> {
        if m <= GEMV_ROWS {
            quant_q8(self.gpu, x, ptr(&self.cs.xq), ptr(&self.cs.xd), m * k)?;
        }
        self.matmul(mats, x, m, out, ldo)
    }

    /// Gate/up of each expert over its rows (in expert order) into `gu`,
    /// with gpt-oss's biases.
    fn grouped_gate_up(&self, il: usize, g: &MoeGroups) -> Result<()> {
        let c = &self.m.config;
        let (d, f) = (c.d_model, c.ffn);
        let (Some(mw), Some(mb)) = (&self.cm.layers[il].moe, &self.cs.moe) else {
            return Ok(());
        };
        for &(e, off, cnt) in &g.segs {
            let (gate, up) = (self.expert_view(&mw.gate, e)?, self.expert_view(&mw.up, e)?);
            let x = mb.sorted.ptr + (off * d * 4) as u64;
            let out = mb.gu.ptr + (off * 2 * f * 4) as u64;
            self.rows_product(&[&gate, &up], x, cnt, d, out, 2 * f)?;
        }
        if let Some(b) = &mw.biases {
            self.expert_bias(mb.gu.ptr, 2 * f, b[0].ptr, g.expert, f)?;
            self.expert_bias(mb.gu.ptr + (f * 4) as u64, 2 * f, b[1].ptr, g.expert, f)?;
        }
        Ok(())
    }

    /// Down of each expert over its activations (in expert order), then
    /// every row back to its slot in `y`.
    fn grouped_down(&self, il: usize, g: &MoeGroups) -> Result<()> {
        let c = &self.m.config;
        let (d, f, slots) = (c.d_model, c.ffn, self.n * c.n_expert_used);
        let (Some(mw), Some(mb)) = (&self.cm.layers[il].moe, &self.cs.moe) else {
            return Ok(());
        };
        for &(e, off, cnt) in &g.segs {
            let down = self.expert_view(&mw.down, e)?;
            let x = mb.act.ptr + (off * f * 4) as u64;
            let out = mb.sorted.ptr + (off * d * 4) as u64;
            self.rows_product(&[&down], x, cnt, f, out, d)?;
        }
        if let Some(b) = &mw.biases {
            self.expert_bias(mb.sorted.ptr, d, b[2].ptr, g.expert, d)?;
        }
        self.copy_rows(mb.sorted.ptr, mb.y.ptr, mb.perm.ptr, d, 1, true, slots)
    }

    /// `x[r] += b` for `rows` rows of `d`.
    fn bias_rows(&self, x: u64, b: u64, d: usize, rows: usize) -> Result<()> {
        let n = rows * d;
        self.l(
            "add_bias",
            grid1(n, 256),
            256,
            0,
            &[
                Arg::Ptr(x),
                Arg::Ptr(b),
                Arg::I32(d as i32),
                Arg::I64(n as i64),
            ],
        )
    }

    /// Each slot's expert bias (`b`: every expert's `n` values) added to
    /// its output row (`out`, stride `ld`).
    fn expert_bias(&self, out: u64, ld: usize, b: u64, ids: u64, n: usize) -> Result<()> {
        let slots = self.n * self.m.config.n_expert_used;
        self.l(
            "expert_bias",
            (slots as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(out),
                Arg::I32(ld as i32),
                Arg::Ptr(b),
                Arg::Ptr(ids),
                Arg::I32(n as i32),
            ],
        )
    }

    fn read(&self, p: u64, len: usize) -> Result<Vec<f32>> {
        super::ops::read_f32(self.gpu, p, len)
    }
}

impl Exec for CudaExec<'_> {
    fn embed(&mut self) -> Result<()> {
        self.mark("embed")?;
        let c = &self.m.config;
        let e = &self.cm.embd;
        self.l(
            &format!("embed_{}", e.kind.suffix()),
            (self.n as u32, 1, 1),
            64,
            0,
            &[
                e.arg(),
                Arg::Ptr(self.meta_at(self.lay.ids)),
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.embed_scale),
            ],
        )
    }

    fn attn_norm(&mut self, il: usize) -> Result<()> {
        self.mark("norm (+residual, q8)")?;
        let [q0, q1] = self.q8_args();
        // No pre-norm (OLMo 2): xn = x.
        let norm = ptr(&self.cm.layers[il].attn_norm);
        if let Some(pl) = self.pending_ffn.take() {
            // The previous layer's FFN residual, fused with this norm.
            return self.add_norm(ptr(&self.cm.layers[pl].post_ffn_norm), Some(norm), true);
        }
        self.norm_rows(ptr(&self.cs.x), norm, ptr(&self.cs.xn), q0, q1)
    }

    fn qkv(&mut self, il: usize) -> Result<()> {
        self.mark("matmul qkv")?;
        let mats: Vec<&DevMat> = self.cm.layers[il].qkv.mats.iter().collect();
        let ld = self.cm.layers[il].qkv.n();
        self.matmul(&mats, ptr(&self.cs.xn), self.n, ptr(&self.cs.qkv), ld)
    }

    fn rope_store_kv(&mut self, il: usize) -> Result<()> {
        self.mark("rope + kv store")?;
        let c = &self.m.config;
        let l = &self.cm.layers[il];
        let hd = c.head_dim;
        let args = RopeArgs {
            n_heads: c.n_heads as i32,
            n_kv_heads: c.n_kv_heads as i32,
            hd: hd as i32,
            // n_rot 0: no pair is rotated (NoPE layers).
            n_rot: if c.rope_in_layer(il) {
                c.rope_dims as i32
            } else {
                0
            },
            neox: i32::from(c.rope_layout == RopeLayout::Neox),
            base: c.rope_base_for(il),
            eps: c.rms_eps,
            q_scale: if c.prescale_q() { c.attn_scale } else { 1.0 },
            kv_type: kv_type_code(self.kv.ty),
            k_rot: crate::kv::rotations(self.kv.ty, hd).0 as i32,
            v_rot: crate::kv::rotations(self.kv.ty, hd).1 as i32,
            yarn: 0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            mscale: 1.0,
            corr_lo: 0.0,
            corr_hi: 0.0,
            temp_scale: c.attn_temp.map_or(0.0, |t| t.scale),
            temp_floor: c.attn_temp.map_or(1, |t| t.floor.max(1) as i32),
        }
        .with_yarn(c.rope_scaling_for(il), c.rope_dims, c.rope_base_for(il));
        let off = (il * self.kv.layer_bytes) as u64;
        let soff = (il * self.kv.layer_scale_bytes) as u64;
        // Q and K each normed as one vector (OLMo 2) before the per-head
        // kernel, which then takes no norm weights.
        // With a weight vector per head (Command-R of 64+ layers) the same
        // kernel norms each head as one part, with that head's weights.
        use crate::config::QkNorm;
        let whole = matches!(c.qk_norm, QkNorm::Whole | QkNorm::HeadWeights);
        if whole {
            let (qd, kvd) = (c.q_dim(), c.kv_dim());
            let ld = (qd + 2 * kvd) as i32;
            let (qh, kh) = if c.qk_norm == QkNorm::HeadWeights {
                (c.n_heads, c.n_kv_heads)
            } else {
                (1, 1)
            };
            for (o, parts, dd, w) in [(0, qh, qd / qh, &l.q_norm), (qd, kh, kvd / kh, &l.k_norm)] {
                self.l(
                    "norm_part",
                    (self.n as u32, parts as u32, 1),
                    Self::norm_threads(dd),
                    0,
                    &[
                        Arg::Ptr(ptr(&self.cs.qkv)),
                        Arg::I32(ld),
                        Arg::I32(o as i32),
                        Arg::I32(dd as i32),
                        Arg::Ptr(ptr(w)),
                        Arg::F32(c.rms_eps),
                        Arg::I32(self.ln()),
                    ],
                )?;
            }
        }
        let (qn, kn) = if whole {
            (0, 0)
        } else {
            (ptr(&l.q_norm), ptr(&l.k_norm))
        };
        self.l(
            "qkv_rope_store",
            (self.n as u32, (c.n_heads + c.n_kv_heads) as u32, 1),
            (hd / 2) as u32,
            ((2 * hd + 32) * 4) as u32,
            &[
                Arg::Ptr(ptr(&self.cs.qkv)),
                Arg::Ptr(ptr(&l.bq)),
                Arg::Ptr(ptr(&l.bk)),
                Arg::Ptr(ptr(&l.bv)),
                Arg::Ptr(qn),
                Arg::Ptr(kn),
                Arg::Ptr(ptr(&self.cm.rope_freqs)),
                Arg::Ptr(self.meta_at(self.lay.pos)),
                Arg::Ptr(self.meta_at(self.lay.slots)),
                Arg::Ptr(self.kv.k.ptr + off),
                Arg::Ptr(self.kv.v.ptr + off),
                Arg::Ptr(ptr(&self.kv.ks).wrapping_add(soff)),
                Arg::Ptr(ptr(&self.kv.vs).wrapping_add(soff)),
                Arg::Ptr(ptr(&self.cs.q)),
                raw_arg(&args),
            ],
        )
    }

    fn attention(&mut self, il: usize) -> Result<()> {
        self.mark("attention")?;
        let c = &self.m.config;
        let p = AttnParams::for_layer(c, il);
        let hd = c.head_dim;
        if !matches!(hd, 64 | 128 | 256) {
            return Err(ModelError::Device(format!(
                "attention kernel: head dim {hd} (64, 128 or 256 supported)"
            )));
        }
        // On the tensor cores `chunk` is keys per split, else the per-row
        // kernel's chunk.
        let fa = self.fa_split;
        let args = AttnArgs {
            n_heads: c.n_heads as i32,
            n_kv_heads: c.n_kv_heads as i32,
            max_blocks: self.stride as i32,
            window: p.window.map_or(0, |w| w as i32),
            scale: p.scale,
            chunk: match fa {
                Some((_, per)) => per as i32,
                None => attn_chunks(self.n, self.stride).0 as i32,
            },
            v_rot: crate::kv::rotations(self.kv.ty, hd).1 as i32,
            softcap: p.softcap.unwrap_or(0.0),
            sinks: ptr(&self.cm.layers[il].sinks),
        };
        let zs = attn_chunks(self.n, self.stride).1;
        let threads = 256usize;
        let groups = threads / 32 * (32 / (hd / 8));
        let smem = ((2 * groups + groups * hd) * 4) as u32;
        let off = (il * self.kv.layer_bytes) as u64;
        let soff = (il * self.kv.layer_scale_bytes) as u64;
        if let Some((splits, _)) = fa {
            let splits = splits.max(1);
            self.l(
                &format!("fa_prefill_{hd}"),
                (self.n_tiles as u32, c.n_heads as u32, splits as u32),
                128,
                0,
                &[
                    Arg::Ptr(ptr(&self.cs.q)),
                    Arg::Ptr(self.kv.k.ptr + off),
                    Arg::Ptr(self.kv.v.ptr + off),
                    Arg::Ptr(self.meta_at(self.lay.pos)),
                    Arg::Ptr(self.meta_at(self.lay.seq)),
                    Arg::Ptr(self.meta_at(self.lay.tables)),
                    Arg::Ptr(self.meta_at(self.lay.tiles)),
                    Arg::Ptr(ptr(&self.cs.att)),
                    raw_arg(&args),
                    Arg::Ptr(ptr(&self.cs.attn_part)),
                ],
            )?;
            if splits > 1 {
                self.l(
                    "fa_merge",
                    (self.n as u32, c.n_heads as u32, 1),
                    hd as u32,
                    0,
                    &[
                        Arg::Ptr(ptr(&self.cs.attn_part)),
                        Arg::Ptr(ptr(&self.cs.att)),
                        Arg::I32(c.n_heads as i32),
                        Arg::I32(hd as i32),
                        Arg::I32(splits as i32),
                        Arg::Ptr(ptr(&self.cm.layers[il].sinks)),
                    ],
                )?;
            }
            return Ok(());
        }
        let [q0, q1] = self.q8_args();
        let suffix = attn_suffix(self.kv.ty);
        self.l(
            &format!("attention_{hd}{suffix}"),
            (c.n_heads as u32, self.n as u32, zs as u32),
            threads as u32,
            smem,
            &[
                Arg::Ptr(ptr(&self.cs.q)),
                Arg::Ptr(self.kv.k.ptr + off),
                Arg::Ptr(self.kv.v.ptr + off),
                Arg::Ptr(ptr(&self.kv.ks).wrapping_add(soff)),
                Arg::Ptr(ptr(&self.kv.vs).wrapping_add(soff)),
                Arg::Ptr(self.meta_at(self.lay.pos)),
                Arg::Ptr(self.meta_at(self.lay.seq)),
                Arg::Ptr(self.meta_at(self.lay.tables)),
                Arg::Ptr(ptr(&self.cs.att)),
                raw_arg(&args),
                q0,
                q1,
                Arg::Ptr(ptr(&self.cs.attn_part)),
                Arg::Ptr(ptr(&self.cs.attn_cnt)),
            ],
        )
    }

    fn attn_out(&mut self, il: usize) -> Result<()> {
        self.mark("matmul attn_out")?;
        let w = &self.cm.layers[il].wo;
        // In parallel the attention's output waits for the FFN's.
        let out = if self.parallel() {
            ptr(&self.cs.attn_o)
        } else {
            ptr(&self.cs.o)
        };
        self.matmul(&[w], ptr(&self.cs.att), self.n, out, w.n)?;
        if let Some(bo) = &self.cm.layers[il].bo {
            self.bias_rows(out, bo.ptr, w.n, self.n)?;
        }
        Ok(())
    }

    fn attn_residual(&mut self, il: usize) -> Result<()> {
        self.mark("residual + norm")?;
        if self.parallel() {
            // The FFN reads the attention's norm, whose 8-bit copy the
            // attention output replaced: quantized again in place.
            let [q0, q1] = self.q8_args();
            let xn = ptr(&self.cs.xn);
            return self.norm_rows(xn, 0, xn, q0, q1);
        }
        let l = &self.cm.layers[il];
        self.add_norm(ptr(&l.post_attn_norm), Some(ptr(&l.ffn_norm)), true)
    }

    fn ffn_gate_up(&mut self, il: usize) -> Result<()> {
        self.moe = self.cm.layers[il].moe.is_some();
        if self.moe {
            return self.moe_ffn(il);
        }
        self.mark("matmul gate_up")?;
        let Some(gu) = &self.cm.layers[il].gate_up else {
            return Err(ModelError::Device(format!("layer {il}: no FFN weights")));
        };
        let mats: Vec<&DevMat> = gu.mats.iter().collect();
        self.matmul(&mats, ptr(&self.cs.xn), self.n, ptr(&self.cs.gu), gu.n())
    }

    fn ffn_act(&mut self) -> Result<()> {
        if self.moe {
            return Ok(());
        }
        self.mark("gated act")?;
        let c = &self.m.config;
        let total = self.n * c.ffn;
        let act = act_code(c.ffn_act);
        let [q0, q1] = self.q8_args();
        self.l(
            "gated",
            grid1(total, 256),
            256,
            0,
            &[
                Arg::Ptr(ptr(&self.cs.gu)),
                Arg::Ptr(ptr(&self.cs.act)),
                Arg::I32(c.ffn as i32),
                Arg::I64(total as i64),
                Arg::I32(act),
                q0,
                q1,
            ],
        )
    }

    fn ffn_down(&mut self, il: usize) -> Result<()> {
        self.mark("matmul down")?;
        if self.moe {
            return Ok(());
        }
        let Some(w) = &self.cm.layers[il].down else {
            return Err(ModelError::Device(format!("layer {il}: no FFN weights")));
        };
        self.matmul(&[w], ptr(&self.cs.act), self.n, ptr(&self.cs.o), w.n)
    }

    fn ffn_residual(&mut self, il: usize) -> Result<()> {
        if !crate::dump::enabled() {
            // Done by the next norm (the next layer's, or the final one).
            self.pending_ffn = Some(il);
            return Ok(());
        }
        self.flush_residual(il)
    }

    fn logits(&mut self) -> Result<()> {
        self.mark("lm head")?;
        let c = &self.m.config;
        let m = self.n_out;
        if let Some(pl) = self.pending_ffn.take() {
            self.flush_residual(pl)?;
        }
        let (q0, q1) = if m <= GEMV_ROWS {
            (ptr(&self.cs.xq), ptr(&self.cs.xd))
        } else {
            (0, 0)
        };
        self.l(
            "rms_norm",
            (m as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::Ptr(self.cm.output_norm.ptr),
                Arg::Ptr(ptr(&self.cs.hidden)),
                Arg::Ptr(self.meta_at(self.lay.out_rows)),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                Arg::Ptr(q0),
                Arg::Ptr(q1),
                Arg::I32(self.ln()),
            ],
        )?;
        let w = self.cm.output.as_ref().unwrap_or(&self.cm.embd);
        self.matmul(&[w], ptr(&self.cs.hidden), m, ptr(&self.cs.logits), c.vocab)?;
        if c.final_logit_softcap.is_some() || c.logit_mul != 1.0 {
            let total = m * c.vocab;
            self.l(
                "softcap",
                grid1(total, 256),
                256,
                0,
                &[
                    Arg::Ptr(ptr(&self.cs.logits)),
                    Arg::I64(total as i64),
                    Arg::F32(c.logit_mul),
                    Arg::F32(c.final_logit_softcap.unwrap_or(0.0)),
                ],
            )?;
        }
        Ok(())
    }

    fn dump(&mut self, what: Probe, il: Option<usize>) -> Result<()> {
        use crate::dump::write;
        let c = &self.m.config;
        let (n, d, qd, f) = (self.n, c.d_model, c.q_dim(), c.ffn);
        let cs = &*self.cs;
        let (name, p, len) = match what {
            Probe::Embd => ("embd", ptr(&cs.x), n * d),
            Probe::AttnNorm => ("attn_norm", ptr(&cs.xn), n * d),
            Probe::QkvMatmul => ("qkv-matmul", ptr(&cs.qkv), n * (qd + 2 * c.kv_dim())),
            Probe::QkvRoped => ("Qcur", ptr(&cs.q), n * qd),
            Probe::KqvOut => ("kqv_out", ptr(&cs.att), n * qd),
            Probe::AttnOut => ("attn_out", ptr(&cs.o), n * d),
            Probe::FfnInp => ("ffn_inp", ptr(&cs.x), n * d),
            Probe::FfnNorm => ("ffn_norm", ptr(&cs.xn), n * d),
            Probe::FfnGateUp => ("ffn_gate_up", ptr(&cs.gu), n * 2 * f),
            Probe::FfnAct => ("ffn_act", ptr(&cs.act), n * f),
            Probe::FfnOut => ("ffn_out", ptr(&cs.o), n * d),
            Probe::LOut => ("l_out", ptr(&cs.x), n * d),
            Probe::ResultNorm => ("result_norm", ptr(&cs.hidden), self.n_out * d),
        };
        let v = self.read(p, len)?;
        write(name, il, &v);
        Ok(())
    }
}
