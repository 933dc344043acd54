//! Step plans of the ring operations: which element range each rank sends to its right
//! neighbour and receives from its left neighbour at every step.
//!
//! Every step first sends (if it has something to send), then waits for its receive and
//! applies it. Messages on a link are consumed in the order they are sent, so the plans of
//! neighbouring ranks only have to agree on the sequence of ranges, which they do by
//! construction.

use std::ops::Range;

/// What to do with received elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Overwrite the range.
    Copy,
    /// Add into the range.
    Add,
    /// Add into the range, then divide by the world size (the owner's final step).
    AddDiv,
}

/// One ring step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// Range of the buffer sent to the right neighbour.
    pub send: Option<Range<usize>>,
    /// Range of the buffer received from the left neighbour, and what to do with it.
    pub recv: Option<(Range<usize>, Action)>,
}

/// Chunk `i` of `w` nearly equal chunks of `range` (sizes differ by at most one).
pub(crate) fn chunk(range: &Range<usize>, w: usize, i: usize) -> Range<usize> {
    let len = range.end - range.start;
    range.start + len * i / w..range.start + len * (i + 1) / w
}

/// Ring all-reduce of `n` elements in buckets of `bucket` elements: per bucket W−1
/// reduce-scatter steps (the last one finishing this rank's owned chunk `(r+1) % W` with a
/// division by W) followed by W−1 all-gather steps. Even `n == 0` gets one (empty) bucket,
/// so that the operation's arguments are still compared on the wire.
pub(crate) fn all_reduce(n: usize, bucket: usize, r: usize, w: usize, out: &mut Vec<Step>) {
    out.clear();
    let bucket = bucket.max(1);
    let buckets = n.div_ceil(bucket).max(1);
    for b in 0..buckets {
        let range = (b * bucket).min(n)..((b + 1) * bucket).min(n);
        for s in 0..w - 1 {
            let action = if s == w - 2 {
                Action::AddDiv
            } else {
                Action::Add
            };
            out.push(Step {
                send: Some(chunk(&range, w, (r + w - s) % w)),
                recv: Some((chunk(&range, w, (r + w - s - 1) % w), action)),
            });
        }
        for s in 0..w - 1 {
            out.push(Step {
                send: Some(chunk(&range, w, (r + 1 + w - s) % w)),
                recv: Some((chunk(&range, w, (r + w - s) % w), Action::Copy)),
            });
        }
    }
}

/// Ring all-gather of W blocks of `n` elements (block `k` at `k*n..(k+1)*n`, this rank's
/// own block already in place): W−1 steps forwarding the block received last.
pub(crate) fn all_gather(n: usize, r: usize, w: usize, out: &mut Vec<Step>) {
    out.clear();
    let block = |k: usize| k * n..(k + 1) * n;
    for s in 0..w - 1 {
        out.push(Step {
            send: Some(block((r + w - s) % w)),
            recv: Some((block((r + w - s - 1) % w), Action::Copy)),
        });
    }
}

/// Pipelined ring broadcast of `n` elements from `root` in segments of `seg` elements: the
/// root sends every segment, the others receive it and forward it unless their right
/// neighbour is the root.
pub(crate) fn broadcast(
    n: usize,
    seg: usize,
    r: usize,
    w: usize,
    root: usize,
    out: &mut Vec<Step>,
) {
    out.clear();
    let seg = seg.max(1);
    let nseg = n.div_ceil(seg).max(1);
    let segment = |k: usize| (k * seg).min(n)..((k + 1) * seg).min(n);
    let d = (r + w - root) % w;
    if d == 0 {
        out.extend((0..nseg).map(|k| Step {
            send: Some(segment(k)),
            recv: None,
        }));
    } else if d == w - 1 {
        out.extend((0..nseg).map(|k| Step {
            send: None,
            recv: Some((segment(k), Action::Copy)),
        }));
    } else {
        out.extend((0..=nseg).map(|k| Step {
            send: (k > 0).then(|| segment(k - 1)),
            recv: (k < nseg).then(|| (segment(k), Action::Copy)),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_range() {
        for len in [0usize, 1, 3, 7, 10] {
            for w in 1..=5 {
                let r = 5..5 + len;
                let mut at = r.start;
                for i in 0..w {
                    let c = chunk(&r, w, i);
                    assert_eq!(c.start, at);
                    assert!(c.len() <= len / w + 1);
                    at = c.end;
                }
                assert_eq!(at, r.end);
            }
        }
    }

    #[test]
    fn owner_finishes_chunk_after_r_plus_one() {
        let mut steps = Vec::new();
        for w in 2..=5 {
            for r in 0..w {
                all_reduce(10, 100, r, w, &mut steps);
                assert_eq!(steps.len(), 2 * (w - 1));
                let (range, action) = steps[w - 2].recv.clone().unwrap();
                assert_eq!(action, Action::AddDiv);
                assert_eq!(range, chunk(&(0..10), w, (r + 1) % w));
                assert_eq!(steps[w - 1].send.clone().unwrap(), range);
            }
        }
    }
}
