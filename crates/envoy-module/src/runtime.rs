//! The engine's own tokio runtime: one per Envoy process, shared by every worker and every filter
//! config (a config reload starts a new engine on the same runtime). Envoy's workers are not
//! tokio threads, so all I/O (Redis, key fetches, the key file watcher) runs here.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use tokio::runtime::{Builder, Runtime};

/// I/O threads: the engine's work there is waiting on sockets, not computing.
const WORKER_THREADS: usize = 2;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

pub fn get() -> Result<&'static Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            Builder::new_multi_thread()
                .worker_threads(WORKER_THREADS)
                .thread_name("gybc-authz")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the engine's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A future that [`poll_once`] found not ready, in its box.
type Waiting<F> = Pin<Box<Option<F>>>;

/// Polls `fut` once on this thread, with no waker: its output if it is ready, otherwise the
/// future, boxed, to be finished elsewhere (the runtime). Most decisions are ready at once; for
/// those the future is polled in a box this thread keeps from one call to the next, instead of a
/// box of its own per call (an allocation and a free per request on Envoy's worker).
pub fn poll_once<F: Future + 'static>(
    fut: F,
) -> Result<F::Output, impl Future<Output = F::Output>> {
    thread_local! {
        /// The kept box, as a `Waiting<F>` of the only `F` this is called with.
        static KEPT: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }
    let polled = KEPT.with_borrow_mut(|kept| {
        let slot = match kept.as_mut().and_then(|k| k.downcast_mut::<Waiting<F>>()) {
            Some(slot) => slot,
            None => kept
                .insert(Box::new(Box::pin(None::<F>)))
                .downcast_mut::<Waiting<F>>()
                .expect("just made"),
        };
        slot.set(Some(fut));
        let polled = slot
            .as_mut()
            .as_pin_mut()
            .expect("just set")
            .poll(&mut Context::from_waker(Waker::noop()));
        match polled {
            Poll::Ready(out) => {
                slot.set(None);
                Ok(out)
            }
            // It goes with its box; the next call makes a new one.
            Poll::Pending => Err(std::mem::replace(slot, Box::pin(None))),
        }
    });
    polled.map_err(|mut waiting: Waiting<F>| async move {
        waiting
            .as_mut()
            .as_pin_mut()
            .expect("holds the future")
            .await
    })
}

#[cfg(test)]
mod tests {
    use super::poll_once;

    #[test]
    fn a_ready_future_is_answered_and_a_waiting_one_handed_back_to_finish() {
        for n in 0..3 {
            assert!(matches!(poll_once(async move { n }), Ok(m) if m == n));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let Err(waiting) = poll_once(async move { rx.await.expect("sent") + 1 }) else {
            panic!("nothing was sent yet");
        };
        // The kept box went with it; a ready future after it still is answered.
        assert!(matches!(poll_once(async { 9 }), Ok(9)));
        tx.send(4).expect("received");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(waiting), 5);
    }
}
