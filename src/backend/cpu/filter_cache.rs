//! Filters packed for the GEMM, kept for reuse: a search runs the same
//! frozen filters thousands of times, and packing (or transforming) a layer
//! of 512x512 filters costs more than multiplying a small batch by it.
//!
//! An entry keeps a copy of the filters it came from and serves only a
//! request whose filters have the same bits, so a filter updated in place
//! (training) is packed again, never served stale. The check reads the
//! filters once in order, cheaper than packing them.
//!
//! A packing made for a buffer whose bits have since changed is dropped
//! when that buffer is packed again: in training every step changes the
//! filters in place, and keeping each step's packings until the cache was
//! full held a gigabyte of dead ones (resnet18 training at batch 32: 1.45
//! GB resident, 0.70 GB with only the latest step's).

use std::sync::{Arc, Mutex};

use super::chain_gemm::PackedA;

/// How the filters were packed: the same bits packed two ways, or read as
/// two shapes, are two entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Packing {
    /// The dense forward's `W` (`[O, C*KH*KW]`).
    Dense,
    /// The dense input gradient's `W^T`, cut into parts of this many input
    /// channels.
    DenseAdjoint { per_part: usize },
    /// The Winograd transforms of the filters (or, `adjoint`, of the
    /// flipped, channel-swapped filters of backward-data) for output tiles
    /// of side `tile`.
    Winograd { adjoint: bool, tile: usize },
}

struct Entry {
    packing: Packing,
    shape: [usize; 4],
    /// Where the filters were read from (address, length): only compared,
    /// never dereferenced.
    source: (usize, usize),
    filters: Vec<f32>,
    packed: Arc<Vec<PackedA>>,
    /// The request that last found or made this entry.
    last_use: u64,
}

impl Entry {
    /// Floats held: the copy of the filters and their packing.
    fn size(&self) -> usize {
        self.filters.len() + self.packed.iter().map(PackedA::len).sum::<usize>()
    }
}

/// Floats the cache may hold (copies and packings), 256 Mi (1 GiB): the
/// filters of the largest zoo model (wrn28_10, 36 M) with the packings a
/// search step uses (the forward's, and the F(4x4) Winograd transforms,
/// four times the filters, or the transpose of backward-data), about
/// 255 M.
const LIMIT: usize = 1 << 28;

struct Cache {
    entries: Vec<Entry>,
    /// Requests so far.
    tick: u64,
    /// Requests between the last hit and the previous use of its entry:
    /// the length of the cycle (one step of a model) now running.
    reuse: Option<u64>,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache::new());

/// `make()` for the filters `w` of `shape` (`[O, C, KH, KW]`) packed as
/// `packing`, from the cache when an entry has the same packing, shape and
/// bits. `make` must depend on these alone.
///
/// When the cache is full, entries unused for two cycles (the reuse
/// distance of the last hit; before any hit, four requests per entry held)
/// make room, least recently used first: a model passed through, or
/// filters that train and change every step. Entries in use stay, and a new
/// packing that does not fit is not kept: a model too large to keep whole
/// keeps a fixed part of its layers, where evicting the least recently used
/// would evict every layer just before its next use.
pub(super) fn packed(
    packing: Packing,
    shape: [usize; 4],
    w: &[f32],
    make: impl FnOnce() -> Vec<PackedA>,
) -> Arc<Vec<PackedA>> {
    let key = |e: &Entry| e.packing == packing && e.shape == shape;
    if let Ok(mut cache) = CACHE.lock() {
        if let Some(hit) = cache.find(key, w) {
            return hit;
        }
    }
    let entry = Entry {
        packing,
        shape,
        source: (w.as_ptr() as usize, w.len()),
        filters: w.to_vec(),
        packed: Arc::new(make()),
        last_use: 0,
    };
    let packed = Arc::clone(&entry.packed);
    if let Ok(mut cache) = CACHE.lock() {
        cache.keep(entry, LIMIT);
    }
    packed
}

impl Cache {
    const fn new() -> Cache {
        Cache {
            entries: Vec::new(),
            tick: 0,
            reuse: None,
        }
    }

    /// The packing of an entry that `key` accepts and whose filters have
    /// the bits of `w`; counts a request either way.
    fn find(&mut self, key: impl Fn(&Entry) -> bool, w: &[f32]) -> Option<Arc<Vec<PackedA>>> {
        self.tick += 1;
        let bits = bytemuck::cast_slice::<f32, u32>(w);
        let e = self.entries.iter_mut().find(|e| {
            key(e)
                && e.filters.len() == w.len()
                && bytemuck::cast_slice::<f32, u32>(&e.filters) == bits
        })?;
        self.reuse = Some(self.tick - e.last_use);
        e.last_use = self.tick;
        Some(Arc::clone(&e.packed))
    }

