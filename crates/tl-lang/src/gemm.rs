//! f32 matrix products for the language's tensor equations and gradients:
//! `C[b] = A[b] · B[b]` over a batch, each operand a strided view (any row
//! and column stride, one offset per batch entry), so that an operand laid
//! out as `[k, m]`, `[n, k]` or with its batch axes between its rows is read
//! where it lies instead of being copied into `[batch, rows, summed]`
//! order first. The result is written through strides too, so it can land
//! directly in the layout the equation's left side asks for.
//!
//! Blocked as usual: `B` is packed in panels of [`NR`] columns and `A` in
//! panels of [`MR`] rows (zero-padded at the edges), and a micro-kernel
//! keeps an `MR × NR` tile of `C` in registers over a block of up to [`KC`]
//! summed indices. The micro-kernel is chosen at run time: AVX-512F (one
//! 16-lane register per tile row), AVX2 with FMA (two 8-lane registers per
//! row), or portable scalar code. The summation order within a dot product
//! is the same for every run on a given machine, so results are
//! deterministic.

/// Rows of a tile.
pub const MR: usize = 6;
/// Columns of a tile.
pub const NR: usize = 16;
/// Summed indices per block (so a packed panel of `B` stays in cache).
pub const KC: usize = 256;

/// A strided view of one operand: entry `(r, c)` of batch entry `b` is
/// `data[offs[b] + r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub offs: &'a [usize],
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    /// Whether every entry of an `r × c` view of each batch lies in `data`.
    fn fits(&self, r: usize, c: usize) -> bool {
        if r == 0 || c == 0 {
            return true;
        }
        let span = (r - 1)
            .checked_mul(self.rs)
            .and_then(|x| (c - 1).checked_mul(self.cs)?.checked_add(x));
        self.offs.iter().all(|&o| {
            span.and_then(|s| s.checked_add(o))
                .is_some_and(|last| last < self.data.len())
        })
    }
}

/// Where the result goes: entry `(i, j)` of batch entry `b` is
/// `data[offs[b] + i * rs + j * cs]`.
pub struct Out<'a, 'b> {
    pub data: &'a mut [f32],
    pub offs: &'b [usize],
    pub rs: usize,
    pub cs: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Scalar
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Scalar
    }
}

/// `C[b] = A[b] · B[b]` (or `C[b] += A[b] · B[b]` with `accumulate`) for
/// every batch entry `b`, with `A[b]` of `m × k` and `B[b]` of `k × n`.
/// The batch size is `a.offs.len()`; `b.offs` and `c.offs` must be as long.
/// `None` (and `C` untouched) when a view does not fit its data or the
/// batch lengths differ. The output entries of different batch entries
/// must not overlap unless `accumulate` is set.
///
/// Products of [`PAR_MIN`] multiply-adds or more are split over the
/// process's thread pool (`tl run -t N`) by rows or columns of the output,
/// never over the summed index: every entry is computed as on one thread,
/// to the bit.
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    b: View<'_>,
    c: Out<'_, '_>,
    accumulate: bool,
) -> Option<()> {
    let pool = tl_core::pool::ThreadPool::global();
    gemm_on(pool, PAR_MIN, m, n, k, a, b, c, accumulate)
}

