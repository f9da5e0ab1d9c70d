//! The CPU time of the processes a test or a measurement starts.

/// CPU time (user + system) of a process so far, in seconds; 0 for a
/// process that is gone.
pub fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name start with the state
    // (field 3); utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| rest.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// The summed CPU seconds of `pids`.
pub fn cpu_of(pids: &[i32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time_and_zero_for_a_missing_process() {
        let me = std::process::id() as i32;
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds(me) == 0.0 && start.elapsed().as_secs() < 10 {
            for i in 0..1_000_000u64 {
                x = x.wrapping_add(i * i);
            }
            std::hint::black_box(x);
        }
        let spent = cpu_seconds(me);
        assert!(spent > 0.0);
        // A process that is gone adds nothing.
        assert!(cpu_of(&[me, -1]) >= spent);
        assert_eq!(cpu_seconds(-1), 0.0);
    }
}