    /// Keeps `entry` if it fits within `limit` floats, after evicting what
    /// has gone unused for a while (see [`packed`]) and what the same
    /// buffer held before as the same packing: `entry` was made on a miss,
    /// so that buffer's bits have changed since (the module doc).
    fn keep(&mut self, mut entry: Entry, limit: usize) {
        entry.last_use = self.tick;
        self.entries.retain(|e| {
            (e.packing, e.shape, e.source) != (entry.packing, entry.shape, entry.source)
        });
        let window = (self.reuse.map(|r| 2 * r)).unwrap_or(4 * self.entries.len() as u64);
        let stale = self.tick.saturating_sub(window);
        let mut total: usize = self.entries.iter().map(Entry::size).sum();
        while total + entry.size() > limit {
            let oldest = (self.entries.iter().enumerate())
                .filter(|(_, e)| e.last_use < stale)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(i, _)| i);
            let Some(i) = oldest else { break };
            total -= self.entries.remove(i).size();
        }
        if total + entry.size() <= limit {
            self.entries.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(w: &[f32]) -> Entry {
        Entry {
            packing: Packing::Dense,
            shape: [1, w.len(), 1, 1],
            source: (w.as_ptr() as usize, w.len()),
            filters: w.to_vec(),
            packed: Arc::new(pack(w)),
            last_use: 0,
        }
    }

    #[test]
    fn a_full_cache_keeps_the_layers_in_use_and_drops_the_ones_gone_stale() {
        // Each entry holds 2 + 6 floats (the copy, one packed block of
        // MR rows); room for three.
        let limit = 24;
        let mut cache = Cache::new();
        let layers: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32, 1.0]).collect();
        let any = |_: &Entry| true;
        let request = |cache: &mut Cache, w: &[f32]| {
            if cache.find(any, w).is_none() {
                cache.keep(entry(w), limit);
            }
        };
        // A model of five layers, in turn: three are kept, and the other
        // two do not push them out, so every pass hits the same three.
        for _ in 0..10 {
            for w in &layers {
                request(&mut cache, w);
            }
        }
        let held: Vec<f32> = cache.entries.iter().map(|e| e.filters[0]).collect();
        assert_eq!(held, [0.0, 1.0, 2.0]);
        // Another model: once the first has gone unused for a while, its
        // layers make room.
        let next: Vec<Vec<f32>> = (0..2).map(|i| vec![10.0 + i as f32, 1.0]).collect();
        for _ in 0..10 {
            for w in &next {
                request(&mut cache, w);
            }
        }
        for w in &next {
            assert!(cache.find(any, w).is_some(), "{w:?} kept");
        }
        // Training: new bits at every request, never found again. They do
        // not keep the model that follows out.
        for i in 0..50 {
            request(&mut cache, &[100.0 + i as f32, 1.0]);
        }
        for _ in 0..10 {
            for w in &layers[..2] {
                request(&mut cache, w);
            }
        }
        for w in &layers[..2] {
            assert!(cache.find(any, w).is_some(), "{w:?} kept after training");
        }
    }

    #[test]
    fn filters_trained_in_place_hold_one_packing_per_buffer() {
        // Two layers of one shape in their own buffers, changed in place
        // after every pass as a training step changes them: each pass
        // misses, and each buffer's new packing replaces its old one
        // instead of piling up until the cache is full.
        let mut cache = Cache::new();
        let any = |_: &Entry| true;
        let mut layers = [vec![1.0f32, 2.0], vec![3.0f32, 4.0]];
        for _ in 0..20 {
            for w in &layers {
                assert!(cache.find(any, w).is_none(), "new bits never hit");
                cache.keep(entry(w), 1 << 20);
            }
            for w in layers.iter_mut() {
                w[0] += 0.5;
            }
        }
        let held: Vec<Vec<f32>> = cache.entries.iter().map(|e| e.filters.clone()).collect();
        assert_eq!(held, [vec![10.5, 2.0], vec![12.5, 4.0]]);
        // Frozen again (a search after training): both are served.
        for w in &mut layers {
            w[0] -= 0.5;
            assert!(cache.find(any, w).is_some(), "{w:?} served");
        }
    }

    fn pack(w: &[f32]) -> Vec<PackedA> {
        vec![PackedA::new(w, 2, w.len() / 2, w.len() / 2, 1)]
    }

    #[test]
    fn an_entry_serves_only_the_same_bits_packed_the_same_way_as_the_same_shape() {
        let w = vec![0.5f32, -1.0, 2.0, 0.25];
        let shape = [2, 2, 1, 1];
        let first = packed(Packing::Dense, shape, &w, || pack(&w));
        let again = packed(Packing::Dense, shape, &w, || {
            panic!("served from the cache")
        });
        assert!(Arc::ptr_eq(&first, &again));
        // Another packing, or another shape, of the same bits is another
        // entry.
        let other = packed(Packing::DenseAdjoint { per_part: 1 }, shape, &w, || {
            pack(&w)
        });
        assert!(!Arc::ptr_eq(&first, &other));
        let other = packed(Packing::Dense, [1, 4, 1, 1], &w, || pack(&w));
        assert!(!Arc::ptr_eq(&first, &other));
        // A filter changed in place (by one bit) is packed again.
        let mut w2 = w.clone();
        w2[3] = f32::from_bits(w2[3].to_bits() ^ 1);
        let mut made = false;
        packed(Packing::Dense, shape, &w2, || {
            made = true;
            pack(&w2)
        });
        assert!(made);
    }
}
