//! The image layout contract: what imager writes onto a node's disk and
//! what init and machined look for there. Defined once, so the three
//! cannot drift apart; a test below pins every value, so changing one is a
//! deliberate act (images already written keep the old layout).
//!
//! ```text
//! GPT disk
//!  1 "EFI"        ESP type     FAT, label "ESP": systemd-boot,
//!                              loader/entries/slot-a+3.conf, A/vmlinuz, A/initrd
//!  2 "A"          root x86-64  squashfs root of slot A (read-only)
//!  3 "B"          root x86-64  slot B (empty until the first upgrade)
//!  4 "STATE"      Linux data   ext4, made by machined on first boot
//!  5 "EPHEMERAL"  Linux data   ext4, rest of the disk, grown with it
//! ```
//!
//! Partitions are found by their GPT name (sysfs `PARTNAME`), never by
//! device path or number. The boot entry of a slot puts `slot=A` (or `B`)
//! on the kernel command line; init mounts that partition as the root.

/// GPT name of the EFI system partition.
pub const ESP_PARTITION: &str = "EFI";
/// FAT volume label of the EFI system partition.
pub const ESP_LABEL: &str = "ESP";
/// GPT name of the STATE partition (machine config, mounted at
/// `/system/state`).
pub const STATE_PARTITION: &str = "STATE";
/// GPT name of the EPHEMERAL partition (etcd, containerd, logs; mounted
/// at `/var`; the last partition, grown to fill the disk).
pub const EPHEMERAL_PARTITION: &str = "EPHEMERAL";

/// GPT partition type GUIDs (as `u128`, the way `uuid::Uuid::from_u128`
/// takes them).
pub mod type_guid {
    /// EFI system partition.
    pub const ESP: u128 = 0xc12a7328_f81f_11d2_ba4b_00a0c93ec93b;
    /// Root partition (x86-64), Discoverable Partitions Specification: the
    /// slots.
    pub const ROOT_X86_64: u128 = 0x4f68bce3_e8cd_4db1_96e7_fbcaf984b709;
    /// Linux filesystem data: STATE and EPHEMERAL.
    pub const LINUX_DATA: u128 = 0x0fc63daf_8483_4772_8e79_3d69d8477de4;
}

/// The kernel command-line key naming the slot to boot (`slot=A`).
pub const SLOT_PARAM: &str = "slot";
/// Filesystem of a slot's root.
pub const ROOT_FSTYPE: &str = "squashfs";
/// Filesystem of STATE and EPHEMERAL.
pub const DATA_FSTYPE: &str = "ext4";

/// The directory of boot entries on the ESP (Boot Loader Specification).
pub const ENTRIES_DIR: &str = "loader/entries";
/// systemd-boot's configuration on the ESP.
pub const LOADER_CONF: &str = "loader/loader.conf";
/// systemd-boot's `default` pattern: any slot's entry.
pub const LOADER_DEFAULT: &str = "slot-*";
/// The firmware's fallback boot loader path, where systemd-boot goes.
pub const EFI_FALLBACK_LOADER: &str = "EFI/BOOT/BOOTX64.EFI";
/// systemd-boot's own path on the ESP.
pub const SYSTEMD_BOOT: &str = "EFI/systemd/systemd-bootx64.efi";
/// Tries a freshly installed entry gets (`+3`): systemd-boot counts them
/// down on each boot until machined marks the entry good.
pub const BOOT_TRIES: u32 = 3;
/// Kernel file name in a slot's ESP directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// Boot initramfs file name in a slot's ESP directory.
pub const INITRD_FILE: &str = "initrd";

