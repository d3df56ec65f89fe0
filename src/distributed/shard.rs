//! [`shard`]: which rows of a global batch each rank trains on.

use std::ops::Range;

/// Rank `rank`'s rows of a global batch of `samples` rows split over `world_size` ranks:
/// contiguous slices, as equal as can be, the first `samples % world_size` ranks one row
/// longer. Every sample of every epoch is trained on exactly once: a short last batch is
/// neither padded with repeated samples (PyTorch's `DistributedSampler`) nor dropped; a rank
/// whose slice is empty (fewer samples than ranks) contributes nothing to that step.
///
/// # Examples
/// ```
/// use candle_functional::distributed::shard;
/// assert_eq!(shard(10, 0, 2), 0..5);
/// assert_eq!(shard(9, 0, 2), 0..5);
/// assert_eq!(shard(9, 1, 2), 5..9);
/// assert_eq!(shard(1, 1, 2), 1..1); // empty
/// ```
pub fn shard(samples: usize, rank: usize, world_size: usize) -> Range<usize> {
    let world = world_size.max(1);
    let (base, extra) = (samples / world, samples % world);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start.min(samples)..(start + len).min(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_sample_once() {
        for world in 1..6 {
            for samples in 0..20 {
                let mut next = 0;
                for rank in 0..world {
                    let range = shard(samples, rank, world);
                    assert_eq!(range.start, next, "{samples} over {world}, rank {rank}");
                    next = range.end;
                    let len = range.len();
                    assert!(len == samples / world || len == samples / world + 1);
                }
                assert_eq!(next, samples);
            }
        }
    }
}
