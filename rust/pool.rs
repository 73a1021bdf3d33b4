//! Worker threads that survive a fork. A forked child (a PyTorch DataLoader worker, a
//! `multiprocessing` fork) inherits the pool's bookkeeping but none of its threads: a job
//! handed to it would wait forever. Each pool remembers the process that built it and is
//! rebuilt, on first use, in any other process.

use crate::error::{Error, Result};
use rayon::ThreadPool;
use std::sync::{Arc, Mutex};

pub struct ForkSafePool {
    pool: Arc<ThreadPool>,
    pid: u32,
    threads: usize,
}

fn build(threads: usize) -> Result<ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("mmrecipe-{i}"))
        .build()
        .map_err(|e| Error::internal(format!("cannot start {threads} worker threads: {e}")))
}

impl ForkSafePool {
    /// `threads` workers; 0 for one per core.
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
        Ok(ForkSafePool { pool: Arc::new(build(threads)?), pid: std::process::id(), threads })
    }

    /// The pool, rebuilt first if this is not the process that built it.
    pub fn get(&mut self) -> Result<Arc<ThreadPool>> {
        if self.pid != std::process::id() {
            let fresh = Arc::new(build(self.threads)?);
            // Dropping the parent's pool would signal threads that do not exist here,
            // through locks a parent thread may have held at the fork: leak it instead.
            std::mem::forget(std::mem::replace(&mut self.pool, fresh));
            self.pid = std::process::id();
        }
        Ok(self.pool.clone())
    }
}

/// One pool per process for the calls that are not a build (the LLM stages' columns),
/// instead of rayon's global pool, which cannot be rebuilt after a fork.
pub fn shared() -> Result<Arc<ThreadPool>> {
    static SHARED: Mutex<Option<ForkSafePool>> = Mutex::new(None);
    // Held only to look the pool up: never while a job runs.
    let mut slot = SHARED.lock().map_err(|_| Error::internal("the shared thread pool's lock is poisoned"))?;
    if slot.is_none() {
        *slot = Some(ForkSafePool::new(0)?);
    }
    slot.as_mut().unwrap().get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_from_another_process_is_rebuilt() {
        let mut pool = ForkSafePool::new(2).unwrap();
        let first = pool.get().unwrap();
        assert!(Arc::ptr_eq(&first, &pool.get().unwrap()), "same process: same pool");
        pool.pid = pool.pid.wrapping_add(1); // as a forked child sees it
        let rebuilt = pool.get().unwrap();
        assert!(!Arc::ptr_eq(&first, &rebuilt));
        assert_eq!(rebuilt.current_num_threads(), 2);
        assert_eq!(rebuilt.install(|| 1 + 1), 2);
        assert_eq!(pool.pid, std::process::id());
    }
}
