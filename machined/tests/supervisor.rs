//! Supervisor behaviour with real processes (`/bin/sh` scripts, `sleep`):
//! start, health, logs, restart, adoption after a machined restart,
//! dependencies, group kill (with and without cgroups), log rotation and
//! reconcile. Linux only; cgroup tests need root and a cgroup2 mount and
//! are skipped (with a note) without them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use machined::supervisor::{
    AlwaysHealthy, HealthCheck, PreStart, ServiceSpec, ServiceState, ServiceStatus, Supervisor,
    SupervisorError, SupervisorOptions, SupervisorPaths,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Healthy once a file exists: lets a script decide when it is ready.
struct FileExistsCheck(PathBuf);

#[async_trait]
impl HealthCheck for FileExistsCheck {
    async fn check(&self) -> Result<(), String> {
        if self.0.exists() {
            Ok(())
        } else {
            Err(format!("{} does not exist", self.0.display()))
        }
    }
}

/// Fails the first `failures` runs, then succeeds.
struct FlakyPreStart {
    failures: u32,
    runs: AtomicU32,
}

#[async_trait]
impl PreStart for FlakyPreStart {
    async fn run(&self, _progress: &machined::supervisor::Progress) -> Result<(), String> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst);
        if run < self.failures {
            Err(format!("member add refused (attempt {})", run + 1))
        } else {
            Ok(())
        }
    }
}

#[test]
fn supervisor_is_shareable_between_tasks() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Supervisor>();
    assert_send_sync::<ServiceSpec>();
    assert_send_sync::<ServiceStatus>();
}

fn paths(dir: &Path, cgroup_base: Option<PathBuf>) -> SupervisorPaths {
    SupervisorPaths {
        state_dir: dir.join("state"),
        log_dir: dir.join("log"),
        cgroup_base,
    }
}

/// A service running `script` with `/bin/sh -c`.
fn sh(name: &str, script: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.to_owned()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: None,
        depends_on: vec![],
        health: Arc::new(AlwaysHealthy),
        stop_timeout: Duration::from_secs(2),
        pre_start: None,
        cpu_weight: None,
        nofile: None,
    }
}

/// Polls `probe` every 50 ms until it yields a value, failing the test
/// after `secs` seconds.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the service's status satisfies `ok`.
async fn status_where(
    sup: &Supervisor,
    name: &str,
    secs: u64,
    ok: impl Fn(&ServiceStatus) -> bool,
) -> ServiceStatus {
    eventually(&format!("status of {name}"), secs, || async {
        sup.status(name).await.filter(|s| ok(s))
    })
    .await
}

async fn healthy(sup: &Supervisor, name: &str) -> ServiceStatus {
    status_where(sup, name, 5, |s| s.state == ServiceState::Healthy).await
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        !matches!(state, Some("Z" | "X") | None)
    })
}

/// A cgroup v2 directory for one test under the cgroup2 mount, removed on
/// drop; `None` when there is no writable cgroup2 mount.
struct TestCgroup {
    base: PathBuf,
}

impl TestCgroup {
    fn create(tag: &str) -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        // Fields: ... mount-point(5th) ... " - " fstype source options.
        let mount = mountinfo.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .subsec_nanos();
        let base = mount.join(format!(
            "machined-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir(&base).ok()?;
        Some(Self { base })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.base) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.base);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_becomes_healthy_and_logs_are_tailed_and_followed() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let sup = Supervisor::new(paths(dir.path(), None)).unwrap();
    let script = format!(
        "echo hello; echo world >&2; while [ ! -e {} ]; do sleep 0.05; done; echo later; exec sleep 60",
        go.display()
    );
    sup.reconcile(vec![sh("echo", &script)]).await;

    let st = healthy(&sup, "echo").await;
    assert!(st.pid.is_some());
    assert!(!st.adopted);
    assert_eq!(st.restarts, 0);
    let lines = eventually("logged lines", 5, || async {
        let lines = sup.logs_tail("echo", 0).await.unwrap();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert_eq!(lines, ["hello", "world"]);
    assert_eq!(sup.logs_tail("echo", 1).await.unwrap(), ["world"]);

    let mut follow = sup.logs_follow("echo").await.unwrap();
    fs::write(&go, b"").unwrap();
    let line = tokio::time::timeout(Duration::from_secs(5), follow.recv())
        .await
        .expect("followed line in time")
        .unwrap();
    assert_eq!(line, "later");
    assert!(fs::read_to_string(dir.path().join("log/echo.log"))
        .unwrap()
        .contains("hello\nworld\nlater\n"));

    let listed = sup.list().await;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].memory_bytes.is_some_and(|m| m > 0));
    assert!(listed[0].cpu_usec.is_some());