/// An A/B root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot a `slot=` value names (`A` or `B`, as written by imager).
    pub fn parse(value: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.name() == value)
    }

    /// `A` or `B`: the slot's name in `slot=`, and its GPT partition name.
    pub const fn name(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// The GPT partition holding the slot's root.
    pub const fn partition(self) -> &'static str {
        self.name()
    }

    /// The kernel argument that boots this slot: `slot=A`.
    pub fn cmdline_arg(self) -> String {
        format!("{SLOT_PARAM}={}", self.name())
    }

    /// The slot's directory on the ESP (kernel and initramfs).
    pub const fn esp_dir(self) -> &'static str {
        self.name()
    }

    /// The kernel's path on the ESP: `A/vmlinuz`.
    pub fn kernel_path(self) -> String {
        format!("{}/{KERNEL_FILE}", self.esp_dir())
    }

    /// The boot initramfs' path on the ESP: `A/initrd`.
    pub fn initrd_path(self) -> String {
        format!("{}/{INITRD_FILE}", self.esp_dir())
    }

    /// The name of the slot's boot entry without a counter or `.conf`:
    /// `slot-a`.
    pub const fn entry_stem(self) -> &'static str {
        match self {
            Slot::A => "slot-a",
            Slot::B => "slot-b",
        }
    }

    /// The entry file as installed, with `tries` left: `slot-a+3.conf`.
    pub fn counted_entry(self, tries: u32) -> String {
        format!("{}+{tries}.conf", self.entry_stem())
    }

    /// The entry file once marked good (no counter): `slot-a.conf`.
    pub fn good_entry(self) -> String {
        format!("{}.conf", self.entry_stem())
    }

    /// True when `file` (in [`ENTRIES_DIR`]) is this slot's entry with a
    /// boot counter, as installed or counted down (`slot-a+2-1.conf`,
    /// `slot-2-a+3.conf`).
    pub fn is_counted_entry(self, file: &str) -> bool {
        UpgradeEntry::parse(file).is_some_and(|e| e.slot == self)
            && entry_without_counter(file).is_some()
    }

    /// The other slot: where an upgrade of a node running this one goes.
    pub const fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// A slot's boot entry, named so that systemd-boot picks the newest
/// install. systemd-boot sorts entries without a sort key by file name in
/// descending version order (a numeric part is newer than a letter), and
/// an entry whose counter ran out (`+0`) after every other: the default
/// pattern [`LOADER_DEFAULT`] then picks the first. imager's first entry
/// is generation 0, `slot-a`; each upgrade writes `slot-<n>-<x>` with the
/// next generation, which sorts before every older entry. When it never
/// marks itself good its counter runs out and the older entry is first
/// again: the node falls back by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeEntry {
    pub generation: u32,
    pub slot: Slot,
}

impl UpgradeEntry {
    /// The entry a file in [`ENTRIES_DIR`] is (with or without counter).
    pub fn parse(file: &str) -> Option<UpgradeEntry> {
        let stem = file.strip_suffix(".conf")?;
        let base = stem.split_once('+').map_or(stem, |(b, _)| b);
        let rest = base.strip_prefix("slot-")?;
        let (generation, letter) = match rest.split_once('-') {
            Some((n, l)) => (n.parse().ok().filter(|&n| n > 0)?, l),
            None => (0, rest),
        };
        let slot = Slot::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(letter))?;
        Some(UpgradeEntry { generation, slot })
    }

    /// The entry name without counter or `.conf`: `slot-a`, `slot-2-b`.
    pub fn stem(&self) -> String {
        match self.generation {
            0 => self.slot.entry_stem().to_owned(),
            n => format!("slot-{n}-{}", self.slot.name().to_ascii_lowercase()),
        }
    }

    /// The file as installed, with `tries` left: `slot-2-b+3.conf`.
    pub fn counted(&self, tries: u32) -> String {
        format!("{}+{tries}.conf", self.stem())
    }

    /// One more than the highest generation among `files`.
    pub fn next_generation<S: AsRef<str>>(files: &[S]) -> u32 {
        files
            .iter()
            .filter_map(|f| UpgradeEntry::parse(f.as_ref()))
            .map(|e| e.generation)
            .max()
            .unwrap_or(0)
            + 1
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A boot entry's file name without its counter, as the Boot Loader
/// Specification's boot counting names them: `slot-a+2-1.conf` (2 tries
/// left, 1 done) -> `slot-a.conf`. None when `name` has no valid counter.
pub fn entry_without_counter(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".conf")?;
    let (base, counter) = stem.rsplit_once('+')?;
    let valid = counter
        .split('-')
        .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (valid && counter.split('-').count() <= 2).then(|| format!("{base}.conf"))
}

