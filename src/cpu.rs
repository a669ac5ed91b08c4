//! How many cores this process may use, and how its worker threads wait:
//! under a container's CPU quota (Kubernetes limits) or beside other busy
//! processes, threads that spin while they wait burn the cores the work
//! needs, so the thread count follows the quota and candle's worker pool
//! spins only briefly before it parks.

use std::path::Path;

/// Spins a candle pool worker makes before parking: candle's default,
/// 25,000, holds a core for about a millisecond between parallel ops,
/// which a busy neighbour or a CPU quota pays for in every step.
pub const POOL_SPIN_LIMIT: u32 = 200;

/// The cores a cgroup's CPU quota allows, rounded up (None: no quota).
/// Reads cgroup v2's `cpu.max` ("max 100000" or "150000 100000"), else v1's
/// `cpu.cfs_quota_us` / `cpu.cfs_period_us`.
pub fn quota_cores(cgroup_root: &Path) -> Option<usize> {
    let cores = |quota: f64, period: f64| (quota > 0.0 && period > 0.0).then(|| (quota / period).ceil().max(1.0) as usize);
    if let Ok(text) = std::fs::read_to_string(cgroup_root.join("cpu.max")) {
        let mut parts = text.split_whitespace();
        let (quota, period) = (parts.next()?, parts.next()?);
        return cores(quota.parse().ok()?, period.parse().ok()?);
    }
    let quota: f64 = std::fs::read_to_string(cgroup_root.join("cpu/cpu.cfs_quota_us")).ok()?.trim().parse().ok()?;
    let period: f64 = std::fs::read_to_string(cgroup_root.join("cpu/cpu.cfs_period_us")).ok()?.trim().parse().ok()?;
    cores(quota, period)
}

/// The threads tensor work uses: `setting` when set, else the cores this
/// process may use (the machine's, or fewer under a CPU quota).
pub fn threads(setting: usize) -> usize {
    if setting > 0 {
        return setting;
    }
    let cores = num_cpus::get();
    quota_cores(Path::new("/sys/fs/cgroup")).map_or(cores, |q| q.min(cores))
}

/// Sets, before any pool starts, the thread count (`RAYON_NUM_THREADS`,
/// which candle reads too) and the pool's spin limit, unless the
/// environment already says.
pub fn configure(threads_setting: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads(threads_setting).to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", POOL_SPIN_LIMIT.to_string());
    }
}

/// Gives the heap's free memory back to the operating system: glibc keeps
/// what a learning run freed (gigabytes of autograd intermediates) mapped
/// in its arenas otherwise, and a server that learns every few minutes
/// would keep its high-water mark forever.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_quota_bounds_the_cores() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(quota_cores(dir.path()), None);
        std::fs::write(dir.path().join("cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(quota_cores(dir.path()), Some(2));
        std::fs::write(dir.path().join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(quota_cores(dir.path()), None);
        std::fs::write(dir.path().join("cpu.max"), "50000 100000\n").unwrap();
        assert_eq!(quota_cores(dir.path()), Some(1));
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v1.path().join("cpu")).unwrap();
        std::fs::write(v1.path().join("cpu/cpu.cfs_quota_us"), "300000").unwrap();
        std::fs::write(v1.path().join("cpu/cpu.cfs_period_us"), "100000").unwrap();
        assert_eq!(quota_cores(v1.path()), Some(3));
    }
}
