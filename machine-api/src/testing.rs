//! Test support shared by every crate's tests: what a test does when
//! something it needs (a tool, the package mirror, OVMF) is missing.
//!
//! Outside CI such a test says `SKIPPED: why` on stderr and passes, so a
//! developer without QEMU can still run the rest. Under CI (`CI` set in
//! the environment; `scripts/test.sh` sets it) it panics instead: CI
//! installs everything, so a skip there means the setup broke, and a test
//! that did not run must not count as passed.
//!
//! ```no_run
//! # fn main() {}
//! #[test]
//! fn boots_under_qemu() {
//!     machine_api::require_tools!("qemu-system-x86_64", "mtools");
//!     if !std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() {
//!         machine_api::skip_test!("OVMF is not installed (apt-get install ovmf)");
//!     }
//!     // ...
//! }
//! ```

/// True under CI: `CI` is set in the environment.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Reports that the calling test cannot run, for `reason`: panics under
/// CI, else prints `SKIPPED: reason` (the caller then returns).
#[track_caller]
pub fn skip(reason: impl std::fmt::Display) {
    if in_ci() {
        panic!("{reason}: CI is set, and a test may not skip under CI");
    }
    eprintln!("SKIPPED: {reason}");
}

/// True when `tool` is a file in a directory of `PATH`.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Ends the calling test (a function returning `()`) as skipped, with a
/// `format!`-style reason; panics under CI. See [`testing`](crate::testing).
#[macro_export]
macro_rules! skip_test {
    ($($reason:tt)+) => {{
        $crate::testing::skip(::std::format_args!($($reason)+));
        return;
    }};
}

/// Skips the calling test (see [`skip_test!`]) unless every tool is on
/// `PATH`.
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        for tool in [$($tool),+] {
            if !$crate::testing::have(tool) {
                $crate::skip_test!("{tool} is not installed (scripts/test.sh installs it)");
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tools_on_path() {
        assert!(have("sh"));
        assert!(!have("no-such-tool-anywhere"));
    }

    fn needs_a_missing_tool(ran: &mut bool) {
        crate::require_tools!("sh", "no-such-tool-anywhere");
        *ran = true;
    }

    /// Outside CI a skip returns early; under CI it panics. (Both checked
    /// in one test: the environment is process-wide.)
    #[test]
    fn skips_return_outside_ci_and_panic_under_ci() {
        let ci = in_ci();
        let mut ran = false;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            needs_a_missing_tool(&mut ran)
        }));
        assert!(!ran);
        assert_eq!(outcome.is_err(), ci);
    }
}
