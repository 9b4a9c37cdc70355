//! Host emulations of the device kernels' index arithmetic (`dequant32` and
//! `unit_dot` in `kernels.cu`), held to tl-core's dequantization and to a
//! plain f32 dot product on every quantized kind: the layouts and the dp4a
//! unit decomposition are checked on machines without a GPU too.
use super::weights::*;
use crate::weights::Weight;
use half::f16;
use rand::{Rng, SeedableRng};
use tl_gguf::GgmlType;

fn h(p: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([p[2 * i], p[2 * i + 1]]).to_f32()
}

fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32,
        )
    }
}

/// `q3k_scale` of kernels.cu.
fn q3k_scale(s: &[u8], i: usize) -> i32 {
    let lo = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
    let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    (lo | (hi << 4)) as i32 - 32
}

/// `dequant32<T>` of kernels.cu.
fn dequant32(hp: &HostParts, r: usize, b: usize) -> [f32; 32] {
    let k = hp.cols;
    let nb = k / 32;
    let p = &hp.parts;
    let mut v = [0f32; 32];
    match hp.kind {
        Kind::F16 => (0..32).for_each(|i| v[i] = h(&p[0], r * k + b * 32 + i)),
        Kind::Q8_0 => {
            let d = h(&p[1], r * nb + b);
            (0..32).for_each(|i| v[i] = d * (p[0][r * k + b * 32 + i] as i8) as f32);
        }
        Kind::Q4_1 | Kind::Q5_1 => {
            let q = &p[0][(r * nb + b) * 16..][..16];
            let (d, mn) = (h(&p[1], r * nb + b), h(&p[3], r * nb + b));
            let qh = if hp.kind == Kind::Q5_1 {
                u32::from_le_bytes(p[2][(r * nb + b) * 4..][..4].try_into().unwrap())
            } else {
                0
            };
            for i in 0..16 {
                let lo = (q[i] & 0xF) as i32 | ((((qh >> i) & 1) << 4) as i32);
                let hi = (q[i] >> 4) as i32 | ((((qh >> (i + 16)) & 1) << 4) as i32);
                v[i] = d * lo as f32 + mn;
                v[i + 16] = d * hi as f32 + mn;
            }
        }
        Kind::Q5K => {
            let blk = &p[0][(r * (k / 256) + b / 8) * 176..][..176];
            let j = b % 8;
            let (d, dmin) = (h(blk, 0), h(blk, 1));
            let (sc, m) = scale_min_k4(j, &blk[4..16]);
            let qh = &blk[16..48];
            let q = &blk[48 + 32 * (j / 2)..][..32];
            for i in 0..32 {
                let n = if j & 1 == 1 { q[i] >> 4 } else { q[i] & 0xF } | (((qh[i] >> j) & 1) << 4);
                v[i] = d * sc as f32 * n as f32 - dmin * m as f32;
            }
        }
        Kind::Q4_0 | Kind::Q5_0 => {
            let q = &p[0][(r * nb + b) * 16..][..16];
            let d = h(&p[1], r * nb + b);
            let qh = if hp.kind == Kind::Q5_0 {
                u32::from_le_bytes(p[2][(r * nb + b) * 4..][..4].try_into().unwrap())
            } else {
                0
            };
            let off = if hp.kind == Kind::Q5_0 { 16 } else { 8 };
            for i in 0..16 {
                let lo = (q[i] & 0xF) as i32 | ((((qh >> i) & 1) << 4) as i32);
                let hi = (q[i] >> 4) as i32 | ((((qh >> (i + 16)) & 1) << 4) as i32);
                v[i] = d * (lo - off) as f32;
                v[i + 16] = d * (hi - off) as f32;
            }
        }
        Kind::Q4K => {
            let blk = &p[0][(r * (k / 256) + b / 8) * 144..][..144];
            let j = b % 8;
            let (d, dmin) = (h(blk, 0), h(blk, 1));
            let (sc, m) = scale_min_k4(j, &blk[4..16]);
            let q = &blk[16 + 32 * (j / 2)..][..32];
            for i in 0..32 {
                let n = if j & 1 == 1 { q[i] >> 4 } else { q[i] & 0xF };
                v[i] = d * sc as f32 * n as f32 - dmin * m as f32;
            }
        }
        Kind::Q2K | Kind::Q3K => {
            let sb = r * (k / 256) + b / 8;
            let (j, n) = (b % 8, (b % 8) / 4);
            let sh = j % 4;
            let q = &p[0][sb * 64 + n * 32..][..32];
            for l in 0..32 {
                let si = 8 * n + 2 * sh + l / 16;
                let low = ((q[l] >> (2 * sh)) & 3) as i32;
                v[l] = if hp.kind == Kind::Q2K {
                    let (d, dmin) = (h(&p[1], 2 * sb), h(&p[1], 2 * sb + 1));
                    let c = p[3][sb * 16 + si];
                    d * (c & 0xF) as f32 * low as f32 - dmin * (c >> 4) as f32
                } else {
                    let hbit = (p[2][sb * 32 + l] >> (4 * n + sh)) & 1;
                    let qv = low - if hbit == 1 { 0 } else { 4 };
                    h(&p[1], sb) * q3k_scale(&p[3][sb * 12..], si) as f32 * qv as f32
                };
            }
        }
        Kind::Q6K => {
            let sb = r * (k / 256) + b / 8;
            let (j, n) = (b % 8, (b % 8) / 4);
            let kk = j % 4;
            let ql = &p[0][sb * 128 + n * 64 + (kk & 1) * 32..][..32];
            let qh = &p[2][sb * 64 + n * 32..][..32];
            let sc = &p[3][sb * 16 + n * 8..][..8];
            let d = h(&p[1], sb);
            for l in 0..32 {
                let lo = if kk >= 2 { ql[l] >> 4 } else { ql[l] & 0xF };
                let q = (lo | (((qh[l] >> (2 * kk)) & 3) << 4)) as i32 - 32;
                v[l] = d * (sc[l / 16 + 2 * kk] as i8) as f32 * q as f32;
            }
        }
    }
    v
}