    assert!(matches!(
        sup.logs_tail("nope", 0).await,
        Err(SupervisorError::UnknownService(_))
    ));
    sup.stop_all().await;
    assert_eq!(
        sup.status("echo").await.unwrap().state,
        ServiceState::Stopped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_service_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(paths(dir.path(), None)).unwrap();
    sup.reconcile(vec![sh("victim", "exec sleep 60")]).await;
    let before = healthy(&sup, "victim").await;
    let old_pid = before.pid.unwrap();

    let mut events = sup.subscribe();
    kill(Pid::from_raw(old_pid), Signal::SIGKILL).unwrap();
    let after = status_where(&sup, "victim", 6, |s| {
        s.pid.is_some_and(|p| p != old_pid) && s.state == ServiceState::Healthy
    })
    .await;
    assert_eq!(after.restarts, 1);
    let mut saw_failure = false;
    while let Ok(ev) = events.try_recv() {
        if ev.name == "victim" && ev.state == ServiceState::Failed {
            assert_eq!(ev.message, "killed by signal 9 (SIGKILL)");
            saw_failure = true;
        }
    }
    assert!(saw_failure, "no Failed event");

    // The restart count is persisted for the next machined.
    let state = fs::read_to_string(dir.path().join("state/victim.json")).unwrap();
    assert!(state.contains("\"restarts\": 1"), "{state}");
    sup.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_supervisor_adopts_running_services_without_restarting_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sh("sleeper", "echo up; exec sleep 60");
    let first = Supervisor::new(paths(dir.path(), None)).unwrap();
    first.reconcile(vec![spec.clone()]).await;
    let pid = healthy(&first, "sleeper").await.pid.unwrap();
    // machined "dies": supervision ends, the process does not.
    first.detach();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid));

    let second = Supervisor::new(paths(dir.path(), None)).unwrap();
    assert_eq!(second.adopt_existing().await, ["sleeper"]);
    let st = second.status("sleeper").await.unwrap();
    assert_eq!(st.pid, Some(pid));
    assert!(st.adopted);
    assert_eq!(st.state, ServiceState::Running);
    // The log ring is refilled from the file.
    eventually("old log lines", 5, || async {
        second
            .logs_tail("sleeper", 0)
            .await
            .unwrap()
            .contains(&"up".to_owned())
            .then_some(())
    })
    .await;

    // Same spec: kept, and now health-checked.
    second.reconcile(vec![spec]).await;
    let st = healthy(&second, "sleeper").await;
    assert_eq!(st.pid, Some(pid));
    assert!(st.adopted);

    // Its exit is noticed although it is not our child, and it is restarted.
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let st = status_where(&second, "sleeper", 6, |s| {
        s.pid.is_some_and(|p| p != pid) && s.state == ServiceState::Healthy
    })
    .await;
    assert!(!st.adopted);
    assert_eq!(st.restarts, 1);
    second.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_state_files_are_removed_and_dead_processes_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(dir.path(), None);
    let first = Supervisor::new(p.clone()).unwrap();
    first.reconcile(vec![sh("gone", "exec sleep 60")]).await;
    let pid = healthy(&first, "gone").await.pid.unwrap();
    first.detach();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    eventually("process death", 5, || async { (!alive(pid)).then_some(()) }).await;
    fs::write(p.state_dir.join("junk.json"), b"{not json").unwrap();

    let second = Supervisor::new(p.clone()).unwrap();
    assert!(second.adopt_existing().await.is_empty());
    assert!(!p.state_dir.join("gone.json").exists());
    assert!(!p.state_dir.join("junk.json").exists());
    assert!(second.list().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_wait_for_healthy_dependencies_and_stop_first() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("a-ready");
    let order = dir.path().join("order");
    let sup = Supervisor::new(paths(dir.path(), None)).unwrap();

    let mut a = sh(
        "a",
        &format!(
            "trap 'echo a >> {o}; exit 0' TERM; sleep 1; touch {r}; sleep 60 & wait",
            o = order.display(),
            r = ready.display()
        ),
    );
    a.health = Arc::new(FileExistsCheck(ready.clone()));
    let mut b = sh(
        "b",
        &format!(
            "trap 'echo b >> {o}; exit 0' TERM; sleep 60 & wait",
            o = order.display()
        ),
    );
    b.depends_on = vec!["a".into()];

    let mut events = sup.subscribe();
    sup.reconcile(vec![b, a]).await;
    let waiting = status_where(&sup, "b", 2, |s| s.state == ServiceState::Waiting).await;
    assert_eq!(waiting.message, "waiting for a");
    assert_eq!(waiting.pid, None);
    healthy(&sup, "b").await;

    // b was only started after a had become healthy.
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push((ev.name, ev.state));
    }
    let pos = |name: &str, state| seen.iter().position(|(n, s)| n == name && *s == state);
    let a_healthy = pos("a", ServiceState::Healthy).expect("a healthy event");
    let b_starting = pos("b", ServiceState::Starting).expect("b starting event");
    assert!(a_healthy < b_starting, "{seen:?}");

    let names: Vec<String> = sup.list().await.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "b"]);

    // a turns unhealthy (three failed checks in a row, a second apart):
    // it is reported, its dependent is left running.
    fs::remove_file(&ready).unwrap();
    let a = status_where(&sup, "a", 10, |s| s.state == ServiceState::Running).await;
    assert!(a.message.contains("does not exist"), "{}", a.message);
    assert_eq!(sup.status("b").await.unwrap().state, ServiceState::Healthy);

    sup.stop_all().await;
    assert_eq!(fs::read_to_string(&order).unwrap(), "b\na\n");
    for s in sup.list().await {
        assert_eq!(s.state, ServiceState::Stopped, "{s:?}");
        assert_eq!(s.pid, None);
    }
}

