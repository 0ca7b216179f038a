//! Work done on worker threads with the results taken in the order the items were
//! given: the serving side decodes and checks blocks on every core while one thread
//! reads the stream and writes the device in order.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::thread::Scope;

/// A pool of workers applying one function; item `n` goes to worker `n % K`, and results
/// are taken back round-robin, so in order.
pub struct Ordered<I, O> {
    giver: Giver<I>,
    taker: Taker<O>,
}

/// The giving half of a split [`Ordered`].
pub struct Giver<I> {
    lanes: Vec<SyncSender<I>>,
    given: usize,
}

/// The taking half of a split [`Ordered`], for another thread.
pub struct Taker<O> {
    lanes: Vec<Receiver<O>>,
    taken: usize,
}

impl<I: Send, O: Send> Ordered<I, O> {
    /// Starts `workers` scoped threads applying `work`; each holds at most `depth` items
    /// waiting.
    pub fn spawn<'scope, 'env, F>(scope: &'scope Scope<'scope, 'env>, workers: usize, depth: usize, work: F) -> Self
    where
        I: 'scope,
        O: 'scope,
        F: Fn(I) -> O + Send + Sync + 'scope,
    {
        let work = Arc::new(work);
        let (give, take) = (0..workers.max(1))
            .map(|_| {
                let (give, items) = sync_channel::<I>(depth.max(1));
                let (done, results) = channel::<O>();
                let work = Arc::clone(&work);
                scope.spawn(move || {
                    for item in items {
                        if done.send(work(item)).is_err() {
                            return;
                        }
                    }
                });
                (give, results)
            })
            .unzip();
        Ordered { giver: Giver { lanes: give, given: 0 }, taker: Taker { lanes: take, taken: 0 } }
    }

    /// Items given and not taken back yet.
    pub fn outstanding(&self) -> usize {
        self.giver.given - self.taker.taken
    }

    /// Gives an item to the next worker (blocking while its queue is full).
    pub fn give(&mut self, item: I) {
        self.giver.give(item);
    }

    /// The result of the oldest item not taken yet, waiting for it; `None` when nothing
    /// is outstanding. A worker whose function panicked yields `Err(())` in place of its
    /// result.
    pub fn take(&mut self) -> Option<Result<O, ()>> {
        (self.outstanding() > 0).then(|| self.taker.take().ok_or(()))
    }

    /// Splits the pool so that one thread gives items and another takes the results.
    pub fn split(self) -> (Giver<I>, Taker<O>) {
        (self.giver, self.taker)
    }
}

impl<I> Giver<I> {
    /// Gives an item to the next worker (blocking while its queue is full).
    pub fn give(&mut self, item: I) {
        let lane = &self.lanes[self.given % self.lanes.len()];
        // A worker only goes when its function panicked: the taker then reports it gone.
        let _ = lane.send(item);
        self.given += 1;
    }

    /// Items given so far.
    pub fn given(&self) -> usize {
        self.given
    }
}

impl<O> Taker<O> {
    /// The next result in order, waiting for it; `None` once the giver is gone and
    /// every result was taken (or a worker's function panicked).
    pub fn take(&mut self) -> Option<O> {
        let lane = &self.lanes[self.taken % self.lanes.len()];
        let result = lane.recv().ok()?;
        self.taken += 1;
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_the_order_given_whatever_each_item_costs() {
        let out: Vec<u64> = std::thread::scope(|s| {
            let mut pool = Ordered::spawn(s, 3, 2, |n: u64| {
                std::thread::sleep(std::time::Duration::from_micros((n * 7919) % 500));
                n * n
            });
            let mut out = Vec::new();
            for n in 0..50 {
                pool.give(n);
                while pool.outstanding() > 4 {
                    out.push(pool.take().unwrap().unwrap());
                }
            }
            while let Some(r) = pool.take() {
                out.push(r.unwrap());
            }
            assert!(pool.take().is_none());
            out
        });
        assert_eq!(out, (0..50).map(|n| n * n).collect::<Vec<_>>());
    }

    #[test]
    fn a_split_pool_gives_on_one_thread_and_takes_in_order_on_another() {
        let out: Vec<u64> = std::thread::scope(|s| {
            let (mut give, mut take) = Ordered::spawn(s, 2, 1, |n: u64| n + 1).split();
            let taker = s.spawn(move || std::iter::from_fn(|| take.take()).collect::<Vec<_>>());
            for n in 0..20 {
                give.give(n);
            }
            assert_eq!(give.given(), 20);
            drop(give);
            taker.join().unwrap()
        });
        assert_eq!(out, (1..21).collect::<Vec<_>>());
    }
}
