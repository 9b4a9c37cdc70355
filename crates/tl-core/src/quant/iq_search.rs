//! The search tables of ggml's grid quantizers (`iq2xs_init_impl`,
//! `iq3xs_init_impl`), built once per process on first use.
//!
//! A group of `N` values rounds to level indices `l` (level `2 * l + 1`);
//! packed `BITS` bits each they index `map`. A packed point on the grid maps
//! to its grid index; one off the grid maps to a list of grid points
//! nearest it (squared distance of the levels): all those at the
//! `nwant` smallest distances, in order of distance then index, which the
//! quantizer then weighs against the values.

// Index loops mirror the C code so that the port can be checked line by line.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use super::iq_grids::{
    KGRID_IQ1S, KGRID_IQ2S, KGRID_IQ2XS, KGRID_IQ2XXS, KGRID_IQ3S, KGRID_IQ3XXS,
};

/// The grid, map and neighbour lists of one grid type.
pub(crate) struct GridSearch<const N: usize> {
    /// Each grid point's `N` levels (`2 * l + 1`).
    pub grid: Vec<[i8; N]>,
    /// Packed level indices -> grid index (>= 0), or `-(start + 1)` where
    /// `neighbours[start]` is the length of the point's neighbour list and
    /// the list follows.
    map: Vec<i32>,
    neighbours: Vec<u16>,
}

impl<const N: usize> GridSearch<N> {
    fn build(kgrid: &[u16], bits: u32, map_size: usize, nwant: usize) -> Self {
        let mask = (1u32 << bits) - 1;
        let grid: Vec<[i8; N]> = kgrid
            .iter()
            .map(|&g| {
                let mut p = [0i8; N];
                for (i, v) in p.iter_mut().enumerate() {
                    let l = (u32::from(g) >> (bits * i as u32)) & mask;
                    *v = (2 * l + 1) as i8;
                }
                p
            })
            .collect();
        let mut map = vec![-1i32; map_size];
        for (i, p) in grid.iter().enumerate() {
            let mut index = 0usize;
            for (k, &v) in p.iter().enumerate() {
                index |= (((v - 1) / 2) as usize) << (bits as usize * k);
            }
            if let Some(m) = map.get_mut(index) {
                *m = i as i32;
            }
        }
        let mut neighbours = Vec::new();
        let mut dist: Vec<(i32, u16)> = Vec::with_capacity(grid.len());
        for i in 0..map_size {
            if map[i] >= 0 {
                continue;
            }
            let mut pos = [0i32; N];
            for (k, v) in pos.iter_mut().enumerate() {
                let l = ((i as u32) >> (bits * k as u32)) & mask;
                *v = 2 * l as i32 + 1;
            }
            // ggml sorts every grid point by (distance, index) and keeps
            // those up to the nwant-th distinct distance: find that
            // distance first, then sort only the points within it.
            let d2_of = |p: &[i8; N]| -> i32 {
                p.iter()
                    .zip(&pos)
                    .map(|(&a, &b)| (i32::from(a) - b) * (i32::from(a) - b))
                    .sum()
            };
            let mut nearest: Vec<i32> = Vec::with_capacity(nwant + 1);
            for p in &grid {
                let d = d2_of(p);
                if nearest.contains(&d) {
                    continue;
                }
                if nearest.len() < nwant || nearest.last().is_some_and(|&l| d < l) {
                    let at = nearest.partition_point(|&x| x < d);
                    nearest.insert(at, d);
                    nearest.truncate(nwant);
                }
            }
            let limit = nearest.last().copied().unwrap_or(i32::MAX);
            dist.clear();
            for (j, p) in grid.iter().enumerate() {
                let d = d2_of(p);
                if d <= limit {
                    dist.push((d, j as u16));
                }
            }
            dist.sort_unstable();
            let start = neighbours.len();
            map[i] = -(start as i32 + 1);
            neighbours.push(dist.len() as u16);
            neighbours.extend(dist.iter().map(|&(_, j)| j));
        }
        GridSearch {
            grid,
            map,
            neighbours,
        }
    }

