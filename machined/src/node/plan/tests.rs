//! Every state × every request, without I/O.

use super::*;
use machine_api::config::generate::{machine_config, ClusterInput};
use machine_api::config::Role;
use machine_api::pki::bundle::SecretsBundle;
use std::sync::OnceLock;

fn bundle() -> &'static SecretsBundle {
    static B: OnceLock<SecretsBundle> = OnceLock::new();
    B.get_or_init(|| SecretsBundle::generate().expect("secrets"))
}

fn cfg(hostname: &str) -> MachineConfig {
    let input = ClusterInput {
        name: "t".parse().unwrap(),
        endpoint: "https://127.0.0.1:6443".parse().unwrap(),
        kubernetes_version: "1.35.4".parse().unwrap(),
        install_disk: None,
    };
    let mut c = machine_config(bundle(), &input, &[Role::Etcd]);
    c.machine.hostname = Some(hostname.parse().unwrap());
    c
}

fn env() -> Env {
    Env {
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        boot_id: "boot-1".into(),
        fallback_name: "node".into(),
        node_ip: "10.0.0.1".parse().unwrap(),
    }
}

fn maintenance() -> Snapshot {
    Snapshot {
        phase: Phase::Maintenance,
        record: Record::default(),
        config: None,
    }
}

fn configured(name: &str) -> Snapshot {
    let c = cfg(name);
    Snapshot {
        phase: Phase::Configured,
        record: Record {
            generation: 3,
            current: Some(c.to_yaml()),
            ..Default::default()
        },
        config: Some(c),
    }
}

fn trying() -> Snapshot {
    let (a, b) = (cfg("a"), cfg("b"));
    Snapshot {
        phase: Phase::Trying,
        record: Record {
            generation: 5,
            current: Some(b.to_yaml()),
            previous: Some(a.to_yaml()),
            trial: Some(TryState {
                deadline_unix_ms: 2_000_000_000,
                boot_id: "boot-1".into(),
            }),
            ..Default::default()
        },
        config: Some(b),
    }
}

fn in_phase(phase: Phase) -> Snapshot {
    Snapshot {
        phase,
        ..configured("a")
    }
}

fn apply(c: MachineConfig, mode: ApplyMode, via: Via) -> Request {
    Request::Apply {
        config: Box::new(c),
        mode,
        dry_run: false,
        via,
    }
}

const TOKEN_OK: Via = Via::Maintenance { token_ok: true };
const NO_TOKEN: Via = Via::Maintenance { token_ok: false };

