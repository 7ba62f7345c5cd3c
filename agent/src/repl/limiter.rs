//! A token bucket: the bandwidth limit of one volume's replication.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets `rate` bytes per second through, with bursts of up to 100 ms worth (at least 64 KiB).
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    pub fn new(rate: u64) -> Limiter {
        let rate = rate.max(1) as f64;
        let burst = (rate / 10.0).max(65536.0);
        Limiter { rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Waits until `bytes` may go (a request larger than the burst waits for its whole cost).
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
            let left = tokens - bytes as f64;
            *s = (left, now);
            if left >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-left / self.rate))
            }
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_the_rate() {
        let l = Limiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..40 {
            l.acquire(64 << 10).await;
        }
        // 2.5 MiB at 10 MiB/s after a 1 MiB burst: about 150 ms.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(120) && e < Duration::from_millis(600), "{e:?}");
    }
}
