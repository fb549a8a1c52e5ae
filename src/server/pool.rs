//! A fixed pool of worker threads for guest requests. Requests from every connection share it,
//! so a burst from one sandbox cannot make the server spawn without bound.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    tx: Mutex<Sender<Job>>,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            std::thread::Builder::new()
                .name(format!("volumefs-worker-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job();
                })
                .expect("spawn worker thread");
        }
        Pool { tx: Mutex::new(tx) }
    }

    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.tx.lock().unwrap().send(Box::new(job));
    }
}

/// Bounds how many requests one connection may have in flight.
pub struct Window {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Window {
    pub fn new(max: usize) -> Window {
        Window { used: Mutex::new(0), freed: Condvar::new(), max }
    }

    pub fn acquire(&self) {
        let mut used = self.used.lock().unwrap();
        while *used >= self.max {
            used = self.freed.wait(used).unwrap();
        }
        *used += 1;
    }

    pub fn release(&self) {
        *self.used.lock().unwrap() -= 1;
        self.freed.notify_one();
    }
}