fn commits(t: &Transition) -> Vec<&Record> {
    t.steps
        .iter()
        .filter_map(|s| match s {
            Step::Commit(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn reset(wipe: Wipe, force: bool, etcd: EtcdMember) -> Request {
    Request::Reset {
        graceful: false,
        wipe,
        force,
        etcd,
    }
}

/// A transition's steps by name, in order.
fn kinds(t: &Transition) -> Vec<&'static str> {
    t.steps
        .iter()
        .map(|s| match s {
            Step::LeaveEtcd => "leave-etcd",
            Step::Commit(_) => "commit",
            Step::SetConfig(Some(_)) => "set-config",
            Step::SetConfig(None) => "forget-config",
            Step::WriteEtcFiles => "etc",
            Step::ApplyKernelSettings => "kernel",
            Step::Reconcile => "reconcile",
            Step::WatchTry { .. } => "watch-try",
            Step::StopTryWatch => "stop-try-watch",
            Step::StopServices => "stop-services",
            Step::WipeData { .. } => "wipe",
            Step::EtcdBootstrap => "etcd-bootstrap",
            Step::Note(_) => "note",
            Step::AfterReply(Control::Reload) => "reload",
            Step::AfterReply(_) => "after-reply",
        })
        .collect()
}

fn wiped(t: &Transition) -> Vec<(Wipe, bool)> {
    t.steps
        .iter()
        .filter_map(|s| match s {
            Step::WipeData {
                wipe,
                forget_etcd_bootstrap,
            } => Some((*wipe, *forget_etcd_bootstrap)),
            _ => None,
        })
        .collect()
}

fn after(t: &Transition) -> Vec<Control> {
    t.steps
        .iter()
        .filter_map(|s| match s {
            Step::AfterReply(c) => Some(*c),
            _ => None,
        })
        .collect()
}

#[test]
fn first_apply_needs_the_token_and_commits_once() {
    let e = env();
    let refused = plan(
        &maintenance(),
        apply(cfg("a"), ApplyMode::Auto, NO_TOKEN),
        &e,
    );
    assert!(matches!(refused, Err(Refusal::Denied(_))));
    let t = plan(
        &maintenance(),
        apply(cfg("a"), ApplyMode::Auto, TOKEN_OK),
        &e,
    )
    .unwrap();
    assert_eq!(t.phase, Phase::Configured);
    assert_eq!(commits(&t).len(), 1);
    assert_eq!(after(&t), vec![Control::Reload]);
    assert_eq!(t.reply.outcome, "applied");
}

#[test]
fn the_maintenance_listener_takes_nothing_once_configured() {
    // The takeover race: a configured node (or one whose first apply has
    // just been accepted) must refuse any maintenance-listener apply,
    // with the token or without, in every mode.
    let e = env();
    for snap in [configured("a"), trying(), in_phase(Phase::Configured)] {
        for via in [NO_TOKEN, TOKEN_OK] {
            for mode in [ApplyMode::Auto, ApplyMode::NoReboot, ApplyMode::Staged] {
                let r = plan(&snap, apply(cfg("evil"), mode, via), &e);
                assert!(r.is_err(), "{:?} {via:?} {mode:?} accepted", snap.phase);
            }
        }
    }
    // A maintenance phase with a record present (mid-transition) too.
    let mut odd = maintenance();
    odd.record.current = Some(cfg("a").to_yaml());
    assert!(plan(&odd, apply(cfg("evil"), ApplyMode::Auto, TOKEN_OK), &e).is_err());
}

#[test]
fn maintenance_refuses_try_and_dry_run_changes_nothing() {
    let e = env();
    let t = plan(
        &maintenance(),
        apply(cfg("a"), ApplyMode::Try(Duration::from_secs(5)), TOKEN_OK),
        &e,
    );
    assert!(matches!(t, Err(Refusal::Precondition(_))));
    let dry = plan(
        &maintenance(),
        Request::Apply {
            config: Box::new(cfg("a")),
            mode: ApplyMode::Auto,
            dry_run: true,
            via: TOKEN_OK,
        },
        &e,
    )
    .unwrap();
    assert!(dry.steps.is_empty());
    assert_eq!(dry.phase, Phase::Maintenance);
}

#[test]
fn authenticated_apply_modes() {
    let e = env();
    let now = configured("a");
    // Live: one commit keeping the old as previous, then the live steps.
    let t = plan(
        &now,
        apply(cfg("b"), ApplyMode::Auto, Via::Authenticated),
        &e,
    )
    .unwrap();
    let c = commits(&t);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].previous, now.record.current);
    assert_eq!(c[0].generation, 4);
    assert!(t.steps.iter().any(|s| matches!(s, Step::Reconcile)));
    // The host name is in the OS API certificate: the API reloads.
    assert_eq!(after(&t), vec![Control::Reload]);
    // Staged: only the staged slot changes; nothing live.
    let t = plan(
        &now,
        apply(cfg("b"), ApplyMode::Staged, Via::Authenticated),
        &e,
    )
    .unwrap();
    assert_eq!(commits(&t)[0].current, now.record.current);
    assert!(commits(&t)[0].staged.is_some());
    assert_eq!(t.steps.len(), 1);
    // Try: config and trial in the same commit.
    let t = plan(
        &now,
        apply(
            cfg("b"),
            ApplyMode::Try(Duration::from_secs(30)),
            Via::Authenticated,
        ),
        &e,
    )
    .unwrap();
    let c = commits(&t);
    assert_eq!(c.len(), 1);
    assert!(c[0].trial.is_some() && c[0].previous.is_some());
    assert_eq!(t.phase, Phase::Trying);
    assert!(t
        .steps
        .iter()
        .any(|s| matches!(s, Step::WatchTry { generation: 4, .. })));
    // Unchanged.
    let t = plan(
        &now,
        apply(cfg("a"), ApplyMode::Auto, Via::Authenticated),
        &e,
    )
    .unwrap();
    assert_eq!(t.reply.outcome, "unchanged");
    assert!(t.steps.is_empty());
}

#[test]
fn changes_that_need_a_reboot() {
    let e = env();
    let now = configured("a");
    let mut new = cfg("a");
    new.machine
        .network
        .nameservers
        .push("192.0.2.53".parse().unwrap());
    for mode in [ApplyMode::NoReboot, ApplyMode::Try(Duration::from_secs(9))] {
        let r = plan(&now, apply(new.clone(), mode, Via::Authenticated), &e);
        assert!(matches!(r, Err(Refusal::Precondition(_))), "{mode:?}");
    }
    let t = plan(&now, apply(new, ApplyMode::Auto, Via::Authenticated), &e).unwrap();
    assert_eq!(t.phase, Phase::Rebooting);
    assert_eq!(after(&t), vec![Control::Reboot]);
    assert!(t.reply.reboot_required);
}

#[test]
fn a_pending_try_blocks_applies_until_confirmed_or_rolled_back() {
    let e = env();
    let now = trying();
    let r = plan(
        &now,
        apply(cfg("c"), ApplyMode::Auto, Via::Authenticated),
        &e,
    );
    assert!(matches!(r, Err(Refusal::Precondition(_))));
    let t = plan(&now, Request::Confirm, &e).unwrap();
    assert_eq!(t.phase, Phase::Configured);
    assert!(commits(&t)[0].trial.is_none());
    assert_eq!(commits(&t)[0].current, now.record.current);

    let t = plan(
        &now,
        Request::EndTry {
            generation: 5,
            reason: "timeout".into(),
        },
        &e,
    )
    .unwrap();
    assert_eq!(t.phase, Phase::Configured);
    assert_eq!(commits(&t)[0].current, now.record.previous);
    assert!(commits(&t)[0].trial.is_none());
    // A watcher of an older generation changes nothing.
    let stale = plan(
        &now,
        Request::EndTry {
            generation: 4,
            reason: "old".into(),
        },
        &e,
    )
    .unwrap();
    assert!(stale.steps.is_empty());
    assert!(plan(&configured("a"), Request::Confirm, &e).is_err());
}

#[test]
fn power_requests_are_final() {
    let e = env();
    let t = plan(&configured("a"), Request::Reboot, &e).unwrap();
    assert_eq!(t.phase, Phase::Rebooting);
    // Reboot then shutdown: the second is refused, not acknowledged and
    // dropped.
    for phase in [Phase::Rebooting, Phase::ShuttingDown] {
        let now = in_phase(phase);
        for req in [
            Request::Reboot,
            Request::Shutdown,
            Request::Confirm,
            reset(Wipe::All, false, EtcdMember::NoData),
            apply(cfg("b"), ApplyMode::Auto, Via::Authenticated),
        ] {
            assert!(plan(&now, req.clone(), &e).is_err(), "{phase:?} {req:?}");
        }
    }
    // A reset that failed midway: retry it or reboot; nothing else.
    let now = in_phase(Phase::Resetting);
    assert!(plan(&now, Request::Confirm, &e).is_err());
    assert!(plan(
        &now,
        apply(cfg("b"), ApplyMode::Auto, Via::Authenticated),
        &e
    )
    .is_err());
    assert!(plan(&now, Request::Reboot, &e).is_ok());
    assert!(plan(&now, reset(Wipe::All, false, EtcdMember::NoData), &e).is_ok());
}

#[test]
fn reset_marks_first_then_wipes_then_forgets() {
    let e = env();
    let t = plan(
        &configured("a"),
        Request::Reset {
            graceful: true,
            wipe: Wipe::All,
            force: false,
            etcd: EtcdMember::NoData,
        },
        &e,
    )
    .unwrap();
    assert!(matches!(t.steps[0], Step::LeaveEtcd));
    let c = commits(&t);
    assert_eq!(c.len(), 2);
    assert!(c[0].resetting && c[0].current.is_some());
    assert_eq!(
        *c[1],
        Record {
            generation: 5,
            ..Default::default()
        }
    );
    let wipe = t
        .steps
        .iter()
        .position(|s| matches!(s, Step::WipeData { .. }))
        .unwrap();
    let first = t
        .steps
        .iter()
        .position(|s| matches!(s, Step::Commit(_)))
        .unwrap();
    let last = t
        .steps
        .iter()
        .rposition(|s| matches!(s, Step::Commit(_)))
        .unwrap();
    assert!(first < wipe && wipe < last);
    assert_eq!(t.phase, Phase::Maintenance);
}

#[test]
fn each_wipe_mode_has_its_steps() {
    let e = env();
    let now = configured("a");
    let others = EtcdMember::Member { others: 2 };
    let forgetting = [
        "commit",
        "stop-try-watch",
        "stop-services",
        "wipe",
        "commit",
        "forget-config",
        "etc",
        "reconcile",
        "reload",
    ];
    for wipe in [Wipe::All, Wipe::State] {
        let t = plan(&now, reset(wipe, false, others.clone()), &e).unwrap();
        assert_eq!(kinds(&t), forgetting, "{wipe}");
        assert_eq!(wiped(&t), [(wipe, false)]);
        let c = commits(&t);
        assert!(c[0].resetting && c[0].current.is_some());
        assert_eq!(c[0].wipe, wipe);
        assert_eq!(
            *c[1],
            Record {
                generation: 5,
                ..Default::default()
            }
        );
        assert_eq!(t.phase, Phase::Maintenance);
    }

    // Ephemeral: the config stays, the services start afresh with it, the
    // API keeps its identity (no reload).
    let t = plan(&now, reset(Wipe::Ephemeral, false, others.clone()), &e).unwrap();
    assert_eq!(
        kinds(&t),
        [
            "commit",
            "stop-try-watch",
            "stop-services",
            "wipe",
            "commit",
            "note",
            "set-config",
            "etc",
            "kernel",
            "reconcile",
        ]
    );
    // Other members remain: the bootstrap mark goes, so a founding member
    // cannot found a second cluster.
    assert_eq!(wiped(&t), [(Wipe::Ephemeral, true)]);
    let c = commits(&t);
    assert!(c[0].resetting);
    assert_eq!(c[0].wipe, Wipe::Ephemeral);
    assert!(c[0].forget_etcd_bootstrap);
    assert_eq!(c[0].current, now.record.current);
    assert_eq!(
        *c[1],
        Record {
            generation: 5,
            ..now.record.clone()
        }
    );
    assert_eq!(t.phase, Phase::Configured);
    assert!(after(&t).is_empty());

    // --graceful: leave etcd before anything changes, in every mode.
    for wipe in [Wipe::All, Wipe::State, Wipe::Ephemeral] {
        let t = plan(
            &now,
            Request::Reset {
                graceful: true,
                wipe,
                force: false,
                etcd: others.clone(),
            },
            &e,
        )
        .unwrap();
        assert_eq!(kinds(&t)[..2], ["leave-etcd", "commit"], "{wipe}");
    }

    // No config to keep, or a try pending: an ephemeral reset is refused.
    for s in [maintenance(), trying()] {
        let r = plan(&s, reset(Wipe::Ephemeral, true, EtcdMember::NoData), &e);
        assert!(matches!(r, Err(Refusal::Precondition(_))), "{r:?}");
    }
    // Forgetting the config stays allowed during a try.
    assert!(plan(&trying(), reset(Wipe::State, false, EtcdMember::NoData), &e).is_ok());
}

#[test]
fn the_last_copy_of_etcd_data_is_wiped_only_with_force() {
    let e = env();
    let now = configured("a");
    let last = EtcdMember::Member { others: 0 };
    let unknown = EtcdMember::Unknown("error sending request\nconnection refused".into());
    for wipe in [Wipe::All, Wipe::State, Wipe::Ephemeral] {
        let Err(Refusal::Precondition(m)) = plan(&now, reset(wipe, false, last.clone()), &e) else {
            panic!("{wipe}: the last member was wiped without --force");
        };
        assert!(
            m.contains("last member") && m.contains("--force") && m.contains(wipe.as_str()),
            "{m}"
        );
        assert!(!m.contains('\n'), "one line: {m}");
        let Err(Refusal::Precondition(m)) = plan(&now, reset(wipe, false, unknown.clone()), &e)
        else {
            panic!("{wipe}: etcd could not tell, and the node wiped anyway");
        };
        assert!(
            m.contains("connection refused") && m.contains("last copy") && m.contains("--force"),
            "{m}"
        );
        assert!(!m.contains('\n'), "one line: {m}");
        for etcd in [last.clone(), unknown.clone()] {
            assert!(plan(&now, reset(wipe, true, etcd), &e).is_ok(), "{wipe}");
        }
        for etcd in [EtcdMember::NoData, EtcdMember::Member { others: 1 }] {
            assert!(plan(&now, reset(wipe, false, etcd), &e).is_ok(), "{wipe}");
        }
    }
    // A forced ephemeral reset of a lone member keeps the bootstrap mark
    // (etcd founds a new, empty cluster); when etcd could not tell, the
    // mark goes (never a second cluster beside a living one).
    let t = plan(&now, reset(Wipe::Ephemeral, true, last), &e).unwrap();
    assert_eq!(wiped(&t), [(Wipe::Ephemeral, false)]);
    let t = plan(&now, reset(Wipe::Ephemeral, true, unknown), &e).unwrap();
    assert_eq!(wiped(&t), [(Wipe::Ephemeral, true)]);
    let t = plan(&now, reset(Wipe::Ephemeral, false, EtcdMember::NoData), &e).unwrap();
    assert_eq!(wiped(&t), [(Wipe::Ephemeral, false)]);
}

#[test]
fn an_unfinished_reset_finishes_with_its_own_wipe_mode() {
    let e = env();
    let c = cfg("a").to_yaml();
    let marked = |wipe| Record {
        generation: 7,
        current: Some(c.clone()),
        resetting: true,
        wipe,
        forget_etcd_bootstrap: wipe == Wipe::Ephemeral,
        ..Default::default()
    };
    // After a crash: a start finishes it.
    let t = at_start(&marked(Wipe::State), &e);
    assert_eq!(t.phase, Phase::Maintenance);
    assert_eq!(wiped(&t), [(Wipe::State, false)]);
    assert_eq!(commits(&t)[0].current, None);
    let t = at_start(&marked(Wipe::Ephemeral), &e);
    assert_eq!(t.phase, Phase::Configured);
    assert_eq!(wiped(&t), [(Wipe::Ephemeral, true)]);
    assert_eq!(kinds(&t)[..3], ["stop-try-watch", "stop-services", "wipe"]);
    let c1 = commits(&t);
    assert_eq!(c1.len(), 1);
    assert_eq!(
        *c1[0],
        Record {
            generation: 8,
            current: Some(c.clone()),
            ..Default::default()
        }
    );
    // A record from before wipe modes: everything.
    let old: Record = serde_json::from_str(
        r#"{"generation": 3, "current": null, "previous": null, "staged": null, "trial": null, "resetting": true}"#,
    )
    .unwrap();
    assert_eq!(wiped(&at_start(&old, &e)), [(Wipe::All, false)]);

    // After a failed step (no crash): a retry finishes the same reset,
    // without asking etcd again or leaving it.
    let now = Snapshot {
        phase: Phase::Resetting,
        record: marked(Wipe::Ephemeral),
        config: Some(cfg("a")),
    };
    let r = plan(&now, reset(Wipe::All, false, EtcdMember::NoData), &e);
    assert!(
        matches!(&r, Err(Refusal::Precondition(m)) if m.contains("--wipe ephemeral")),
        "{r:?}"
    );
    let t = plan(
        &now,
        Request::Reset {
            graceful: true,
            wipe: Wipe::Ephemeral,
            force: false,
            etcd: EtcdMember::Member { others: 0 },
        },
        &e,
    )
    .unwrap();
    assert_eq!(kinds(&t)[..3], ["stop-try-watch", "stop-services", "wipe"]);
    assert_eq!(wiped(&t), [(Wipe::Ephemeral, true)]);
    assert!(!commits(&t)[0].resetting);
    assert_eq!(t.phase, Phase::Configured);
}

#[test]
fn a_refused_worker_config_goes_back() {
    let e = env();
    let t = plan(
        &trying(),
        Request::Refuse {
            reason: "no".into(),
        },
        &e,
    )
    .unwrap();
    assert_eq!(t.phase, Phase::Configured);
    let t = plan(
        &configured("a"),
        Request::Refuse {
            reason: "no".into(),
        },
        &e,
    )
    .unwrap();
    assert_eq!(t.phase, Phase::Maintenance);
    assert_eq!(commits(&t)[0].current, None);
}

#[test]
fn start_resolves_every_record() {
    let e = env();
    let (a, b) = (cfg("a").to_yaml(), cfg("b").to_yaml());
    // A try of this boot within its deadline is resumed.
    let t = at_start(&trying().record, &e);
    assert_eq!(t.phase, Phase::Trying);
    assert!(commits(&t).is_empty());
    // Of another boot: rolled back in one commit.
    let mut other = trying().record;
    other.trial.as_mut().unwrap().boot_id = "boot-0".into();
    let t = at_start(&other, &e);
    assert_eq!(t.phase, Phase::Configured);
    assert_eq!(commits(&t).len(), 1);
    assert_eq!(commits(&t)[0].current.as_deref(), Some(a.as_str()));
    // Past its deadline: rolled back.
    let mut late = trying().record;
    late.trial.as_mut().unwrap().deadline_unix_ms = 1;
    assert_eq!(
        commits(&at_start(&late, &e))[0].current.as_deref(),
        Some(a.as_str())
    );
    // Staged promoted, keeping the running one as previous.
    let staged = Record {
        generation: 1,
        current: Some(a.clone()),
        staged: Some(b.clone()),
        ..Default::default()
    };
    let t = at_start(&staged, &e);
    let c = commits(&t)[0];
    assert_eq!(c.current.as_deref(), Some(b.as_str()));
    assert_eq!(c.previous.as_deref(), Some(a.as_str()));
    assert!(c.staged.is_none());
    // A current that no longer validates falls back to previous.
    let broken = Record {
        generation: 1,
        current: Some("machine: [".into()),
        previous: Some(a.clone()),
        ..Default::default()
    };
    let t = at_start(&broken, &e);
    assert_eq!(t.phase, Phase::Configured);
    assert_eq!(commits(&t)[0].current.as_deref(), Some(a.as_str()));
    // Nothing to fall back to: maintenance, never a bricked node.
    let hopeless = Record {
        generation: 1,
        current: Some("machine: [".into()),
        ..Default::default()
    };
    assert_eq!(at_start(&hopeless, &e).phase, Phase::Maintenance);
    // An interrupted reset is finished.
    let resetting = Record {
        resetting: true,
        ..staged
    };
    let t = at_start(&resetting, &e);
    assert_eq!(t.phase, Phase::Maintenance);
    assert!(t.steps.iter().any(|s| matches!(
        s,
        Step::WipeData {
            wipe: Wipe::All,
            ..
        }
    )));
    // An empty store: maintenance, nothing written.
    let t = at_start(&Record::default(), &e);
    assert_eq!(t.phase, Phase::Maintenance);
    assert!(commits(&t).is_empty());
}

/// Every record a crash can leave, resolved at start, is a node that runs
/// the old config or the new one, never a trial without its way back.
#[test]
fn every_commit_of_every_transition_is_a_safe_restart_point() {
    let e = env();
    let starts = [maintenance(), configured("a"), trying()];
    let requests = |n: &str| {
        vec![
            apply(cfg(n), ApplyMode::Auto, TOKEN_OK),
            apply(cfg(n), ApplyMode::Auto, Via::Authenticated),
            apply(cfg(n), ApplyMode::Staged, Via::Authenticated),
            apply(
                cfg(n),
                ApplyMode::Try(Duration::from_secs(60)),
                Via::Authenticated,
            ),
            Request::Confirm,
            Request::EndTry {
                generation: 5,
                reason: "t".into(),
            },
            reset(Wipe::All, false, EtcdMember::NoData),
            reset(Wipe::State, true, EtcdMember::Member { others: 0 }),
            reset(Wipe::Ephemeral, false, EtcdMember::Member { others: 2 }),
            reset(Wipe::Ephemeral, true, EtcdMember::Member { others: 0 }),
            Request::Refuse { reason: "r".into() },
        ]
    };
    for s in &starts {
        for req in requests("z") {
            let Ok(t) = plan(s, req.clone(), &e) else {
                continue;
            };
            // A crash before any commit leaves `s.record`; after commit k,
            // the k-th record. Each must start into a consistent node.
            let mut points = vec![&s.record];
            points.extend(commits(&t));
            for r in points {
                let start = at_start(r, &e);
                if let Some(trial) = &r.trial {
                    assert!(r.previous.is_some(), "{req:?}: trial without previous");
                    let _ = trial;
                }
                let cfg_of_start = start.steps.iter().rev().find_map(|s| match s {
                    Step::SetConfig(c) => Some(c.clone()),
                    _ => None,
                });
                let running = cfg_of_start.flatten();
                match start.phase {
                    Phase::Maintenance => assert!(running.is_none()),
                    _ => assert!(running.is_some(), "{req:?} {r:?}"),
                }
            }
        }
    }
}

#[test]
fn added_kernel_settings_apply_live_and_removed_ones_need_a_reboot() {
    let e = env();
    let now = configured("a");
    let mut new = cfg("a");
    new.machine
        .sysctls
        .insert("net.ipv4.ip_forward".into(), "1".into());
    let t = plan(
        &now,
        apply(new.clone(), ApplyMode::NoReboot, Via::Authenticated),
        &e,
    )
    .unwrap();
    assert!(t
        .steps
        .iter()
        .any(|s| matches!(s, Step::ApplyKernelSettings)));
    let with = Snapshot {
        phase: Phase::Configured,
        record: Record {
            generation: 1,
            current: Some(new.to_yaml()),
            ..Default::default()
        },
        config: Some(new),
    };
    let r = plan(
        &with,
        apply(cfg("a"), ApplyMode::NoReboot, Via::Authenticated),
        &e,
    );
    assert!(matches!(r, Err(Refusal::Precondition(m)) if m.contains("sysctl removed")));
}