/// File names of `imager build`'s outputs for profile `name`, which
/// `osctl cluster create` and the tests boot.
pub mod artifact {
    /// The kernel.
    pub fn kernel(name: &str) -> String {
        format!("{name}{KERNEL_SUFFIX}")
    }
    /// The full initramfs (the whole image; diskless and PXE boots).
    pub fn initramfs(name: &str) -> String {
        format!("{name}{INITRAMFS_SUFFIX}")
    }
    /// The disk's small initramfs (init and modules; root from a slot).
    pub fn boot_initrd(name: &str) -> String {
        format!("{name}{BOOT_INITRD_SUFFIX}")
    }
    /// The raw GPT disk.
    pub fn disk(name: &str) -> String {
        format!("{name}{DISK_SUFFIX}")
    }
    /// Slot A's root filesystem (squashfs), as on the disk: what an
    /// upgrade writes into the other slot.
    pub fn root(name: &str) -> String {
        format!("{name}{ROOT_SUFFIX}")
    }
    /// Every entry of the image tree, one line each (path, type, mode,
    /// size, sha256 or link target): what `imager verify --rebuild`
    /// compares to name the first file that differs.
    pub fn tree_listing(name: &str) -> String {
        format!("{name}{TREE_SUFFIX}")
    }
    /// The image's regular files in `sha256sum -c` format, relative to the
    /// root (check an unpacked initramfs or squashfs with it).
    pub fn file_sums(name: &str) -> String {
        format!("{name}{FILE_SUMS_SUFFIX}")
    }
    /// The software bill of materials (CycloneDX JSON).
    pub fn sbom(name: &str) -> String {
        format!("{name}{SBOM_SUFFIX}")
    }
    /// The upgrade bundle: one tar of the manifest, its signature and the
    /// files of a slot (kernel, boot initramfs, root).
    pub fn upgrade_bundle(name: &str) -> String {
        format!("{name}{UPGRADE_SUFFIX}")
    }
    /// The build's manifest, and its detached signature beside it.
    pub const MANIFEST: &str = "manifest.json";
    pub const MANIFEST_SIGNATURE: &str = "manifest.json.sig";
    pub const ROOT_SUFFIX: &str = "-root.squashfs";
    pub const TREE_SUFFIX: &str = "-tree.txt";
    pub const FILE_SUMS_SUFFIX: &str = "-files.sha256";
    pub const SBOM_SUFFIX: &str = "-sbom.cdx.json";
    pub const UPGRADE_SUFFIX: &str = "-upgrade.tar";
    pub const KERNEL_SUFFIX: &str = "-vmlinuz";
    pub const INITRAMFS_SUFFIX: &str = "-initramfs.cpio.zst";
    pub const BOOT_INITRD_SUFFIX: &str = "-boot-initrd.cpio.zst";
    pub const DISK_SUFFIX: &str = "-disk.raw";
}

/// Container images baked into the image as OCI archives (no registry is
/// reachable from a node): imager writes them, with an [`images::INDEX`]
/// listing them, under [`images::DIR`]; machined imports them into
/// containerd's `k8s.io` namespace before kubelet needs them. The names
/// are under `localhost/` because these are our builds, not the
/// upstream registries' bytes.
pub mod images {
    use serde::{Deserialize, Serialize};

