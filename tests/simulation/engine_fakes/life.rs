//! An instance's life as the simulation drives it: running, frozen (as
//! SIGSTOP: nothing it does reaches the broker or the database, and its
//! heartbeats stop) or dead (as `kill -9`: it never acts again). Every call
//! of an instance's fakes passes its gate first.

use std::sync::Mutex;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Frozen,
    Dead,
}

pub struct Life {
    state: watch::Sender<State>,
    /// Since when it has not been running; its group evicts it once this is
    /// older than the session timeout.
    down_since: Mutex<Option<Instant>>,
    /// How many times it stopped running.
    stops: std::sync::atomic::AtomicU64,
}

impl Life {
    pub fn new() -> Self {
        Self {
            state: watch::Sender::new(State::Running),
            down_since: Mutex::new(None),
            stops: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn set(&self, state: State) {
        let mut down = self.down_since.lock().unwrap();
        match state {
            State::Running => *down = None,
            _ => {
                if down.is_none() {
                    *down = Some(Instant::now());
                    self.stops
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        self.state.send_replace(state);
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// How many times it stopped running (frozen or dead) so far.
    pub fn stops(&self) -> u64 {
        self.stops.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn down_since(&self) -> Option<Instant> {
        *self.down_since.lock().unwrap()
    }

    /// Returns while the instance runs; waits while it is frozen; never
    /// returns once it is dead.
    pub async fn gate(&self) {
        let mut state = self.state.subscribe();
        loop {
            let now = *state.borrow_and_update();
            match now {
                State::Running => return,
                State::Frozen => {
                    if state.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                State::Dead => std::future::pending::<()>().await,
            }
        }
    }
}
