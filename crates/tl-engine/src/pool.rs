//! The KV block pool with its prefix cache.
//!
//! Block layout: the cache (`tl_model::kv::KvCache`) is one preallocated
//! pool of blocks of [`BLOCK_SIZE`] token slots per layer, K and V apart.
//! A sequence's block table maps its token `t` to block `blocks[t / 16]`,
//! slot `t % 16`. Blocks are handed out by `tl_model::kv::BlockManager`,
//! which counts references.
//!
//! Prefix caching (after vLLM's automatic prefix caching): once a block is
//! full, its contents are fixed by the tokens it holds *and* every token
//! before it, so it is named by a chain hash `h_i = H(h_{i-1}, tokens of
//! block i)`. The table maps hash → block; the table itself holds one
//! reference on each block it names, so a block whose sequences have all
//! finished stays cached (reference count 1 = "only the cache") until the
//! pool runs dry, when such blocks are evicted least recently used first.
//! Only full blocks are ever shared, so no shared block is written again and
//! copy-on-write is never needed: a sequence always writes into blocks past
//! its shared prefix, which it owns alone.
//!
//! A hit is verified against the stored parent hash and tokens, so a hash
//! collision can cost a miss but never a wrong answer.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};

use tl_model::kv::{BlockManager, SeqKv, BLOCK_SIZE};

use crate::error::{EngineError, Result};

/// Chain hash of a full block given its parent's hash.
pub(crate) fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    // Fixed keys: hashes must be stable for the life of the process only,
    // and `DefaultHasher::new()` is deterministic.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    h.write_u64(parent);
    for &t in tokens {
        h.write_u32(t);
    }
    h.finish()
}

struct Cached {
    block: u32,
    parent: u64,
    tokens: [u32; BLOCK_SIZE],
    tick: u64,
}

/// Counters of the prefix cache, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up (full blocks only).
    pub queried: u64,
    /// Of those, tokens whose KV was reused.
    pub hit: u64,
}

/// Blocks, their reference counts and the prefix-cache table.
pub struct BlockPool {
    mgr: BlockManager,
    caching: bool,
    table: HashMap<u64, Cached>,
    /// block → its hash, for blocks in the table.
    hash_of: HashMap<u32, u64>,
    /// tick → hash; the oldest cached block first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    pub(crate) stats: PrefixStats,
}