fn dp4a(a: i32, b: i32) -> i32 {
    let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
    (0..4)
        .map(|i| (a[i] as i8) as i32 * (b[i] as i8) as i32)
        .sum()
}

fn word(p: &[u8], off: usize) -> i32 {
    i32::from_le_bytes(p[off..off + 4].try_into().unwrap())
}

fn vsubss4_32(x: i32) -> i32 {
    i32::from_le_bytes(x.to_le_bytes().map(|b| (b as i8 - 32) as u8))
}

/// `gemv_q` of kernels.cu for one row and one activation row.
fn row_dot(hp: &HostParts, r: usize, xq: &[i8], xd: &[f32]) -> f32 {
    let k = hp.cols;
    let nb = k / 32;
    let p = &hp.parts;
    let xw = |pos: usize| {
        i32::from_le_bytes([
            xq[pos] as u8,
            xq[pos + 1] as u8,
            xq[pos + 2] as u8,
            xq[pos + 3] as u8,
        ])
    };
    let units = hp.kind.units(k);
    let spread =
        |x: u32| (((x & 1) << 4) | ((x & 2) << 11) | ((x & 4) << 18) | ((x & 8) << 25)) as i32;
    let mut acc = 0f32;
    for u in 0..units {
        match hp.kind {
            Kind::Q8_0 => {
                let (b, off) = (u / 2, (u % 2) * 16);
                let base = r * k + b * 32 + off;
                let s: i32 = (0..4)
                    .map(|i| dp4a(word(&p[0], base + 4 * i), xw(b * 32 + off + 4 * i)))
                    .sum();
                acc += h(&p[1], r * nb + b) * xd[b] * s as f32;
            }
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q4_1 | Kind::Q5_1 => {
                let (b, j) = (u / 2, (u % 2) * 8);
                let qa = word(&p[0], (r * nb + b) * 16 + j);
                let qb = word(&p[0], (r * nb + b) * 16 + j + 4);
                let mut lh = [
                    qa & 0x0F0F_0F0F,
                    qb & 0x0F0F_0F0F,
                    (qa >> 4) & 0x0F0F_0F0F,
                    (qb >> 4) & 0x0F0F_0F0F,
                ];
                let off = match hp.kind {
                    Kind::Q4_0 => 8,
                    Kind::Q5_0 => 16,
                    _ => 0,
                };
                if matches!(hp.kind, Kind::Q5_0 | Kind::Q5_1) {
                    let qh = word(&p[2], (r * nb + b) * 4) as u32;
                    let (hl, hh) = ((qh >> j) & 0xFF, (qh >> (j + 16)) & 0xFF);
                    lh[0] |= spread(hl & 0xF);
                    lh[1] |= spread(hl >> 4);
                    lh[2] |= spread(hh & 0xF);
                    lh[3] |= spread(hh >> 4);
                }
                let x = [
                    xw(b * 32 + j),
                    xw(b * 32 + j + 4),
                    xw(b * 32 + 16 + j),
                    xw(b * 32 + 20 + j),
                ];
                let s: i32 = (0..4).map(|i| dp4a(lh[i], x[i])).sum();
                let sx: i32 = (0..4).map(|i| dp4a(0x0101_0101, x[i])).sum();
                let mn = if matches!(hp.kind, Kind::Q4_1 | Kind::Q5_1) {
                    h(&p[3], r * nb + b)
                } else {
                    0.0
                };
                acc +=
                    h(&p[1], r * nb + b) * xd[b] * (s - off * sx) as f32 + mn * xd[b] * sx as f32;
            }
            Kind::Q4K | Kind::Q5K => {
                let (sb, l) = (u / 8, u % 8);
                let (g, hq) = (l / 2, 16 * (l % 2));
                let (bs, qs) = if hp.kind == Kind::Q4K {
                    (144, 16)
                } else {
                    (176, 48)
                };
                let blk = &p[0][(r * (k / 256) + sb) * bs..][..bs];
                let (d, dmin) = (h(blk, 0), h(blk, 1));
                let (sc0, m0) = scale_min_k4(2 * g, &blk[4..16]);
                let (sc1, m1) = scale_min_k4(2 * g + 1, &blk[4..16]);
                let (b0, b1) = (sb * 8 + 2 * g, sb * 8 + 2 * g + 1);
                let (mut s0, mut s1, mut sx0, mut sx1) = (0, 0, 0, 0);
                for i in 0..4 {
                    let q = word(blk, qs + 32 * g + hq + 4 * i);
                    let (mut lo, mut hi) = (q & 0x0F0F_0F0F, (q >> 4) & 0x0F0F_0F0F);
                    if hp.kind == Kind::Q5K {
                        let qh = word(blk, 16 + hq + 4 * i);
                        lo |= ((qh >> (2 * g)) & 0x0101_0101) << 4;
                        hi |= ((qh >> (2 * g + 1)) & 0x0101_0101) << 4;
                    }
                    let (x0, x1) = (xw(b0 * 32 + hq + 4 * i), xw(b1 * 32 + hq + 4 * i));
                    s0 += dp4a(lo, x0);
                    s1 += dp4a(hi, x1);
                    sx0 += dp4a(0x0101_0101, x0);
                    sx1 += dp4a(0x0101_0101, x1);
                }
                acc += d * (sc0 as f32 * s0 as f32 * xd[b0] + sc1 as f32 * s1 as f32 * xd[b1])
                    - dmin * (m0 as f32 * sx0 as f32 * xd[b0] + m1 as f32 * sx1 as f32 * xd[b1]);
            }
            Kind::Q2K | Kind::Q3K => {
                let (sb, n, l0) = (u / 4, (u % 4) / 2, 16 * (u % 2));
                let sbi = r * (k / 256) + sb;
                let xb0 = sb * 8 + n * 4;
                let (mut s, mut t) = (0f32, 0f32);
                for j in 0..4 {
                    let si = 8 * n + 2 * j + l0 / 16;
                    let (sc, mj) = if hp.kind == Kind::Q2K {
                        let c = p[3][sbi * 16 + si] as i32;
                        (c & 0xF, c >> 4)
                    } else {
                        let sc = q3k_scale(&p[3][sbi * 12..], si);
                        (sc, 4 * sc)
                    };
                    let dx = xd[xb0 + j];
                    for w4 in 0..4 {
                        let off = sbi * 64 + n * 32 + l0 + 4 * w4;
                        let mut qj = (word(&p[0], off) >> (2 * j)) & 0x0303_0303;
                        if hp.kind == Kind::Q3K {
                            let hm = word(&p[2], sbi * 32 + l0 + 4 * w4);
                            qj |= ((hm >> (4 * n + j)) & 0x0101_0101) << 2;
                        }
                        let x = xw((xb0 + j) * 32 + l0 + 4 * w4);
                        s += dx * (sc * dp4a(qj, x)) as f32;
                        t += dx * (mj * dp4a(0x0101_0101, x)) as f32;
                    }
                }
                acc += if hp.kind == Kind::Q2K {
                    h(&p[1], 2 * sbi) * s - h(&p[1], 2 * sbi + 1) * t
                } else {
                    h(&p[1], sbi) * (s - t)
                };
            }
            Kind::Q6K => {
                let (sb, rr) = (u / 16, u % 16);
                let (n, l) = (rr / 8, 4 * (rr % 8));
                let sbi = r * (k / 256) + sb;
                let ql0 = word(&p[0], sbi * 128 + n * 64 + l);
                let ql1 = word(&p[0], sbi * 128 + n * 64 + 32 + l);
                let qh = word(&p[2], sbi * 64 + n * 32 + l);
                let q = [
                    vsubss4_32((ql0 & 0x0F0F_0F0F) | ((qh & 0x0303_0303) << 4)),
                    vsubss4_32((ql1 & 0x0F0F_0F0F) | (((qh >> 2) & 0x0303_0303) << 4)),
                    vsubss4_32(((ql0 >> 4) & 0x0F0F_0F0F) | (((qh >> 4) & 0x0303_0303) << 4)),
                    vsubss4_32(((ql1 >> 4) & 0x0F0F_0F0F) | (((qh >> 6) & 0x0303_0303) << 4)),
                ];
                let sc = &p[3][sbi * 16 + n * 8 + l / 16..];
                let xb = sb * 8 + n * 4;
                let mut s = 0f32;
                for kk in 0..4 {
                    let x = xw((xb + kk) * 32 + l);
                    s += ((sc[2 * kk] as i8) as i32 * dp4a(q[kk], x)) as f32 * xd[xb + kk];
                }
                acc += h(&p[1], sbi) * s;
            }
            Kind::F16 => unreachable!(),
        }
    }
    acc
}