    /// Where the archives and their index are, relative to the root.
    pub const DIR: &str = "usr/lib/machined/images";
    /// The index of the archives in [`DIR`]: a JSON array of
    /// [`IndexEntry`].
    pub const INDEX: &str = "index.json";
    /// The pod sandbox (machined's `pause` program).
    pub const PAUSE: &str = "localhost/node-os/pause:1";
    /// CoreDNS, built from its Go module by `scripts/build-kubernetes.sh
    /// --coredns` (present when the Kubernetes binaries came with it).
    pub const COREDNS: &str = "localhost/node-os/coredns:v1.13.1";
    /// The CoreDNS release [`COREDNS`] holds (its tag).
    pub const COREDNS_VERSION: &str = "v1.13.1";
    /// A test workload: Debian's `busybox-static` and a few applets.
    pub const BUSYBOX: &str = "localhost/node-os/busybox:1";
    /// The label (key, value) that keeps kubelet's image garbage collection
    /// away from an image (containerd's CRI plugin, 1.7 and later).
    pub const PINNED_LABEL: (&str, &str) = ("io.cri-containerd.pinned", "pinned");

    /// One archive of [`INDEX`].
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct IndexEntry {
        /// The image reference it is imported as (e.g. [`PAUSE`]).
        #[serde(rename = "ref")]
        pub reference: String,
        /// The archive's file name in [`DIR`].
        pub file: String,
        /// `sha256:...` of the image manifest: the image's identity, the
        /// same whatever the archive around it.
        pub manifest_digest: String,
        /// The archive's size in bytes.
        pub size: u64,
    }