/// A service that ignores SIGTERM and leaves a grandchild that does too:
/// only the kill after the stop timeout gets rid of them.
async fn stop_kills_whole_group(cgroup: Option<&TestCgroup>) {
    let dir = tempfile::tempdir().unwrap();
    let grandchild_file = dir.path().join("grandchild");
    let sup = Supervisor::new(paths(dir.path(), cgroup.map(|c| c.base.clone()))).unwrap();
    let mut spec = sh(
        "stubborn",
        &format!(
            "trap '' TERM; sleep 60 & echo $! > {}; wait",
            grandchild_file.display()
        ),
    );
    spec.stop_timeout = Duration::from_millis(500);
    sup.reconcile(vec![spec]).await;
    let pid = healthy(&sup, "stubborn").await.pid.unwrap();
    let grandchild: i32 = eventually("grandchild pid", 5, || async {
        fs::read_to_string(&grandchild_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await;
    assert!(alive(grandchild));
    if let Some(cg) = cgroup {
        let procs = fs::read_to_string(cg.base.join("stubborn/cgroup.procs")).unwrap();
        let procs: Vec<i32> = procs.lines().map(|l| l.parse().unwrap()).collect();
        assert!(
            procs.contains(&pid) && procs.contains(&grandchild),
            "{procs:?}"
        );
        let st = sup.status("stubborn").await.unwrap();
        assert!(st.cpu_usec.is_some());
        assert!(st.memory_bytes.is_some_and(|m| m > 0));
    }

    let started = std::time::Instant::now();
    sup.stop("stubborn").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(!alive(pid), "service survived stop");
    assert!(!alive(grandchild), "grandchild survived stop");
    if let Some(cg) = cgroup {
        assert!(!cg.base.join("stubborn").exists(), "cgroup not removed");
    }
    let st = sup.status("stubborn").await.unwrap();
    assert_eq!(st.state, ServiceState::Stopped);
    assert_eq!(st.message, "stopped by operator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_whole_group_in_cgroup() {
    match TestCgroup::create("group") {
        Some(cg) => stop_kills_whole_group(Some(&cg)).await,
        None => {
            eprintln!("no writable cgroup2 mount: testing process-group kill only");
            stop_kills_whole_group(None).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_whole_process_group_without_cgroup() {
    stop_kills_whole_group(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_is_rotated_and_ring_keeps_newest_lines() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let options = SupervisorOptions {
        log_rotate_bytes: 4096,
        log_ring_lines: 100,
    };
    let sup = Supervisor::with_options(paths(dir.path(), None), options).unwrap();
    let script = format!(
        "i=0; while [ $i -lt 1000 ]; do echo line $i; i=$((i+1)); done; \
         while [ ! -e {} ]; do sleep 0.05; done; echo after; exec sleep 60",
        go.display()
    );
    sup.reconcile(vec![sh("chatty", &script)]).await;
    let log = dir.path().join("log/chatty.log");
    let rotated = dir.path().join("log/chatty.log.1");

    eventually("rotation", 5, || async {
        let tail = sup.logs_tail("chatty", 0).await.unwrap();
        (rotated.exists() && tail.last().is_some_and(|l| l == "line 999")).then_some(())
    })
    .await;
    let tail = sup.logs_tail("chatty", 0).await.unwrap();
    assert_eq!(tail.len(), 100);
    assert_eq!(tail[0], "line 900");
    assert!(fs::metadata(&log).unwrap().len() <= 4096);

    // The child keeps writing to the truncated file.
    fs::write(&go, b"").unwrap();
    eventually("line after rotation", 5, || async {
        let tail = sup.logs_tail("chatty", 1).await.unwrap();
        (tail == ["after"]).then_some(())
    })
    .await;
    assert!(fs::read_to_string(&log).unwrap().ends_with("after\n"));
    sup.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_restarts_changed_keeps_identical_and_removes_missing() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(paths(dir.path(), None)).unwrap();
    let a1 = sh("a", "exec sleep 60");
    let b = sh("b", "exec sleep 61");
    sup.reconcile(vec![a1.clone(), b.clone()]).await;
    let a_pid = healthy(&sup, "a").await.pid.unwrap();
    let b_pid = healthy(&sup, "b").await.pid.unwrap();

    // Identical: untouched (a new health check is fine, same hash).
    let mut a1_again = a1.clone();
    a1_again.stop_timeout = Duration::from_secs(1);
    sup.reconcile(vec![a1_again, b.clone()]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sup.status("a").await.unwrap().pid, Some(a_pid));
    assert_eq!(sup.status("b").await.unwrap().pid, Some(b_pid));

    // Changed argv: restarted.
    let mut a2 = a1.clone();
    a2.env.push(("VERSION".into(), "2".into()));
    sup.reconcile(vec![a2.clone(), b]).await;
    let st = status_where(&sup, "a", 5, |s| {
        s.state == ServiceState::Healthy && s.pid.is_some_and(|p| p != a_pid)
    })
    .await;
    assert_eq!(st.restarts, 0, "a spec change is not a crash");
    assert!(!alive(a_pid));
    assert_eq!(sup.status("b").await.unwrap().pid, Some(b_pid));

    // Missing: stopped and forgotten.
    sup.reconcile(vec![a2]).await;
    assert!(sup.status("b").await.is_none());
    assert!(!alive(b_pid));
    assert!(!dir.path().join("state/b.json").exists());
    let names: Vec<String> = sup.list().await.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a"]);
    sup.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_stop_is_sticky_and_pre_start_failures_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(dir.path(), None);
    let sup = Supervisor::new(p.clone()).unwrap();
    let mut spec = sh("etcd", "exec sleep 60");
    spec.pre_start = Some(Arc::new(FlakyPreStart {
        failures: 1,
        runs: AtomicU32::new(0),
    }));
    sup.reconcile(vec![spec.clone()]).await;
    let failed = status_where(&sup, "etcd", 3, |s| s.state == ServiceState::Failed).await;
    assert_eq!(failed.message, "member add refused (attempt 1)");
    let st = healthy(&sup, "etcd").await;
    assert_eq!(st.restarts, 1);

    sup.stop("etcd").await.unwrap();
    let pid = st.pid.unwrap();
    assert!(!alive(pid));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = sup.status("etcd").await.unwrap();
    assert_eq!(st.state, ServiceState::Stopped);
    // Reconcile does not undo an operator stop…
    sup.reconcile(vec![spec.clone()]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sup.status("etcd").await.unwrap().state,
        ServiceState::Stopped
    );
    // …nor does a machined restart.
    sup.detach();
    let sup = Supervisor::new(p).unwrap();
    assert!(sup.adopt_existing().await.is_empty());
    sup.reconcile(vec![spec]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = sup.status("etcd").await.unwrap();
    assert_eq!(st.state, ServiceState::Stopped);
    assert_eq!(st.restarts, 1);

    sup.start("etcd").await.unwrap();
    let st = healthy(&sup, "etcd").await;
    sup.restart("etcd").await.unwrap();
    status_where(&sup, "etcd", 5, |s| {
        s.state == ServiceState::Healthy && s.pid.is_some_and(|p| Some(p) != st.pid)
    })
    .await;
    assert!(matches!(
        sup.stop("nope").await,
        Err(SupervisorError::UnknownService(_))
    ));
    sup.stop_all().await;
}
