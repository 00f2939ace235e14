//! Recycled f32 buffers for the merge engine.
//!
//! Every tensor of a merge needs fresh f32 buffers for its inputs. Fresh
//! memory is the kernel's: each page faults and is zero-filled on first
//! touch, which cost about a quarter of a linear merge's CPU time. While a
//! merge runs ([`Scope`]), an owned [`TensorBuf`](super::TensorBuf) that is
//! dropped (a model's input once combined, the output once written) comes
//! back here, and the next tensor's read takes the smallest one that fits.
//! The pool holds at most one largest job's buffers
//! ([`Plan::pool_cap`](super::plan::Plan::pool_cap), counted in the peak
//! memory estimate); it is emptied when the last merge running in the process ends.

use std::sync::Mutex;

struct Pool {
    bufs: Vec<Vec<f32>>,
    /// Bytes held (by capacity).
    bytes: u64,
    /// The most it may hold: the largest budget of the merges running.
    cap: u64,
    /// Merges running.
    users: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    bufs: Vec::new(),
    bytes: 0,
    cap: 0,
    users: 0,
});

fn lock(p: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn bytes(v: &Vec<f32>) -> u64 {
    (v.capacity() * 4) as u64
}

/// An empty vector with room for `len` values: a recycled one when the pool
/// has one large enough (the smallest such), else a new one.
pub fn take(len: usize) -> Vec<f32> {
    take_from(&POOL, len)
}

fn take_from(pool: &Mutex<Pool>, len: usize) -> Vec<f32> {
    let mut p = lock(pool);
    let best = p
        .bufs
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i);
    match best {
        Some(i) => {
            let mut v = p.bufs.swap_remove(i);
            p.bytes -= bytes(&v);
            v.clear();
            v
        }
        None => {
            drop(p);
            Vec::with_capacity(len)
        }
    }
}

/// `len` zeros in a vector from [`take`].
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.resize(len, 0.0);
    v
}

/// Give a vector back: kept while a merge runs and the pool has room, else freed.
pub fn give(v: Vec<f32>) {
    give_to(&POOL, v)
}

fn give_to(pool: &Mutex<Pool>, v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    let mut evicted = Vec::new();
    {
        let mut p = lock(pool);
        if p.users == 0 {
            return;
        }
        p.bytes += bytes(&v);
        p.bufs.push(v);
        // Over the cap, the largest buffers go first: a pool full of a few
        // large tensors' buffers (the embeddings) would otherwise turn away
        // every smaller one, and each later tensor would fault in fresh pages.
        while p.bytes > p.cap {
            let largest = (0..p.bufs.len())
                .max_by_key(|&i| p.bufs[i].capacity())
                .expect("bytes > 0");
            let b = p.bufs.swap_remove(largest);
            p.bytes -= bytes(&b);
            evicted.push(b);
        }
    }
    drop(evicted); // freed outside the lock
}

/// A merge running: buffers are pooled, up to `cap` bytes, until the last
/// scope ends.
pub struct Scope(());

impl Scope {
    pub fn new(cap: u64) -> Scope {
        enter(&POOL, cap);
        Scope(())
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        leave(&POOL);
    }
}

fn enter(pool: &Mutex<Pool>, cap: u64) {
    let mut p = lock(pool);
    p.users += 1;
    p.cap = p.cap.max(cap);
}

fn leave(pool: &Mutex<Pool>) {
    let freed = {
        let mut p = lock(pool);
        p.users -= 1;
        if p.users > 0 {
            return;
        }
        p.cap = 0;
        p.bytes = 0;
        std::mem::take(&mut p.bufs)
    };
    drop(freed);
}

#[cfg(test)]
mod tests {
    use super::*;

    // On a pool of its own: the process-wide one is shared with other tests.
    #[test]
    fn buffers_are_reused_within_a_scope_and_freed_after() {
        let pool = Mutex::new(Pool {
            bufs: Vec::new(),
            bytes: 0,
            cap: 0,
            users: 0,
        });
        enter(&pool, 1 << 20);
        let a = take_from(&pool, 1000);
        let ptr = a.as_ptr();
        give_to(&pool, a);
        let b = take_from(&pool, 500);
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is reused");
        assert!(b.is_empty() && b.capacity() >= 1000);
        let c = take_from(&pool, 2000);
        assert_ne!(c.as_ptr(), ptr, "too small: a new one");
        // over the cap: freed, not kept
        give_to(&pool, Vec::with_capacity(1 << 20));
        assert!(lock(&pool).bytes <= 1 << 20);
        // a full pool makes room for a smaller buffer by freeing its largest
        give_to(&pool, Vec::with_capacity(1 << 18)); // exactly the cap
        give_to(&pool, Vec::with_capacity(100));
        {
            let p = lock(&pool);
            let caps: Vec<usize> = p.bufs.iter().map(|b| b.capacity()).collect();
            assert_eq!(caps, vec![100]);
            assert_eq!(p.bytes, 400);
        }
        leave(&pool);
        give_to(&pool, b);
        assert_eq!(lock(&pool).bufs.len(), 0, "nothing is kept outside a merge");
    }
}
