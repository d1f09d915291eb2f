//! Series every process exports whatever its role: `hindsight_build_info{role,version}` and
//! the usual process collector series under their customary names (`process_start_time_seconds`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_cpu_seconds_total`,
//! `process_open_fds`, `process_threads`), read from `/proc/self` by a small background thread.
//!
//! `process_cpu_seconds_total` is exported as a gauge holding fractional seconds: the `metrics`
//! facade's counters are integers, and whole seconds would make `rate()` over a minute useless.
//! PromQL's `rate()` treats it exactly as a counter (it only looks at the values).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{describe_gauge, gauge, Unit};

pub const BUILD_INFO: &str = "hindsight_build_info";
pub const START_TIME: &str = "process_start_time_seconds";
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const OPEN_FDS: &str = "process_open_fds";
pub const THREADS: &str = "process_threads";

/// How often the `/proc` figures are refreshed.
const REFRESH: Duration = Duration::from_secs(2);

/// Records the build info and start time, and starts refreshing the process figures.
pub fn start() {
    describe_gauge!(BUILD_INFO, "Always 1; labels say the role and the version");
    describe_gauge!(
        START_TIME,
        Unit::Seconds,
        "Start time of the process since the Unix epoch"
    );
    describe_gauge!(RESIDENT_MEMORY, Unit::Bytes, "Resident memory size");
    describe_gauge!(VIRTUAL_MEMORY, Unit::Bytes, "Virtual memory size");
    describe_gauge!(
        CPU_SECONDS,
        Unit::Seconds,
        "User and system CPU time spent (a counter; exported as a gauge for fractional seconds)"
    );
    describe_gauge!(OPEN_FDS, "Open file descriptors");
    describe_gauge!(THREADS, "Operating system threads");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    gauge!(START_TIME).set(read().and_then(|s| s.start_time).unwrap_or(now));
    refresh();
    // A named thread that sleeps: no async runtime needed, nothing to shut down.
    let spawned = std::thread::Builder::new()
        .name("process-metrics".into())
        .spawn(|| loop {
            std::thread::sleep(REFRESH);
            refresh();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the process metrics thread");
    }
}

fn refresh() {
    let Some(s) = read() else { return };
    gauge!(RESIDENT_MEMORY).set(s.resident_bytes);
    gauge!(VIRTUAL_MEMORY).set(s.virtual_bytes);
    gauge!(CPU_SECONDS).set(s.cpu_seconds);
    gauge!(THREADS).set(s.threads);
    if let Some(fds) = s.open_fds {
        gauge!(OPEN_FDS).set(fds);
    }
}

/// One reading of `/proc/self`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcStats {
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub cpu_seconds: f64,
    pub threads: f64,
    pub start_time: Option<f64>,
    pub open_fds: Option<f64>,
}

/// Reads `/proc/self` (None where there is no procfs).
pub fn read() -> Option<ProcStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_boot_time(&s));
    let mut stats = parse_stat(&stat, ticks as f64, page as f64, boot_time)?;
    stats.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    Some(stats)
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Parses `/proc/self/stat` (see proc(5)): `pid (comm) state ...`; comm may hold spaces and
/// parentheses, so fields are counted from the last ')'.
fn parse_stat(stat: &str, ticks: f64, page: f64, boot_time: Option<f64>) -> Option<ProcStats> {
    if ticks <= 0.0 || page <= 0.0 {
        return None;
    }
    let (_, rest) = stat.rsplit_once(')')?;
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| -> Option<f64> { f.get(n - 3)?.parse().ok() };
    let utime = num(14)?;
    let stime = num(15)?;
    let threads = num(20)?;
    let start_ticks = num(22)?;
    let vsize = num(23)?;
    let rss_pages = num(24)?;
    Some(ProcStats {
        resident_bytes: rss_pages * page,
        virtual_bytes: vsize,
        cpu_seconds: (utime + stime) / ticks,
        threads,
        start_time: boot_time.map(|b| b + start_ticks / ticks),
        open_fds: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_command_holds_parentheses_and_spaces() {
        // Fields 1-24 of a real line, with a hostile comm.
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 7 0 \
                    1000 123456789 300 18446744073709551615";
        let s = parse_stat(line, 100.0, 4096.0, Some(1_700_000_000.0)).expect("parses");
        assert_eq!(s.cpu_seconds, 3.0, "(250 + 50) ticks at 100 Hz");
        assert_eq!(s.threads, 7.0);
        assert_eq!(s.virtual_bytes, 123456789.0);
        assert_eq!(s.resident_bytes, 300.0 * 4096.0);
        assert_eq!(s.start_time, Some(1_700_000_010.0));
        assert!(parse_stat("garbage", 100.0, 4096.0, None).is_none());
        assert!(parse_stat("1 (x) S 1 2", 100.0, 4096.0, None).is_none());
    }

    #[test]
    fn reads_this_process() {
        let s = read().expect("/proc/self is readable on Linux");
        assert!(s.resident_bytes > 1e6, "{s:?}");
        assert!(s.threads >= 1.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = s.start_time.expect("btime in /proc/stat");
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "start time {started} vs now {now}"
        );
        assert!(s.open_fds.unwrap() >= 3.0);
        assert_eq!(parse_boot_time("cpu 1 2\nbtime 1700000000\n"), Some(1.7e9));
    }
}
