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

/// The K and V pools of every layer, in host memory or (for a model on a
/// GPU) in device memory with the same block layout.
pub struct KvCache {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_blocks: usize,
    k: Vec<f16>,
    v: Vec<f16>,
    pub(crate) device: Option<crate::cuda::DeviceKv>,
}

impl KvCache {
    /// Bytes one token occupies across all layers (K and V).
    pub fn bytes_per_token(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
        2 * n_layers * n_kv_heads * head_dim * std::mem::size_of::<f16>()
    }

    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        n_blocks: usize,
    ) -> Result<Self> {
        let n = n_layers
            .checked_mul(n_blocks)
            .and_then(|x| x.checked_mul(Self::block_elems_for(n_kv_heads, head_dim)))
            .ok_or_else(|| ModelError::Kv("cache size overflows".into()))?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        k.try_reserve_exact(n)
            .and_then(|_| v.try_reserve_exact(n))
            .map_err(|_| ModelError::Kv(format!("cannot allocate {} bytes of KV cache", 4 * n)))?;
        k.resize(n, f16::ZERO);
        v.resize(n, f16::ZERO);
        Ok(KvCache {
            n_layers,
            n_kv_heads,
            head_dim,
            n_blocks,
            k,
            v,
            device: None,
        })
    }

    /// A cache whose pools live in device memory.
    pub(crate) fn new_on_device(
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
            k: Vec::new(),
            v: Vec::new(),
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

    fn block_elems_for(n_kv_heads: usize, head_dim: usize) -> usize {
        n_kv_heads * BLOCK_SIZE * head_dim
    }

    pub fn block_elems(&self) -> usize {
        Self::block_elems_for(self.n_kv_heads, self.head_dim)
    }

    fn block_start(&self, layer: usize, block: u32) -> usize {
        (layer * self.n_blocks + block as usize) * self.block_elems()
    }

    /// Writes one token's K and V rows (`n_kv_heads * head_dim` values each,
    /// head-major) into `block`/`slot` of `layer`.
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, k_row: &[f32], v_row: &[f32]) {
        let base = self.block_start(layer, block);
        let hd = self.head_dim;
        for h in 0..self.n_kv_heads {
            let dst = base + (h * BLOCK_SIZE + slot) * hd;
            for (d, s) in self.k[dst..dst + hd]
                .iter_mut()
                .zip(&k_row[h * hd..(h + 1) * hd])
            {
                *d = f16::from_f32(*s);
            }
            for (d, s) in self.v[dst..dst + hd]
                .iter_mut()
                .zip(&v_row[h * hd..(h + 1) * hd])
            {
                *d = f16::from_f32(*s);
            }
        }
    }

    /// K of one head in one block: `BLOCK_SIZE` rows of `head_dim`.
    pub fn k_head(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        let s = self.block_start(layer, block) + head * BLOCK_SIZE * self.head_dim;
        &self.k[s..s + BLOCK_SIZE * self.head_dim]
    }

    /// V of one head in one block: `BLOCK_SIZE` rows of `head_dim`.
    pub fn v_head(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        let s = self.block_start(layer, block) + head * BLOCK_SIZE * self.head_dim;
        &self.v[s..s + BLOCK_SIZE * self.head_dim]
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
}