/// [`gemm`] on the threads of `pool`, splitting products of `min_work`
/// multiply-adds or more.
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    pool: &tl_core::pool::ThreadPool,
    min_work: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    b: View<'_>,
    c: Out<'_, '_>,
    accumulate: bool,
) -> Option<()> {
    let nb = a.offs.len();
    if b.offs.len() != nb || c.offs.len() != nb {
        return None;
    }
    let cv = View {
        data: c.data,
        offs: c.offs,
        rs: c.rs,
        cs: c.cs,
    };
    if !a.fits(m, k) || !b.fits(k, n) || !cv.fits(m, n) {
        return None;
    }
    if m == 0 || n == 0 {
        return Some(());
    }
    let Out {
        data: cdata,
        offs: coffs,
        rs: rsc,
        cs: csc,
    } = c;
    if k == 0 {
        if !accumulate {
            for &co in coffs {
                for i in 0..m {
                    for j in 0..n {
                        cdata[co + i * rsc + j * csc] = 0.0;
                    }
                }
            }
        }
        return Some(());
    }
    let threads = pool.threads();
    let work = m.saturating_mul(n).saturating_mul(k).saturating_mul(nb);
    // Different batch entries may add into the same output only when
    // they all write the same place (then every part owns whole rows or
    // columns of it in every batch entry).
    let disjoint = !accumulate || coffs.windows(2).all(|w| w[0] == w[1]);
    if threads > 1 && work >= min_work && disjoint {
        // Split the output's rows (or columns, when it is wider than
        // tall) into one run of whole tiles per thread; each part is the
        // same product on a narrower view, computed element by element
        // as the whole would be (the same bits).
        let rows = m >= n;
        let (len, unit) = if rows { (m, MR) } else { (n, NR) };
        // A few parts per thread: the calling thread takes over the parts
        // of a worker that is late (the cores may be shared).
        let per = len.div_ceil(threads * 4).div_ceil(unit).max(1) * unit;
        let parts = len.div_ceil(per);
        if parts > 1 {
            let out = RawOut {
                ptr: cdata.as_mut_ptr(),
                len: cdata.len(),
            };
            let failed = std::sync::atomic::AtomicBool::new(false);
            pool.run(parts, &|t| {
                let s = t * per;
                let e = (s + per).min(len);
                let shift = |offs: &[usize], by: usize| -> Vec<usize> {
                    offs.iter().map(|&o| o + s * by).collect()
                };
                let (ao, bo, co) = if rows {
                    (shift(a.offs, a.rs), b.offs.to_vec(), shift(coffs, rsc))
                } else {
                    (a.offs.to_vec(), shift(b.offs, b.cs), shift(coffs, csc))
                };
                let (mp, np) = if rows { (e - s, n) } else { (m, e - s) };
                let mut sink = out;
                let done = tiles(
                    mp,
                    np,
                    k,
                    View { offs: &ao, ..a },
                    View { offs: &bo, ..b },
                    &mut sink,
                    &co,
                    rsc,
                    csc,
                    accumulate,
                );
                if done.is_none() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
            return (!failed.load(std::sync::atomic::Ordering::Relaxed)).then_some(());
        }
    }
    let mut sink = cdata;
    tiles(m, n, k, a, b, &mut sink, coffs, rsc, csc, accumulate)
}

/// Products of at least this many multiply-adds (about half a millisecond
/// on one core) run on the thread pool. Smaller ones did not gain on the
/// 2-core machine of docs/BENCHMARKS.md: with its cores shared, handing
/// out parts of 2^17–2^21 multiply-adds made the tiny transformer's
/// training steps twice as slow at `-t 2`.
pub const PAR_MIN: usize = 1 << 24;

/// Where [`tiles`] stores results.
trait Sink {
    /// Entries `start..start + len` of the output, `None` past its end.
    fn span(&mut self, start: usize, len: usize) -> Option<&mut [f32]>;
}

impl Sink for &mut [f32] {
    fn span(&mut self, start: usize, len: usize) -> Option<&mut [f32]> {
        self.get_mut(start..start.checked_add(len)?)
    }
}

/// The output of a product split over the pool: each part writes only its
/// own rows (or columns) of it.
#[derive(Clone, Copy)]
struct RawOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the parts of one split product (`gemm`) write disjoint entries
// of the output, which the caller lent mutably for the whole call, and
// nothing reads it meanwhile.
unsafe impl Send for RawOut {}
unsafe impl Sync for RawOut {}

impl Sink for RawOut {
    fn span(&mut self, start: usize, len: usize) -> Option<&mut [f32]> {
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above) of a buffer borrowed mutably
        // for the whole product; this part alone writes these entries
        // (its rows or columns, see `RawOut`), and the slice lives only
        // while they are stored.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) })
    }
}

/// The blocked product of [`gemm`] on validated views, storing through
/// `sink` (`k > 0`).
#[allow(clippy::too_many_arguments)]
fn tiles<S: Sink>(
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    b: View<'_>,
    cdata: &mut S,
    coffs: &[usize],
    rsc: usize,
    csc: usize,
    accumulate: bool,
) -> Option<()> {
    // Cᵀ = Bᵀ · Aᵀ: the operand read in 16-lane rows should have unit
    // column stride (then it is read in place, not packed); when neither
    // has, the result's rows should (then its tiles are stored whole).
    let swap = b.cs != 1 && (a.rs == 1 || (csc != 1 && rsc == 1));
    let (m, n, a, b, rsc, csc) = if swap {
        let at = View {
            data: b.data,
            offs: b.offs,
            rs: b.cs,
            cs: b.rs,
        };
        let bt = View {
            data: a.data,
            offs: a.offs,
            rs: a.cs,
            cs: a.rs,
        };
        (n, m, at, bt, csc, rsc)
    } else {
        (m, n, a, b, rsc, csc)
    };
    let isa = isa();
    let npanels = n.div_ceil(NR);
    // Panels read in place need no room: with unit column stride only a
    // narrower last panel is packed (into slot 0).
    let slot = |jp: usize| if b.cs == 1 { 0 } else { jp };
    let packed = if b.cs == 1 {
        usize::from(!n.is_multiple_of(NR))
    } else {
        npanels
    };
    PACK.with(|cell| {
        let mut bp = cell.borrow_mut();
        let kc_max = k.min(KC);
        if bp.len() < packed * kc_max * NR {
            bp.resize(packed * kc_max * NR, 0.0);
        }
        let mut tile = [0.0f32; MR * NR];
        for ((&ao, &bo), &co) in a.offs.iter().zip(b.offs).zip(coffs) {
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                // B's rows p0..p0+kc in panels of NR columns: read in place
                // where they are whole rows of unit stride, else packed.
                let direct = |nr: usize| b.cs == 1 && nr == NR;
                for jp in 0..npanels {
                    let j0 = jp * NR;
                    let nr = NR.min(n - j0);
                    if direct(nr) {
                        continue;
                    }
                    let panel = &mut bp[slot(jp) * kc * NR..(slot(jp) + 1) * kc * NR];
                    for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                        let base = bo + (p0 + p) * b.rs + j0 * b.cs;
                        if b.cs == 1 {
                            row[..nr].copy_from_slice(&b.data[base..base + nr]);
                        } else {
                            for (jj, x) in row[..nr].iter_mut().enumerate() {
                                *x = b.data[base + jj * b.cs];
                            }
                        }
                        row[nr..].fill(0.0);
                    }
                }
                let add = accumulate || p0 > 0;
                for i0 in (0..m).step_by(MR) {
                    let mr = MR.min(m - i0);
                    // Rows past the edge repeat the last one (computed, not stored).
                    let mut arows = [0usize; MR];
                    for (ii, r) in arows.iter_mut().enumerate() {
                        *r = ao + (i0 + ii.min(mr - 1)) * a.rs + p0 * a.cs;
                    }
                    for jp in 0..npanels {
                        let j0 = jp * NR;
                        let nr = NR.min(n - j0);
                        let (bsrc, boff, brs) = if direct(nr) {
                            (b.data, bo + p0 * b.rs + j0, b.rs)
                        } else {
                            (&bp[..], slot(jp) * kc * NR, NR)
                        };
                        micro(isa, kc, a.data, &arows, a.cs, bsrc, boff, brs, &mut tile)?;
                        let cbase = co + i0 * rsc + j0 * csc;
                        for (ii, trow) in tile.chunks_exact(NR).take(mr).enumerate() {
                            let rbase = cbase + ii * rsc;
                            if csc == 1 {
                                let dst = cdata.span(rbase, nr)?;
                                if add {
                                    dst.iter_mut().zip(trow).for_each(|(d, s)| *d += s);
                                } else {
                                    dst.copy_from_slice(&trow[..nr]);
                                }
                            } else {
                                for (jj, &s) in trow[..nr].iter().enumerate() {
                                    let d = &mut cdata.span(rbase + jj * csc, 1)?[0];
                                    *d = if add { *d + s } else { s };
                                }
                            }
                        }
                    }
                }
            }
        }
        Some(())
    })
}

