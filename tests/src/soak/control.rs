//! What the soak's load threads share: the phase they obey (run, pause for a quiet
//! measurement, stop), how many units of work are in flight, and their tallies.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// Failures kept word for word; beyond these only the count grows.
const KEPT_FAILURES: usize = 20;

pub struct Control {
    phase: AtomicU8,
    busy: AtomicUsize,
    start: Instant,
    tally: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<Vec<String>>,
}

/// One unit of work in flight (a connection, a round of datagrams); see
/// [`Control::gate`].
pub struct Busy<'a>(&'a Control);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Control {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(RUN),
            busy: AtomicUsize::new(0),
            start: Instant::now(),
            tally: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(Vec::new()),
        }
    }
}

impl Control {
    /// Waits while paused; `None` once stopping, else a guard held for one unit of
    /// work.
    pub fn gate(&self) -> Option<Busy<'_>> {
        loop {
            match self.phase.load(Ordering::SeqCst) {
                STOP => return None,
                PAUSE => thread::sleep(Duration::from_millis(20)),
                _ => {
                    self.busy.fetch_add(1, Ordering::SeqCst);
                    // A pause that began meanwhile must see this unit or not start it.
                    if self.phase.load(Ordering::SeqCst) == RUN {
                        return Some(Busy(self));
                    }
                    self.busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    pub fn stopping(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == STOP
    }

    /// Sleeps up to `d`, less if the run stops meanwhile.
    pub fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let now = Instant::now();
            if now >= end {
                return;
            }
            thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// Pauses the load and waits until no unit of work is in flight.
    pub fn pause(&self) {
        self.phase.store(PAUSE, Ordering::SeqCst);
        self.drain();
    }

    pub fn resume(&self) {
        self.phase.store(RUN, Ordering::SeqCst);
    }

    pub fn stop(&self) {
        self.phase.store(STOP, Ordering::SeqCst);
        self.drain();
    }

    fn drain(&self) {
        while self.busy.load(Ordering::SeqCst) > 0 {
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn add(&self, what: &str, n: u64) {
        if let Ok(mut t) = self.tally.lock() {
            *t.entry(what.to_owned()).or_default() += n;
        }
    }

    pub fn get(&self, what: &str) -> u64 {
        self.tally
            .lock()
            .map(|t| t.get(what).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn tally(&self) -> BTreeMap<String, u64> {
        self.tally.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Records a failed check of the load itself (a good connection's bytes, a
    /// hostile connection that was answered), with the time into the run.
    pub fn fail(&self, what: String) {
        self.add("failures", 1);
        if let Ok(mut f) = self.failures.lock() {
            if f.len() < KEPT_FAILURES {
                f.push(format!(
                    "{:.1}s: {what}",
                    self.start.elapsed().as_secs_f64()
                ));
            }
        }
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}
