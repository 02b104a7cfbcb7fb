//! Turns: the tests that time outages, shutdowns and hand-overs run alone,
//! so that their bounds keep their slack whatever else the test binary
//! runs. Every [`TestEnv`](crate::TestEnv) holds a shared turn for its life;
//! [`run_alone`] waits until no other test holds one and keeps the others
//! out until it is dropped. Tests without a `TestEnv` (PostgreSQL alone, the
//! command line) take no turn: they start no worker of their own to compete.

use std::cell::Cell;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static TURNS: RwLock<()> = RwLock::const_new(());

thread_local! {
    // Each #[tokio::test] runs on a thread of its own (a current-thread
    // runtime), so the thread tells whether this test already runs alone.
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// The whole test binary to the test that holds it.
#[must_use = "the test runs alone only while this is held"]
pub struct Alone {
    _turn: RwLockWriteGuard<'static, ()>,
}

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.set(false);
    }
}

/// Waits until the tests running now are done, then keeps every other test
/// with a `TestEnv` waiting until the returned value is dropped.
pub async fn run_alone() -> Alone {
    let turn = TURNS.write().await;
    ALONE.set(true);
    Alone { _turn: turn }
}

/// A shared turn, or none inside a test that runs alone (it holds them all).
pub(crate) async fn shared_turn() -> Option<RwLockReadGuard<'static, ()>> {
    if ALONE.get() {
        None
    } else {
        Some(TURNS.read().await)
    }
}