thread_local! {
    static PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `tile[i * NR + j] = Σ_p a[arows[i] + p * csa] · b[boff + p * brs + j]`
/// for `p < kc`, `i < MR`, `j < NR`. Every index read must lie in its
/// slice; that is checked here once (not per element).
#[allow(clippy::too_many_arguments)]
fn micro(
    isa: Isa,
    kc: usize,
    a: &[f32],
    arows: &[usize; MR],
    csa: usize,
    b: &[f32],
    boff: usize,
    brs: usize,
    tile: &mut [f32; MR * NR],
) -> Option<()> {
    let last = |base: usize, stride: usize, width: usize| {
        kc.checked_sub(1)?
            .checked_mul(stride)
            .and_then(|x| x.checked_add(base))
            .and_then(|x| x.checked_add(width - 1))
    };
    let a_ok = arows
        .iter()
        .all(|&r| last(r, csa, 1).is_some_and(|l| l < a.len()));
    let b_ok = last(boff, brs, NR).is_some_and(|l| l < b.len());
    if kc == 0 || !a_ok || !b_ok {
        return None;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F was detected at run time; every index read was
        // checked against the slices above.
        Isa::Avx512 => unsafe { x86::micro_avx512(kc, a, arows, csa, b, boff, brs, tile) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected at run time; as above.
        Isa::Avx2 => unsafe { x86::micro_avx2(kc, a, arows, csa, b, boff, brs, tile) },
        Isa::Scalar => micro_scalar(kc, a, arows, csa, b, boff, brs, tile),
    }
    Some(())
}

#[allow(clippy::too_many_arguments)]
fn micro_scalar(
    kc: usize,
    a: &[f32],
    arows: &[usize; MR],
    csa: usize,
    b: &[f32],
    boff: usize,
    brs: usize,
    tile: &mut [f32; MR * NR],
) {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let brow = &b[boff + p * brs..boff + p * brs + NR];
        for (row, &r) in acc.iter_mut().zip(arows) {
            let av = a[r + p * csa];
            for (x, &bv) in row.iter_mut().zip(brow) {
                *x += av * bv;
            }
        }
    }
    for (dst, row) in tile.chunks_exact_mut(NR).zip(&acc) {
        dst.copy_from_slice(row);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// # Safety
    ///
    /// The CPU runs AVX-512F; `a[arows[i] + p * csa]` and
    /// `b[boff + p * brs..][..NR]` lie in the slices for every `p < kc`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn micro_avx512(
        kc: usize,
        a: &[f32],
        arows: &[usize; MR],
        csa: usize,
        b: &[f32],
        boff: usize,
        brs: usize,
        tile: &mut [f32; MR * NR],
    ) {
        let mut acc = [_mm512_setzero_ps(); MR];
        // SAFETY (all pointer arithmetic below): the caller's contract.
        let rows: [*const f32; MR] = std::array::from_fn(|i| unsafe { a.as_ptr().add(arows[i]) });
        let mut bp = unsafe { b.as_ptr().add(boff) };
        for p in 0..kc {
            let bv = unsafe { _mm512_loadu_ps(bp) };
            for (i, x) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(unsafe { *rows[i].add(p * csa) });
                *x = _mm512_fmadd_ps(av, bv, *x);
            }
            bp = bp.wrapping_add(brs);
        }
        for (i, x) in acc.iter().enumerate() {
            // SAFETY: row i of the MR × NR tile.
            unsafe { _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR), *x) };
        }
    }

    /// # Safety
    ///
    /// The CPU runs AVX2 and FMA; as [`micro_avx512`] for the indices.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn micro_avx2(
        kc: usize,
        a: &[f32],
        arows: &[usize; MR],
        csa: usize,
        b: &[f32],
        boff: usize,
        brs: usize,
        tile: &mut [f32; MR * NR],
    ) {
        let mut lo = [_mm256_setzero_ps(); MR];
        let mut hi = [_mm256_setzero_ps(); MR];
        // SAFETY (all pointer arithmetic below): the caller's contract.
        let rows: [*const f32; MR] = std::array::from_fn(|i| unsafe { a.as_ptr().add(arows[i]) });
        let mut bp = unsafe { b.as_ptr().add(boff) };
        for p in 0..kc {
            let (b0, b1) = unsafe { (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8))) };
            for i in 0..MR {
                let av = _mm256_set1_ps(unsafe { *rows[i].add(p * csa) });
                lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
                hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
            }
            bp = bp.wrapping_add(brs);
        }
        for i in 0..MR {
            // SAFETY: row i of the MR × NR tile.
            unsafe {
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), lo[i]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), hi[i]);
            }
        }
    }
}