fn weight(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Weight, Vec<u8>, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vals: Vec<f32> = (0..rows * cols)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let mut bytes = vec![0u8; ty.bytes_for((rows * cols) as u64).unwrap() as usize];
    tl_core::quant::quantize(ty, &vals, &mut bytes).unwrap();
    let mut deq = vec![0f32; rows * cols];
    tl_core::quant::dequantize(ty, &bytes, &mut deq).unwrap();
    let w = Weight::standalone("w", ty, rows, cols, bytes.len());
    (w, bytes, deq)
}

/// The kinds the 8-bit-activation kernels (GEMV and tensor-core) take.
const QUANTIZED: [GgmlType; 8] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q4_1,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[test]
fn device_layouts_dequantize_as_ggml() {
    for ty in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::F32,
    ] {
        let (rows, cols) = (3, 512);
        let (w, bytes, deq) = weight(ty, rows, cols, 7);
        let hp = repack(&w, &bytes).unwrap();
        for r in 0..rows {
            for b in 0..cols / 32 {
                let v = dequant32(&hp, r, b);
                for i in 0..32 {
                    let want = deq[r * cols + b * 32 + i];
                    let tol = if hp.kind == Kind::F16 {
                        want.abs() * 1e-3 + 1e-6
                    } else {
                        1e-6
                    };
                    assert!(
                        (v[i] - want).abs() <= tol,
                        "{ty}: row {r} block {b} value {i}: {} vs {want}",
                        v[i]
                    );
                }
            }
        }
    }
}