impl BlockPool {
    pub fn new(n_blocks: usize, prefix_caching: bool) -> Self {
        BlockPool {
            mgr: BlockManager::new(n_blocks),
            caching: prefix_caching,
            table: HashMap::new(),
            hash_of: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn n_total(&self) -> usize {
        self.mgr.n_total()
    }

    /// Blocks on the free list.
    pub fn n_free(&self) -> usize {
        self.mgr.n_free()
    }

    /// Blocks held only by the prefix cache (reusable on demand).
    pub fn n_evictable(&self) -> usize {
        self.table
            .values()
            .filter(|c| self.mgr.ref_count(c.block) == 1)
            .count()
    }

    /// Blocks held by the prefix cache, referenced by sequences or not.
    pub fn n_cached(&self) -> usize {
        self.table.len()
    }

    /// Blocks a new allocation can get: free plus evictable.
    pub fn available(&self) -> usize {
        self.n_free() + self.n_evictable()
    }

    /// Blocks referenced by live sequences.
    pub fn n_used(&self) -> usize {
        self.n_total() - self.available()
    }

    pub fn ref_count(&self, b: u32) -> u32 {
        self.mgr.ref_count(b)
    }

    fn touch(&mut self, hash: u64) {
        self.tick += 1;
        let t = self.tick;
        if let Some(c) = self.table.get_mut(&hash) {
            self.lru.remove(&c.tick);
            c.tick = t;
            self.lru.insert(t, hash);
        }
    }

    /// Drops the least recently used block that only the cache holds.
    fn evict_one(&mut self) -> Result<bool> {
        let victim = self.lru.iter().find_map(|(&tick, &hash)| {
            let c = self.table.get(&hash)?;
            (self.mgr.ref_count(c.block) == 1).then_some((tick, hash, c.block))
        });
        let Some((tick, hash, block)) = victim else {
            return Ok(false);
        };
        self.lru.remove(&tick);
        self.table.remove(&hash);
        self.hash_of.remove(&block);
        self.release(block)?;
        Ok(true)
    }

    fn allocate(&mut self) -> Result<Option<u32>> {
        loop {
            if let Some(b) = self.mgr.allocate() {
                return Ok(Some(b));
            }
            if !self.evict_one()? {
                return Ok(None);
            }
        }
    }

    fn release(&mut self, b: u32) -> Result<()> {
        self.mgr
            .release(b)
            .map_err(|e| EngineError::Model(e.to_string()))
    }

    /// Grows `kv`'s block table to hold `n` more tokens past `kv.len`.
    /// On failure nothing is allocated and `false` is returned.
    pub fn reserve(&mut self, kv: &mut SeqKv, n: usize) -> Result<bool> {
        let need = (kv.len + n)
            .div_ceil(BLOCK_SIZE)
            .saturating_sub(kv.blocks.len());
        if need > self.available() {
            return Ok(false);
        }
        for _ in 0..need {
            match self.allocate()? {
                Some(b) => kv.blocks.push(b),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Blocks still to allocate for `kv` to hold `n` more tokens.
    pub fn blocks_needed(kv: &SeqKv, n: usize) -> usize {
        (kv.len + n)
            .div_ceil(BLOCK_SIZE)
            .saturating_sub(kv.blocks.len())
    }

    /// Returns a sequence's blocks. Cached blocks stay in the table; they are
    /// touched last-to-first so that a chain's head outlives its tail.
    pub fn free_seq(&mut self, kv: &mut SeqKv) -> Result<()> {
        for b in std::mem::take(&mut kv.blocks).into_iter().rev() {
            if let Some(&h) = self.hash_of.get(&b) {
                self.touch(h);
            }
            self.release(b)?;
        }
        kv.len = 0;
        Ok(())
    }

    /// Records full block `index` of a sequence (`tokens` = its 16 tokens,
    /// already written to the cache) under its chain hash; returns the hash.
    pub fn register(&mut self, parent: u64, tokens: &[u32], block: u32) -> Result<u64> {
        let hash = block_hash(parent, tokens);
        if !self.caching || self.table.contains_key(&hash) || self.hash_of.contains_key(&block) {
            return Ok(hash);
        }
        let mut toks = [0u32; BLOCK_SIZE];
        toks.copy_from_slice(&tokens[..BLOCK_SIZE]);
        self.mgr
            .retain(block)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        self.tick += 1;
        self.table.insert(
            hash,
            Cached {
                block,
                parent,
                tokens: toks,
                tick: self.tick,
            },
        );
        self.lru.insert(self.tick, hash);
        self.hash_of.insert(block, hash);
        Ok(hash)
    }

    /// Reuses cached blocks for the longest cached prefix of `tokens`, never
    /// the whole of it (the last token must be computed for its logits).
    /// Appends the blocks to the empty `kv`, sets `kv.len`, and returns the
    /// number of blocks matched and the chain hash of the last one.
    pub fn lookup(&mut self, tokens: &[u32], kv: &mut SeqKv) -> Result<(usize, u64)> {
        let max_blocks = tokens.len().saturating_sub(1) / BLOCK_SIZE;
        let mut parent = 0u64;
        let mut matched = 0;
        if self.caching {
            self.stats.queried += (max_blocks * BLOCK_SIZE) as u64;
        }
        while self.caching && matched < max_blocks {
            let toks = &tokens[matched * BLOCK_SIZE..(matched + 1) * BLOCK_SIZE];
            let hash = block_hash(parent, toks);
            let Some(c) = self.table.get(&hash) else {
                break;
            };
            if c.parent != parent || c.tokens[..] != *toks {
                break;
            }
            let b = c.block;
            self.mgr
                .retain(b)
                .map_err(|e| EngineError::Model(e.to_string()))?;
            self.touch(hash);
            kv.blocks.push(b);
            parent = hash;
            matched += 1;
        }
        kv.len = matched * BLOCK_SIZE;
        self.stats.hit += kv.len as u64;
        Ok((matched, parent))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn toks(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    /// Fills `kv` as a forward pass would and registers its full blocks.
    fn run(pool: &mut BlockPool, tokens: &[u32]) -> SeqKv {
        let mut kv = SeqKv::new();
        let (matched, mut parent) = pool.lookup(tokens, &mut kv).expect("lookup");
        let rest = tokens.len() - kv.len;
        assert!(pool.reserve(&mut kv, rest).expect("ok"));
        kv.len = tokens.len();
        for i in matched..tokens.len() / BLOCK_SIZE {
            parent = pool
                .register(
                    parent,
                    &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
                    kv.blocks[i],
                )
                .expect("register");
        }
        kv
    }

    #[test]
    fn repeated_prefix_reuses_full_blocks_only() {
        let mut pool = BlockPool::new(16, true);
        let p = toks(40, 1); // 2 full blocks + 8
        let mut a = run(&mut pool, &p);
        assert_eq!(pool.n_cached(), 2);
        let mut b = SeqKv::new();
        let (m, _) = pool.lookup(&p, &mut b).expect("lookup");
        assert_eq!(m, 2);
        assert_eq!(b.blocks[..], a.blocks[..2], "shares the same blocks");
        assert_eq!(b.len, 32);
        assert_eq!(pool.ref_count(a.blocks[0]), 3, "two sequences + the cache");
        pool.free_seq(&mut a).expect("free");
        pool.free_seq(&mut b).expect("free");
        assert_eq!(pool.n_used(), 0);
        assert_eq!(pool.n_free(), 14);
        assert_eq!(pool.n_evictable(), 2);
        assert_eq!(pool.stats.hit, 32);
    }

    #[test]
    fn exact_block_multiple_leaves_the_last_token_to_compute() {
        let mut pool = BlockPool::new(8, true);
        let p = toks(32, 3);
        let mut a = run(&mut pool, &p);
        pool.free_seq(&mut a).expect("free");
        let mut b = SeqKv::new();
        let (m, _) = pool.lookup(&p, &mut b).expect("lookup");
        assert_eq!(
            m, 1,
            "block 2 holds the last token, which must be recomputed"
        );
    }

    #[test]
    fn different_prefix_misses_and_divergence_stops_the_chain() {
        let mut pool = BlockPool::new(16, true);
        let p = toks(48, 1);
        let mut a = run(&mut pool, &p);
        let mut q = p.clone();
        q[20] = 999; // block 1 differs
        let mut b = SeqKv::new();
        assert_eq!(pool.lookup(&q, &mut b).expect("lookup").0, 1);
        let mut c = SeqKv::new();
        assert_eq!(pool.lookup(&toks(48, 2), &mut c).expect("lookup").0, 0);
        for kv in [&mut a, &mut b, &mut c] {
            pool.free_seq(kv).expect("free");
        }
        assert_eq!(pool.n_used(), 0);
    }

    #[test]
    fn lru_eviction_when_the_pool_runs_dry() {
        let mut pool = BlockPool::new(4, true);
        let p1 = toks(33, 1); // 3 blocks, 2 full
        let mut a = run(&mut pool, &p1);
        pool.free_seq(&mut a).expect("free");
        assert_eq!((pool.n_free(), pool.n_evictable()), (2, 2));
        // Needs 4 blocks: both cached blocks are evicted.
        let p2 = toks(64, 9);
        let mut b = run(&mut pool, &p2);
        assert_eq!(pool.n_free(), 0);
        assert_eq!(pool.n_cached(), 4);
        let mut c = SeqKv::new();
        assert_eq!(pool.lookup(&p1, &mut c).expect("lookup").0, 0, "evicted");
        assert!(!pool.reserve(&mut c, 1).expect("ok"), "all blocks in use");
        pool.free_seq(&mut b).expect("free");
        assert!(
            pool.reserve(&mut c, 20).expect("ok"),
            "cached blocks are evictable"
        );
        pool.free_seq(&mut c).expect("free");
    }

    #[test]
    fn caching_off_never_shares() {
        let mut pool = BlockPool::new(8, false);
        let p = toks(40, 1);
        let mut a = run(&mut pool, &p);
        pool.free_seq(&mut a).expect("free");
        assert_eq!(pool.n_free(), 8);
        let mut b = SeqKv::new();
        assert_eq!(pool.lookup(&p, &mut b).expect("lookup").0, 0);
    }
}
