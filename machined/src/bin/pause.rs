//! pause: the pod sandbox's process (the image `localhost/node-os/pause:1`
//! that imager bakes). It holds the pod's namespaces open and does nothing
//! else: it is PID 1 of the pod's PID namespace when the pod shares one,
//! so it reaps every orphan that is reparented to it (SIGCHLD), and it
//! exits 0 on SIGINT or SIGTERM, the way the runtime stops a sandbox.
//!
//! The signals are blocked and taken with sigwait(2), not with handlers:
//! no code runs in signal context, and a blocked signal is delivered to a
//! namespace's PID 1 even though its default action would be ignored
//! there.
//!
//! Linking: dynamic, like machined and init. A static binary would need
//! `-C target-feature=+crt-static`, which cargo applies to every binary of
//! the target (machined included) or needs a per-invocation `cargo rustc`;
//! so imager puts this binary into the image's layer together with its
//! ELF closure (loader, libc, libgcc_s) from the image's unpacked
//! packages, as `assemble::elf::close` does for the root image.

use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Reaps every child that has exited, without waiting for the others.
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

fn main() -> ExitCode {
    if let Some(arg) = std::env::args().nth(1) {
        if arg == "-v" || arg == "--version" {
            println!("pause {} (node-os machined)", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        eprintln!("pause: takes no arguments (-v prints the version)");
        return ExitCode::from(2);
    }
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("pause: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    // Children that exited before the mask was set.
    reap();
    loop {
        match set.wait() {
            Ok(Signal::SIGINT | Signal::SIGTERM) => return ExitCode::SUCCESS,
            Ok(Signal::SIGCHLD) => reap(),
            Ok(_) => {}
            Err(e) => {
                eprintln!("pause: sigwait: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}