    /// The grid index of the packed level indices `u`, if on the grid.
    #[inline]
    pub fn on_grid(&self, u: usize) -> Option<usize> {
        match self.map.get(u) {
            Some(&m) if m >= 0 => Some(m as usize),
            _ => None,
        }
    }

    /// The neighbour list of the off-grid point `u` (empty for a point on
    /// the grid).
    #[inline]
    pub fn neighbours(&self, u: usize) -> &[u16] {
        match self.map.get(u) {
            Some(&m) if m < 0 => {
                let start = (-(m + 1)) as usize;
                let n = usize::from(self.neighbours[start]);
                &self.neighbours[start + 1..start + 1 + n]
            }
            _ => &[],
        }
    }

    /// ggml `iq2_find_best_neighbour` / `iq3_find_best_neighbour`: of the
    /// neighbours of the off-grid point `u`, the one nearest `xval` at
    /// `scale` under the weights; writes its level indices to `l` and
    /// returns its grid index.
    pub fn best_neighbour(
        &self,
        u: usize,
        xval: &[f32],
        weight: &[f32],
        scale: f32,
        l: &mut [i8],
    ) -> usize {
        let list = self.neighbours(u);
        let mut best_d2 = f32::MAX;
        // ggml asserts that some neighbour is nearer than FLT_MAX; take the
        // first if none is (non-finite input).
        let mut index = list.first().map_or(0, |&j| usize::from(j));
        for &j in list {
            let pg = &self.grid[usize::from(j)];
            let mut d2 = 0.0f32;
            for i in 0..N {
                let q = f32::from(pg[i]);
                let diff = scale * q - xval[i];
                d2 += weight[i] * diff * diff;
            }
            if d2 < best_d2 {
                best_d2 = d2;
                index = usize::from(j);
            }
        }
        self.levels_into(index, l);
        index
    }

    /// Writes the level indices of grid point `index` to `l`.
    #[inline]
    pub fn levels_into(&self, index: usize, l: &mut [i8]) {
        for (o, &v) in l.iter_mut().zip(&self.grid[index]) {
            *o = (v - 1) / 2;
        }
    }
}

/// IQ3_XXS (`grid_size = 256`).
pub(crate) fn iq3xxs() -> &'static GridSearch<4> {
    static T: OnceLock<GridSearch<4>> = OnceLock::new();
    T.get_or_init(|| GridSearch::build(&KGRID_IQ3XXS, 3, 4096, 2))
}

/// IQ3_S (`grid_size = 512`).
pub(crate) fn iq3s() -> &'static GridSearch<4> {
    static T: OnceLock<GridSearch<4>> = OnceLock::new();
    T.get_or_init(|| GridSearch::build(&KGRID_IQ3S, 3, 4096, 3))
}

/// Entries of the IQ2/IQ1 maps (8 levels of 2 bits, indices up to 2).
const KMAP_IQ2: usize = 43692;

/// IQ2_XXS.
pub(crate) fn iq2xxs() -> &'static GridSearch<8> {
    static T: OnceLock<GridSearch<8>> = OnceLock::new();
    T.get_or_init(|| GridSearch::build(&KGRID_IQ2XXS, 2, KMAP_IQ2, 2))
}

/// IQ2_XS.
pub(crate) fn iq2xs() -> &'static GridSearch<8> {
    static T: OnceLock<GridSearch<8>> = OnceLock::new();
    T.get_or_init(|| GridSearch::build(&KGRID_IQ2XS, 2, KMAP_IQ2, 2))
}

/// IQ2_S.
pub(crate) fn iq2s() -> &'static GridSearch<8> {
    static T: OnceLock<GridSearch<8>> = OnceLock::new();
    T.get_or_init(|| GridSearch::build(&KGRID_IQ2S, 2, KMAP_IQ2, 1))
}