#[test]
fn device_gemv_units_sum_to_the_dot_product() {
    let cols = 512;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    // The activation quantization of kernels.cu (`store_q8`).
    let mut xq = vec![0i8; cols];
    let mut xd = vec![0f32; cols / 32];
    for b in 0..cols / 32 {
        let amax = x[b * 32..b * 32 + 32]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        xd[b] = d;
        for i in 0..32 {
            xq[b * 32 + i] = (x[b * 32 + i] * id).round_ties_even() as i8;
        }
    }
    let xdeq: Vec<f32> = (0..cols).map(|i| xq[i] as f32 * xd[i / 32]).collect();
    for ty in QUANTIZED
        .into_iter()
        .chain([GgmlType::Q2_K, GgmlType::Q3_K])
    {
        let (w, bytes, deq) = weight(ty, 2, cols, 9);
        let hp = repack(&w, &bytes).unwrap();
        for r in 0..2 {
            let got = row_dot(&hp, r, &xq, &xd);
            let want: f32 = (0..cols).map(|i| deq[r * cols + i] * xdeq[i]).sum();
            assert!(
                (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                "{ty} row {r}: {got} vs {want}"
            );
        }
    }
}

fn spread4(x: u32) -> i32 {
    (((x & 1) << 4) | ((x & 2) << 11) | ((x & 4) << 18) | ((x & 8) << 25)) as i32
}

fn vsub4(x: i32, v: i8) -> i32 {
    i32::from_le_bytes(x.to_le_bytes().map(|b| (b as i8).wrapping_sub(v) as u8))
}

/// `mmq_load<T>` of kernels.cu: lane `tig`'s A-fragment bytes of row `r`,
/// block `kb` (values 4·tig..+3 and 16 + 4·tig..+3), the scale of each
/// half and the offset.
fn mmq_part(hp: &HostParts, r: usize, kb: usize, tig: usize) -> (i32, i32, f32, f32, f32) {
    let k = hp.cols;
    let nb = k / 32;
    let p = &hp.parts;
    match hp.kind {
        Kind::Q8_0 => {
            let o = r * k + kb * 32 + 4 * tig;
            let d = h(&p[1], r * nb + kb);
            (word(&p[0], o), word(&p[0], o + 16), d, d, 0.0)
        }
        Kind::Q4_0 | Kind::Q5_0 | Kind::Q4_1 | Kind::Q5_1 => {
            let q = word(&p[0], (r * nb + kb) * 16 + 4 * tig);
            let (mut lo, mut hi) = (q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F);
            if matches!(hp.kind, Kind::Q5_0 | Kind::Q5_1) {
                let qh = word(&p[2], (r * nb + kb) * 4) as u32;
                lo |= spread4((qh >> (4 * tig)) & 0xF);
                hi |= spread4((qh >> (16 + 4 * tig)) & 0xF);
            }
            let off = match hp.kind {
                Kind::Q4_0 => 8,
                Kind::Q5_0 => 16,
                _ => 0,
            };
            let d = h(&p[1], r * nb + kb);
            let m = if matches!(hp.kind, Kind::Q4_1 | Kind::Q5_1) {
                h(&p[3], r * nb + kb)
            } else {
                0.0
            };
            (vsub4(lo, off), vsub4(hi, off), d, d, m)
        }
        Kind::Q4K | Kind::Q5K => {
            let (bs, qs) = if hp.kind == Kind::Q4K {
                (144, 16)
            } else {
                (176, 48)
            };
            let j = kb % 8;
            let blk = &p[0][(r * (k / 256) + kb / 8) * bs..][..bs];
            let q = qs + 32 * (j / 2) + 4 * tig;
            let sh = 4 * (j & 1);
            let mut lo = (word(blk, q) >> sh) & 0x0F0F0F0F;
            let mut hi = (word(blk, q + 16) >> sh) & 0x0F0F0F0F;
            if hp.kind == Kind::Q5K {
                lo |= ((word(blk, 16 + 4 * tig) >> j) & 0x01010101) << 4;
                hi |= ((word(blk, 32 + 4 * tig) >> j) & 0x01010101) << 4;
            }
            let (sc, mn) = scale_min_k4(j, &blk[4..16]);
            let s = h(blk, 0) * sc as f32;
            (lo, hi, s, s, -h(blk, 1) * mn as f32)
        }
        Kind::Q6K => {
            let sb = r * (k / 256) + kb / 8;
            let (j, n) = (kb % 8, (kb % 8) / 4);
            let kk = j % 4;
            let ql = sb * 128 + n * 64 + (kk & 1) * 32 + 4 * tig;
            let qh = sb * 64 + n * 32 + 4 * tig;
            let sh = if kk >= 2 { 4 } else { 0 };
            let part = |o: usize| {
                vsubss4_32(
                    ((word(&p[0], ql + o) >> sh) & 0x0F0F0F0F)
                        | (((word(&p[2], qh + o) >> (2 * kk)) & 0x03030303) << 4),
                )
            };
            let sc = &p[3][sb * 16 + n * 8 + 2 * kk..];
            let d = h(&p[1], sb);
            (
                part(0),
                part(16),
                d * (sc[0] as i8) as f32,
                d * (sc[1] as i8) as f32,
                0.0,
            )
        }
        Kind::F16 | Kind::Q2K | Kind::Q3K => unreachable!(),
    }
}

/// The tensor-core products' fragments: every lane's bytes, scales and
/// offsets give back the dequantized block values, on every kind.
#[test]
fn device_mmq_fragments_dequantize_as_ggml() {
    for ty in QUANTIZED {
        let (rows, cols) = (3, 512);
        let (w, bytes, deq) = weight(ty, rows, cols, 11);
        let hp = repack(&w, &bytes).unwrap();
        for r in 0..rows {
            for kb in 0..cols / 32 {
                for tig in 0..4 {
                    let (lo, hi, s0, s1, m) = mmq_part(&hp, r, kb, tig);
                    for i in 0..4 {
                        for (half, q, s) in [(0, lo, s0), (16, hi, s1)] {
                            let c = half + 4 * tig + i;
                            let got = s * (q.to_le_bytes()[i] as i8) as f32 + m;
                            let want = deq[r * cols + kb * 32 + c];
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{ty}: row {r} block {kb} value {c}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `fa_split` covers every key once with whole 64-key tiles, splits only
/// when the step's blocks leave the card idle, and fills it when it does.
#[test]
fn prefill_attention_splits_cover_the_keys() {
    use super::exec::fa_split;
    // Blocks enough, or too few keys: one split.
    assert_eq!(fa_split(600, 8192, 132), (1, 0));
    assert_eq!(fa_split(112, 150, 132), (1, 0));
    assert_eq!(fa_split(0, 8192, 132), (1, 0));
    for &(blocks, keys) in &[
        (112, 8192),
        (96, 8192),
        (112, 512),
        (32, 1806),
        (8, 33000),
        (56, 300),
    ] {
        let (splits, per) = fa_split(blocks, keys, 132);
        assert!(splits > 1, "{blocks} blocks, {keys} keys: {splits}");
        assert_eq!(per % 64, 0, "{per}");
        assert!(per >= 128, "{per}");
        assert!(
            splits * per >= keys && (splits - 1) * per < keys,
            "{splits} x {per} for {keys}"
        );
        assert!(splits <= 2 * 64);
        // Enough blocks to fill the card, unless the keys run out first
        // (128-key splits) or the splits reach their cap.
        assert!(
            blocks * splits >= 4 * 132 || per == 128 || splits >= 64,
            "{blocks} x {splits}"
        );
    }
}

/// The staged tensor-core products: two blocks of every weight kind fit
/// an SM's shared memory (228 KiB on Hopper, 1 KiB reserved a block), and
/// every split product's partial sums fit their buffer.
#[test]
fn staged_products_fit_shared_memory_and_their_partial_buffer() {
    use super::exec::{
        mmqs_smem, mmqs_splits, GEMV_ROWS, MMQS_PART_FLOATS, MMQS_ROWS, MMQS_SPLITS, MMQS_TILES,
    };
    use super::weights::Kind;
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
        let b = mmqs_smem(kind, GEMV_ROWS);
        assert!(2 * (b + 1024 + 16) <= 228 * 1024, "{kind:?}: {b} bytes");
        assert!(mmqs_smem(kind, 8) < b);
    }
    // (rows, inputs) of the Qwen2.5 0.5B and 1.5B products and an LM head.
    for &(n, k) in &[
        (1152, 896),
        (896, 896),
        (9728, 896),
        (896, 4864),
        (2048, 1536),
        (1536, 1536),
        (17920, 1536),
        (1536, 8960),
        (151936, 1536),
    ] {
        for kind in [Kind::Q8_0, Kind::Q4K] {
            let s = mmqs_splits(kind, n, k, 132, true);
            assert!((1..=MMQS_SPLITS).contains(&s), "{n}x{k}: {s}");
            if s > 1 {
                assert!(n.div_ceil(MMQS_ROWS) <= MMQS_TILES);
                assert!(s * GEMV_ROWS * n <= MMQS_PART_FLOATS, "{n}x{k}: {s}");
            }
            assert_eq!(mmqs_splits(kind, n, k, 132, false), 1);
        }
    }
    // Narrow and long: split; wide: not.
    assert!(mmqs_splits(Kind::Q4K, 1536, 8960, 132, true) >= 4);
    assert_eq!(mmqs_splits(Kind::Q4K, 17920, 1536, 132, true), 1);
}

/// The argument structs passed by value fit the launcher's slot (a launch
/// with a larger one fails on the card, not here).
#[test]
fn kernel_argument_structs_fit_a_launch() {
    use super::exec::{AttnArgs, RopeArgs};
    for (name, size) in [
        ("RopeArgs", std::mem::size_of::<RopeArgs>()),
        ("AttnArgs", std::mem::size_of::<AttnArgs>()),
    ] {
        assert!(
            size <= tl_cuda::MAX_RAW_ARG,
            "{name}: {size} bytes, {} at most",
            tl_cuda::MAX_RAW_ARG
        );
    }
}
