//! /etc/hosts, /etc/resolv.conf and /etc/hostname on a node. The root
//! filesystem is read-only, so the image links these names into
//! /system/etc, and machined writes them there (atomically) whenever the
//! node's name, addresses or name servers are known or change.

use std::net::IpAddr;
use std::path::Path;

use machine_api::atomic::write_atomic;

/// Name servers when none are configured or learnt from DHCP.
pub const DEFAULT_NAMESERVERS: [[u8; 4]; 2] = [[1, 1, 1, 1], [8, 8, 8, 8]];

/// What the files say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcFiles {
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
    pub nameservers: Vec<IpAddr>,
}

impl EtcFiles {
    pub fn hosts(&self) -> String {
        // etcd and Go's resolver look `localhost` up here: without it etcd
        // cannot resolve its own listen URLs.
        let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        for a in &self.addresses {
            s.push_str(&format!("{a}\t{}\n", self.hostname));
        }
        if self.addresses.is_empty() {
            s.push_str(&format!("127.0.1.1\t{}\n", self.hostname));
        }
        s
    }

    pub fn resolv_conf(&self) -> String {
        let mut s = String::new();
        if self.nameservers.is_empty() {
            // Neither the config nor DHCP named any: public resolvers, as
            // Talos defaults to. An empty resolv.conf would stop CoreDNS
            // (its `forward` needs an upstream), and with it cluster DNS.
            s.push_str("# no name servers configured (machine.network.nameservers) or from DHCP: defaults\n");
        }
        let defaults = DEFAULT_NAMESERVERS.map(IpAddr::from);
        let servers = if self.nameservers.is_empty() {
            &defaults[..]
        } else {
            &self.nameservers[..]
        };
        for n in servers.iter().take(3) {
            s.push_str(&format!("nameserver {n}\n"));
        }
        s
    }

    /// Writes the three files into `dir`; each is replaced atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_atomic(&dir.join("hosts"), self.hosts().as_bytes(), 0o644)?;
        write_atomic(
            &dir.join("resolv.conf"),
            self.resolv_conf().as_bytes(),
            0o644,
        )?;
        write_atomic(
            &dir.join("hostname"),
            format!("{}\n", self.hostname).as_bytes(),
            0o644,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_name_localhost_the_node_and_at_most_three_servers() {
        let f = EtcFiles {
            hostname: "cp1".into(),
            addresses: vec!["10.5.0.2".parse().unwrap()],
            nameservers: ["1.1.1.1", "8.8.8.8", "9.9.9.9", "10.0.0.1"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
        };
        assert!(f.hosts().contains("127.0.0.1\tlocalhost\n"));
        assert!(f.hosts().contains("10.5.0.2\tcp1\n"));
        assert_eq!(f.resolv_conf().lines().count(), 3);
        let t = tempfile::tempdir().unwrap();
        f.write(t.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("hostname")).unwrap(),
            "cp1\n"
        );
    }

    #[test]
    fn resolv_conf_falls_back_to_public_resolvers() {
        let f = EtcFiles::default();
        let text = f.resolv_conf();
        assert!(
            text.contains("nameserver 1.1.1.1\nnameserver 8.8.8.8\n"),
            "{text}"
        );
        let g = EtcFiles {
            nameservers: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(g.resolv_conf(), "nameserver 10.0.0.1\n");
    }
}
