//! A bounded queue between two threads of this process that either end can close: what
//! carries a local run's frames whole between the client and its endpoint on a thread,
//! with no pipe and no copy of the data. Its bound is in bytes, as a pipe's is.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What the two ends share.
struct Shared<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

struct State<T> {
    items: VecDeque<(T, usize)>,
    /// Sum of the queued items' weights.
    bytes: usize,
    capacity: usize,
    /// The sender is gone: the receiver takes what is queued, then sees the end.
    sender_gone: bool,
    /// The receiver is gone, or the queue was cut: nothing more passes either way.
    cut: bool,
}

/// The sending end; dropping it ends the stream after what is queued.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving end; dropping it makes further sends fail.
pub struct Receiver<T>(Arc<Shared<T>>);

/// Cuts the queue from anywhere: what is queued is dropped, both ends fail from then on.
#[derive(Clone)]
pub struct Cutter<T>(Arc<Shared<T>>);

/// A queue that holds up to `capacity` bytes of items (and always at least one item).
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>, Cutter<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), bytes: 0, capacity, sender_gone: false, cut: false }),
        changed: Condvar::new(),
    });
    (Sender(shared.clone()), Receiver(shared.clone()), Cutter(shared))
}

impl<T> Shared<T> {
    /// The state, whoever panicked while holding it (every change to it is whole).
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State<T>>) -> MutexGuard<'a, State<T>> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    fn cut(&self) {
        let mut s = self.lock();
        s.cut = true;
        s.items.clear();
        s.bytes = 0;
        drop(s);
        self.changed.notify_all();
    }
}

impl<T> Sender<T> {
    /// Queues `item`, which weighs `weight` bytes, waiting while the queue is full.
    /// Fails (giving the item back) once the receiver is gone or the queue was cut.
    pub fn send(&self, item: T, weight: usize) -> Result<(), T> {
        let mut s = self.0.lock();
        while !s.cut && !s.items.is_empty() && s.bytes + weight > s.capacity {
            s = self.0.wait(s);
        }
        if s.cut {
            return Err(item);
        }
        s.items.push_back((item, weight));
        s.bytes += weight;
        drop(s);
        self.0.changed.notify_all();
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.lock().sender_gone = true;
        self.0.changed.notify_all();
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once the sender is gone and nothing is
    /// left, or the queue was cut.
    pub fn recv(&self) -> Option<T> {
        self.recv_weighed().map(|(item, _)| item)
    }

    /// [`Receiver::recv`], with the weight the item was sent with.
    pub fn recv_weighed(&self) -> Option<(T, usize)> {
        let mut s = self.0.lock();
        loop {
            if s.cut {
                return None;
            }
            if let Some((item, weight)) = s.items.pop_front() {
                s.bytes -= weight;
                drop(s);
                self.0.changed.notify_all();
                return Some((item, weight));
            }
            if s.sender_gone {
                return None;
            }
            s = self.0.wait(s);
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.cut();
    }
}

impl<T> Cutter<T> {
    /// Cuts the queue: waiting ends on both sides return, and nothing more passes.
    pub fn cut(&self) {
        self.0.cut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn items_pass_in_order_and_the_end_follows_the_last() {
        let (tx, rx, _) = bounded(10);
        let t = std::thread::spawn(move || {
            for i in 0..100u32 {
                tx.send(i, 4).unwrap();
            }
        });
        let got: Vec<u32> = std::iter::from_fn(|| rx.recv()).collect();
        t.join().unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_queue_holds_the_sender_until_an_item_is_taken() {
        let (tx, rx, _) = bounded(8);
        tx.send(1u8, 8).unwrap();
        let (sent, was_sent) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(2u8, 1).unwrap();
            sent.send(()).unwrap();
        });
        assert!(was_sent.recv_timeout(Duration::from_millis(100)).is_err(), "sent past a full queue");
        assert_eq!(rx.recv(), Some(1));
        was_sent.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(rx.recv(), Some(2));
        t.join().unwrap();
        assert_eq!(rx.recv(), None);
    }

    #[test]
    fn an_item_heavier_than_the_whole_queue_passes_alone() {
        let (tx, rx, _) = bounded(4);
        tx.send(vec![0u8; 100], 100).unwrap();
        assert_eq!(rx.recv().map(|v| v.len()), Some(100));
    }

    #[test]
    fn a_cut_wakes_a_waiting_receiver_and_fails_the_sender() {
        let (tx, rx, cutter) = bounded::<u8>(4);
        let t = std::thread::spawn(move || rx.recv());
        std::thread::sleep(Duration::from_millis(20));
        cutter.cut();
        assert_eq!(t.join().unwrap(), None);
        assert_eq!(tx.send(1, 1), Err(1));
    }

    #[test]
    fn a_gone_receiver_fails_a_sender_waiting_on_a_full_queue() {
        let (tx, rx, _) = bounded::<u8>(1);
        tx.send(1, 1).unwrap();
        let t = std::thread::spawn(move || tx.send(2, 1));
        std::thread::sleep(Duration::from_millis(20));
        drop(rx);
        assert_eq!(t.join().unwrap(), Err(2));
    }
}
