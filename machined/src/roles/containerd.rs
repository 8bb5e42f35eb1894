//! The containerd role: a config matching the containerd version found
//! (schema 2 for 1.x, schema 3 for 2.x), the CRI plugin prepared for
//! kubelet, and health from containerd's gRPC health service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use machine_api::atomic::write_atomic;
use tonic::transport::{Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{RoleContext, RoleError};
use crate::supervisor::{HealthCheck, ServiceSpec};

pub const SERVICE: &str = "containerd";
/// The pause image kubelet's sandboxes use: ours, baked into the image
/// (nothing is pulled; see `machine_api::layout::images`).
pub const PAUSE_IMAGE: &str = machine_api::layout::images::PAUSE;

/// The containerd major version, remembered in `cache` per binary (size
/// and mtime): running the 50 MB binary takes about a second under
/// emulation, on every boot and every reconcile.
pub fn detect_major_cached(bin: &Path, cache: &Path) -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt;
    let key = std::fs::metadata(bin)
        .map(|m| format!("{} {} {}", bin.display(), m.size(), m.mtime()))
        .unwrap_or_default();
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Some((k, major)) = text.trim().rsplit_once(' ') {
            if k == key {
                if let Ok(m) = major.parse() {
                    return Ok(m);
                }
            }
        }
    }
    let major = detect_major(bin)?;
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = machine_api::atomic::write_atomic(cache, format!("{key} {major}\n").as_bytes(), 0o644);
    Ok(major)
}

/// The containerd major version, from `containerd --version`
/// (`containerd github.com/containerd/containerd 1.6.20~ds1 ...`).
pub fn detect_major(bin: &Path) -> Result<u32, String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_major(&text).ok_or_else(|| format!("cannot read a version from {:?}", text.trim()))
}

fn parse_major(text: &str) -> Option<u32> {
    text.split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.split('.').count() >= 3 && w.starts_with(|c: char| c.is_ascii_digit()))
        .and_then(|w| w.split('.').next()?.parse().ok())
}

/// Paths the generated config points at.
#[derive(Clone, Debug)]
pub struct ContainerdPaths {
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub opt: PathBuf,
    pub runc: PathBuf,
    pub cni_bin: PathBuf,
    pub cni_conf: PathBuf,
}

fn q(p: &Path) -> String {
    // TOML basic string: paths here have no quotes or backslashes, but
    // escape anyway rather than trust that.
    format!("{:?}", p.display().to_string())
}

/// containerd's config for `major` (1 → schema 2, 2 → schema 3).
pub fn config_toml(major: u32, p: &ContainerdPaths) -> String {
    let common = format!(
        "root = {root}\nstate = {state}\n\n[grpc]\n  address = {sock}\n\n[ttrpc]\n  address = {ttrpc}\n\n\
         [debug]\n  level = \"info\"\n\n[metrics]\n  address = \"\"\n\n",
        root = q(&p.root),
        state = q(&p.state),
        sock = q(&p.socket),
        ttrpc = q(&p.socket.with_extension("sock.ttrpc")),
    );
    if major >= 2 {
        format!(
            "version = 3\n{common}\
[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n\n\
[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\n\
[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"overlayfs\"\n\n\
[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"{PAUSE_IMAGE}\"\n\n\
[plugins.\"io.containerd.cri.v1.runtime\".containerd]\n  default_runtime_name = \"runc\"\n\n\
[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n\
[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.runc.options]\n  SystemdCgroup = false\n  BinaryName = {runc}\n\n\
[plugins.\"io.containerd.cri.v1.runtime\".cni]\n  bin_dirs = [{cni_bin}]\n  conf_dir = {cni_conf}\n",
            opt = q(&p.opt),
            runc = q(&p.runc),
            cni_bin = q(&p.cni_bin),
            cni_conf = q(&p.cni_conf),
        )
    } else {
        format!(
            "version = 2\n{common}\
[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n\n\
[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\n\
[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"\n\n\
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n\
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = false\n  BinaryName = {runc}\n\n\
[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = {cni_bin}\n  conf_dir = {cni_conf}\n",
            opt = q(&p.opt),
            runc = q(&p.runc),
            cni_bin = q(&p.cni_bin),
            cni_conf = q(&p.cni_conf),
        )
    }
}

/// Health from the standard gRPC health service on containerd's socket.
#[derive(Debug)]
pub struct ContainerdHealth {
    pub socket: PathBuf,
}

#[async_trait]
impl HealthCheck for ContainerdHealth {
    async fn check(&self) -> Result<(), String> {
        let socket = self.socket.clone();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://containerd.invalid")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.socket.display()))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("health check failed: {}", e.message()))?;
        match resp.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("containerd reports {other:?}")),
        }
    }
}