/// `a[m, k] · b[k, n]` for contiguous row-major operands, either stored
/// transposed (`ta`: `a` given as `[k, m]`; `tb`: `b` as `[n, k]`), into
/// a new vector. `None` when the slices are too short.
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> Option<Vec<f32>> {
    let mut out = crate::bufs::zeros(m * n);
    let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
    let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
    gemm(
        m,
        n,
        k,
        View {
            data: a,
            offs: &[0],
            rs: rsa,
            cs: csa,
        },
        View {
            data: b,
            offs: &[0],
            rs: rsb,
            cs: csb,
        },
        Out {
            data: &mut out,
            offs: &[0],
            rs: n,
            cs: 1,
        },
        false,
    )?;
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += f64::from(x) * f64::from(y);
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn every_isa_and_edge_equals_the_naive_product() {
        let isas = {
            let mut v = vec![Isa::Scalar];
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    v.push(Isa::Avx2);
                }
                if is_x86_feature_detected!("avx512f") {
                    v.push(Isa::Avx512);
                }
            }
            v
        };
        // The micro-kernels against each other.
        let ap: Vec<f32> = (0..7 * MR).map(|x| (x as f32 * 0.3).sin()).collect();
        let bp: Vec<f32> = (0..7 * NR).map(|x| (x as f32 * 0.7).cos()).collect();
        let rows: [usize; MR] = std::array::from_fn(|i| i);
        let mut want = [0.0f32; MR * NR];
        micro(Isa::Scalar, 7, &ap, &rows, MR, &bp, 0, NR, &mut want).unwrap();
        assert!(micro(Isa::Scalar, 8, &ap, &rows, MR, &bp, 0, NR, &mut want).is_none());
        assert!(micro(Isa::Scalar, 0, &ap, &rows, MR, &bp, 0, NR, &mut want).is_none());
        for &isa in &isas {
            let mut t = [0.0f32; MR * NR];
            micro(isa, 7, &ap, &rows, MR, &bp, 0, NR, &mut t).unwrap();
            for (x, y) in t.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{isa:?}");
            }
        }
        // Shapes around the tile and block edges, all four layouts.
        for &(m, k, n) in &[(1, 1, 1), (5, 3, 17), (7, 300, 33), (13, 16, 16), (6, 0, 4)] {
            let a: Vec<f32> = (0..m * k).map(|x| (x as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|x| (x as f32 * 0.21).cos()).collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    let got = matmul(&a, &b, m, k, n, ta, tb).unwrap();
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    for (x, y) in got.iter().zip(&want) {
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m} {k} {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn split_products_give_the_bits_of_one_thread() {
        // Row splits (tall outputs), column splits (wide ones), batches,
        // transposed operands, accumulation into one shared output: the
        // pool's result against the tiles on one thread, bit for bit.
        let pool = tl_core::pool::ThreadPool::new(3).unwrap();
        assert_eq!(pool.threads(), 3);
        let cases = [
            // (m, k, n, batch, ta, tb, accumulate into one output)
            (517, 64, 33, 1, false, false, false),
            (40, 300, 700, 1, false, true, false),
            (64, 48, 64, 12, true, false, false),
            (130, 37, 131, 3, true, true, false),
            (96, 70, 40, 8, false, false, true),
        ];
        for &(m, k, n, nb, ta, tb, acc) in &cases {
            let a: Vec<f32> = (0..nb * m * k).map(|x| (x as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..nb * k * n).map(|x| (x as f32 * 0.21).cos()).collect();
            let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
            let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
            let ao: Vec<usize> = (0..nb).map(|i| i * m * k).collect();
            let bo: Vec<usize> = (0..nb).map(|i| i * k * n).collect();
            let co: Vec<usize> = (0..nb).map(|i| if acc { 0 } else { i * m * n }).collect();
            let clen = if acc { m * n } else { nb * m * n };
            let av = View {
                data: &a,
                offs: &ao,
                rs: rsa,
                cs: csa,
            };
            let bv = View {
                data: &b,
                offs: &bo,
                rs: rsb,
                cs: csb,
            };
            let start: Vec<f32> = (0..clen).map(|x| (x as f32 * 0.05).sin()).collect();
            let mut one = start.clone();
            let mut sink = one.as_mut_slice();
            tiles(m, n, k, av, bv, &mut sink, &co, n, 1, acc).unwrap();
            let mut split = start.clone();
            let out = Out {
                data: &mut split,
                offs: &co,
                rs: n,
                cs: 1,
            };
            // Every case split (a threshold of 1), in parts of whole tiles.
            gemm_on(&pool, 1, m, n, k, av, bv, out, acc).unwrap();
            let same = one
                .iter()
                .zip(&split)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{m} {k} {n} x{nb}: split product differs");
            // And it is the product (not, say, the start values).
            let want = naive(&a[..m * k], &b[..k * n], m, k, n, ta, tb);
            let got0 = if acc { None } else { Some(&split[..m * n]) };
            if let Some(g) = got0 {
                for (x, y) in g.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m} {k} {n}");
                }
            }
        }
    }

    #[test]
    fn views_that_do_not_fit_are_refused() {
        let a = [1.0f32; 6];
        let mut c = [0.0f32; 4];
        let v = |rs| View {
            data: &a,
            offs: &[0],
            rs,
            cs: 1,
        };
        let out = |c: &mut [f32]| {
            gemm(
                2,
                2,
                3,
                v(3),
                View {
                    data: &a,
                    offs: &[0],
                    rs: 2,
                    cs: 1,
                },
                Out {
                    data: c,
                    offs: &[0],
                    rs: 2,
                    cs: 1,
                },
                false,
            )
        };
        assert!(out(&mut c).is_some());
        assert!(gemm(
            2,
            2,
            3,
            v(4),
            v(2),
            Out {
                data: &mut c,
                offs: &[0],
                rs: 2,
                cs: 1
            },
            false
        )
        .is_none());
    }
}
