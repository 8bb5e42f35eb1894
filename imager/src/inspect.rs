//! `imager inspect`: what is in an initramfs, a disk image or a manifest.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

use crate::format::{cpio, fat, gpt_disk};

pub fn inspect(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if name.ends_with(".json") {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        println!(
            "profile {} (source date {})",
            v["profile"]["name"], v["sourceDateEpoch"]
        );
        println!("inputs:");
        for i in v["inputs"].as_array().into_iter().flatten() {
            println!(
                "  {:<40} {:<28} {}",
                i["name"].as_str().unwrap_or(""),
                i["version"].as_str().unwrap_or(""),
                &i["sha256"].as_str().unwrap_or("")
                    [..16.min(i["sha256"].as_str().unwrap_or("").len())]
            );
        }
        println!("kubernetes: {}", v["kubernetes"]["note"]);
        println!("container images: {}", v["containerImagesNote"]);
        for i in v["containerImages"].as_array().into_iter().flatten() {
            println!(
                "  {:<36} {:>12} {} {}",
                i["ref"].as_str().unwrap_or(""),
                i["size"],
                i["manifestDigest"].as_str().unwrap_or(""),
                i["file"].as_str().unwrap_or("")
            );
        }
        println!("outputs:");
        for o in v["outputs"].as_array().into_iter().flatten() {
            println!(
                "  {:<10} {:>12} {}",
                o["kind"].as_str().unwrap_or(""),
                o["size"],
                o["path"].as_str().unwrap_or("")
            );
        }
        return Ok(());
    }
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .with_context(|| format!("open {}", path.display()))?
        .read_exact(&mut head)
        .ok();
    let data = if head[..4] == [0x28, 0xb5, 0x2f, 0xfd] {
        zstd::decode_all(std::fs::File::open(path)?)?
    } else if head[..6] == *b"070701" {
        std::fs::read(path)?
    } else {
        let parts = gpt_disk::list(path).with_context(|| {
            format!(
                "{}: not a cpio, zstd cpio, GPT disk or manifest",
                path.display()
            )
        })?;
        println!(
            "{:<10} {:>12} {:>12} {:>10}",
            "PARTITION", "FIRST LBA", "LAST LBA", "SIZE MiB"
        );
        for p in &parts {
            println!(
                "{:<10} {:>12} {:>12} {:>10}",
                p.name,
                p.first_lba,
                p.last_lba,
                (p.last_lba - p.first_lba + 1) * 512 / 1048576
            );
        }
        if let Some(esp) = parts
            .iter()
            .find(|p| p.name == machine_api::layout::ESP_PARTITION)
        {
            let mut f = std::fs::File::open(path)?;
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(esp.first_lba * 512))?;
            let mut img = vec![0u8; ((esp.last_lba - esp.first_lba + 1) * 512) as usize];
            f.read_exact(&mut img)?;
            println!("\nEFI system partition:");
            for (p, size) in fat::list(&img)? {
                println!("  {size:>12}  {p}");
            }
        }
        return Ok(());
    };
    for (p, mode, size) in cpio::list_newc(&data)? {
        println!("{mode:06o} {size:>12}  {p}");
    }
    Ok(())
}