/// The containerd service for this node.
pub fn service(ctx: &RoleContext) -> Result<ServiceSpec, RoleError> {
    let bin = ctx.binary(SERVICE, "containerd")?;
    let runc = ctx.binary(SERVICE, "runc")?;
    let cache = ctx.paths.root.join("var/lib/machined/containerd-version");
    let major =
        detect_major_cached(&bin, &cache).map_err(|e| RoleError::Certificates(SERVICE, e))?;
    let paths = ContainerdPaths {
        root: ctx.paths.containerd_root(),
        state: ctx.paths.containerd_state(),
        socket: ctx.paths.containerd_socket(),
        opt: ctx.paths.root.join("opt/containerd"),
        runc,
        cni_bin: ctx.paths.cni_bin_dir(),
        cni_conf: ctx.paths.cni_conf_dir(),
    };
    let toml = config_toml(major, &paths);
    let cfg_path = ctx.paths.containerd_config();
    write_atomic(&cfg_path, toml.as_bytes(), 0o644)
        .map_err(|e| RoleError::Io(cfg_path.display().to_string(), e))?;
    Ok(ServiceSpec {
        name: SERVICE.into(),
        argv: vec![
            bin.display().to_string(),
            "--config".into(),
            cfg_path.display().to_string(),
        ],
        env: vec![
            ("PATH".into(), ctx.service_path()),
            // Folded into the spec hash: a changed config restarts containerd.
            ("MACHINED_CONTAINERD_CONFIG".into(), {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&toml))
            }),
        ],
        cwd: None,
        depends_on: vec![],
        health: Arc::new(ContainerdHealth {
            socket: paths.socket,
        }),
        stop_timeout: Duration::from_secs(10),
        pre_start: None,
        cpu_weight: None,
        // containerd's upstream unit value (2017-2023; CRI-O's today);
        // containers inherit it unless their spec sets one.
        nofile: Some(crate::limits::DEFAULT_SERVICE_NOFILE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_cache_is_used_until_the_binary_changes() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("containerd");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.7.24~ds1 x'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = t.path().join("cache/containerd-version");
        assert_eq!(detect_major_cached(&bin, &cache).unwrap(), 1);
        // The cached answer wins while size and mtime are unchanged.
        let text = std::fs::read_to_string(&cache).unwrap();
        std::fs::write(&cache, text.replace(" 1\n", " 7\n")).unwrap();
        assert_eq!(detect_major_cached(&bin, &cache).unwrap(), 7);
        // A different binary is run again.
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'containerd github.com/containerd/containerd v2.1.4 abc'\n",
        )
        .unwrap();
        assert_eq!(detect_major_cached(&bin, &cache).unwrap(), 2);
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_major(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
            ),
            Some(1)
        );
        assert_eq!(parse_major("containerd containerd.io v2.1.9 abc"), Some(2));
        assert_eq!(parse_major("garbage"), None);
    }

    #[test]
    fn configs_are_valid_toml_with_the_right_schema() {
        let p = ContainerdPaths {
            root: "/r/var/lib/containerd".into(),
            state: "/r/run/containerd".into(),
            socket: "/r/run/containerd/containerd.sock".into(),
            opt: "/r/opt/containerd".into(),
            runc: "/usr/sbin/runc".into(),
            cni_bin: "/opt/cni/bin".into(),
            cni_conf: "/etc/cni/net.d".into(),
        };
        for (major, version, cri) in [
            (1, 2, "io.containerd.grpc.v1.cri"),
            (2, 3, "io.containerd.cri.v1.runtime"),
        ] {
            let text = config_toml(major, &p);
            let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(v["version"].as_integer(), Some(version));
            assert!(v["plugins"].get(cri).is_some(), "{text}");
            assert_eq!(
                v["grpc"]["address"].as_str(),
                Some("/r/run/containerd/containerd.sock")
            );
        }
    }
}