/// IQ1_S and IQ1_M.
pub(crate) fn iq1s() -> &'static GridSearch<8> {
    static T: OnceLock<GridSearch<8>> = OnceLock::new();
    T.get_or_init(|| GridSearch::build(&KGRID_IQ1S, 2, KMAP_IQ2, 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's neighbour list of the off-grid point `u`: every grid point
    /// sorted by (distance, index), cut after the nwant-th distance.
    fn by_full_sort<const N: usize>(
        s: &GridSearch<N>,
        u: usize,
        bits: u32,
        nwant: usize,
    ) -> Vec<u16> {
        let mask = (1usize << bits) - 1;
        let pos: Vec<i32> = (0..N)
            .map(|k| 2 * ((u >> (bits as usize * k)) & mask) as i32 + 1)
            .collect();
        let mut dist: Vec<(i32, u16)> = s
            .grid
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let d = p
                    .iter()
                    .zip(&pos)
                    .map(|(&a, &b)| (i32::from(a) - b) * (i32::from(a) - b))
                    .sum();
                (d, j as u16)
            })
            .collect();
        dist.sort_unstable();
        let mut out = Vec::new();
        let (mut d2, mut nhave) = (dist[0].0, 1);
        for &(d, j) in &dist {
            if d > d2 {
                if nhave == nwant {
                    break;
                }
                d2 = d;
                nhave += 1;
            }
            out.push(j);
        }
        out
    }

    #[test]
    fn neighbour_lists_are_ggml_s() {
        let s = iq3s();
        let mut checked = 0;
        for u in 0..4096 {
            if s.on_grid(u).is_some() {
                assert!(s.neighbours(u).is_empty());
                continue;
            }
            assert_eq!(s.neighbours(u), &by_full_sort(s, u, 3, 3)[..], "IQ3_S {u}");
            checked += 1;
        }
        assert!(checked > 3000);
        let s = iq2xs();
        for u in (0..KMAP_IQ2).step_by(97) {
            let all_small = (0..8).all(|k| (u >> (2 * k)) & 3 < 3);
            if !all_small || s.on_grid(u).is_some() {
                continue;
            }
            assert_eq!(s.neighbours(u), &by_full_sort(s, u, 2, 2)[..], "IQ2_XS {u}");
        }
    }
}

/// Quantizes each 256-value block of the row `x` into `y` with `f`, handing
/// it the block's importance weights when `qw` has them (ggml's
/// `quantize_iq*` row loops).
pub(super) fn each_block<B>(
    x: &[f32],
    y: &mut [B],
    qw: Option<&[f32]>,
    f: impl Fn(&[f32], Option<&[f32]>) -> B,
) {
    let qk = super::k_quants::QK_K;
    for (i, (xb, b)) in x.chunks_exact(qk).zip(y.iter_mut()).enumerate() {
        *b = f(xb, qw.map(|w| &w[qk * i..qk * (i + 1)]));
    }
}

/// [`each_block`] for the types whose quantizer needs the weights.
pub(super) fn each_weighted_block<B>(
    x: &[f32],
    y: &mut [B],
    qw: &[f32],
    f: impl Fn(&[f32], &[f32]) -> B,
) {
    let qk = super::k_quants::QK_K;
    for (i, (xb, b)) in x.chunks_exact(qk).zip(y.iter_mut()).enumerate() {
        *b = f(xb, &qw[qk * i..qk * (i + 1)]);
    }
}

/// A fixed test row and the RMS distance the grid types' round-trip tests
/// share.
#[cfg(test)]
pub(super) mod test_rows {
    pub(in crate::quant) fn row(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    pub(in crate::quant) fn rms(a: &[f32], b: &[f32]) -> f32 {
        let s: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        (s / a.len() as f32).sqrt()
    }
}