    /// The archive file name for `reference`: its last path component,
    /// `:` made `-` (`localhost/node-os/pause:1` -> `pause-1.tar`).
    pub fn archive_file(reference: &str) -> String {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        format!("{}.tar", name.replace([':', '@'], "-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Images in the field carry these values: a change here needs a
    /// migration, not just an edit.
    #[test]
    fn the_contract_is_what_images_carry() {
        assert_eq!(
            [
                ESP_PARTITION,
                Slot::A.partition(),
                Slot::B.partition(),
                STATE_PARTITION,
                EPHEMERAL_PARTITION
            ],
            ["EFI", "A", "B", "STATE", "EPHEMERAL"]
        );
        assert_eq!(ESP_LABEL, "ESP");
        assert_eq!(
            format!("{:032x}", type_guid::ESP),
            "c12a7328f81f11d2ba4b00a0c93ec93b"
        );
        assert_eq!(
            format!("{:032x}", type_guid::ROOT_X86_64),
            "4f68bce3e8cd4db196e7fbcaf984b709"
        );
        assert_eq!(
            format!("{:032x}", type_guid::LINUX_DATA),
            "0fc63daf848347728e793d69d8477de4"
        );
        assert_eq!(Slot::A.cmdline_arg(), "slot=A");
        assert_eq!(Slot::B.cmdline_arg(), "slot=B");
        assert_eq!((ROOT_FSTYPE, DATA_FSTYPE), ("squashfs", "ext4"));
        assert_eq!(Slot::A.counted_entry(BOOT_TRIES), "slot-a+3.conf");
        assert_eq!(Slot::A.good_entry(), "slot-a.conf");
        assert_eq!(Slot::B.counted_entry(BOOT_TRIES), "slot-b+3.conf");
        assert_eq!(Slot::A.kernel_path(), "A/vmlinuz");
        assert_eq!(Slot::A.initrd_path(), "A/initrd");
        assert_eq!(Slot::B.kernel_path(), "B/vmlinuz");
        assert_eq!(
            [ENTRIES_DIR, LOADER_CONF, LOADER_DEFAULT],
            ["loader/entries", "loader/loader.conf", "slot-*"]
        );
        assert_eq!(
            [EFI_FALLBACK_LOADER, SYSTEMD_BOOT],
            ["EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi"]
        );
        assert_eq!(
            [
                artifact::kernel("qemu"),
                artifact::initramfs("qemu"),
                artifact::boot_initrd("qemu"),
                artifact::disk("qemu")
            ],
            [
                "qemu-vmlinuz",
                "qemu-initramfs.cpio.zst",
                "qemu-boot-initrd.cpio.zst",
                "qemu-disk.raw"
            ]
        );
    }

    #[test]
    fn upgrade_entries_name_their_generation_and_slot() {
        let e = |g, s| UpgradeEntry {
            generation: g,
            slot: s,
        };
        for (file, want) in [
            ("slot-a+3.conf", Some(e(0, Slot::A))),
            ("slot-a.conf", Some(e(0, Slot::A))),
            ("slot-a+2-1.conf", Some(e(0, Slot::A))),
            ("slot-1-b+3.conf", Some(e(1, Slot::B))),
            ("slot-12-a.conf", Some(e(12, Slot::A))),
            ("slot-0-a.conf", None),
            ("slot-c.conf", None),
            ("other.conf", None),
            ("slot-1-b", None),
        ] {
            assert_eq!(UpgradeEntry::parse(file), want, "{file}");
        }
        assert_eq!(e(0, Slot::A).counted(3), Slot::A.counted_entry(3));
        assert_eq!(e(2, Slot::B).counted(3), "slot-2-b+3.conf");
        assert_eq!(UpgradeEntry::next_generation(&["slot-a.conf"]), 1);
        assert_eq!(
            UpgradeEntry::next_generation(&["slot-a+0-3.conf", "slot-4-b.conf"]),
            5
        );
        assert!(Slot::B.is_counted_entry("slot-1-b+2-1.conf"));
        assert!(!Slot::A.is_counted_entry("slot-1-b+3.conf"));
        assert!(!Slot::B.is_counted_entry("slot-1-b.conf"));
        assert_eq!(
            entry_without_counter("slot-1-b+2-1.conf").as_deref(),
            Some("slot-1-b.conf")
        );
        assert_eq!(Slot::A.other(), Slot::B);
    }

    #[test]
    fn baked_image_names_are_pinned() {
        use images::*;
        assert_eq!(DIR, "usr/lib/machined/images");
        assert_eq!(INDEX, "index.json");
        assert_eq!(
            [PAUSE, COREDNS, BUSYBOX],
            [
                "localhost/node-os/pause:1",
                "localhost/node-os/coredns:v1.13.1",
                "localhost/node-os/busybox:1"
            ]
        );
        assert!(COREDNS.ends_with(&format!(":{COREDNS_VERSION}")));
        assert_eq!(archive_file(PAUSE), "pause-1.tar");
        assert_eq!(archive_file(COREDNS), "coredns-v1.13.1.tar");
        let e = IndexEntry {
            reference: PAUSE.into(),
            file: archive_file(PAUSE),
            manifest_digest: "sha256:00".into(),
            size: 1,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"ref":"localhost/node-os/pause:1","file":"pause-1.tar","manifestDigest":"sha256:00","size":1}"#
        );
    }

    #[test]
    fn slots_parse_from_their_names_only() {
        assert_eq!(Slot::parse("A"), Some(Slot::A));
        assert_eq!(Slot::parse("B"), Some(Slot::B));
        for bad in ["a", "C", "", "AB", " A"] {
            assert_eq!(Slot::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Slot::B.to_string(), "B");
    }

    #[test]
    fn boot_counters_come_off_entry_names() {
        assert_eq!(
            entry_without_counter("slot-a+3.conf").as_deref(),
            Some("slot-a.conf")
        );
        assert_eq!(
            entry_without_counter("slot-a+2-1.conf").as_deref(),
            Some("slot-a.conf")
        );
        assert_eq!(
            entry_without_counter("slot-a+0-3.conf").as_deref(),
            Some("slot-a.conf")
        );
        assert_eq!(entry_without_counter("slot-a.conf"), None);
        assert_eq!(entry_without_counter("slot-a+x.conf"), None);
        assert_eq!(entry_without_counter("slot-a+1-2-3.conf"), None);
        assert!(Slot::A.is_counted_entry("slot-a+2-1.conf"));
        assert!(!Slot::A.is_counted_entry("slot-a.conf"));
        assert!(!Slot::A.is_counted_entry("slot-b+3.conf"));
        assert!(!Slot::B.is_counted_entry("slot-ba+3.conf"));
    }
}
