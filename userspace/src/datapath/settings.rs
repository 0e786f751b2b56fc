//! The class table (`CLASSES_V4/V6` tries, and the inline table in `CONFIG`) and the global
//! settings.

use std::{collections::HashSet, io};

use aya::maps::lpm_trie::Key;
use berth_common::{MAX_CLASSES, map_names};
use ipnet::IpNet;
use tracing::info;

use super::{
    ClassEntry, Datapath, DatapathConfig, DatapathError, DatapathView, Result, classes, map_values,
};
use crate::bpf::{io_err, map_err};

impl DatapathView {
    /// The class table, sorted by family, prefix length and address.
    pub fn classes(&self) -> Result<Vec<ClassEntry>> {
        let mut out = Vec::new();
        for item in self.classes_v4.iter() {
            let (k, class) =
                item.map_err(map_err(map_names::CLASSES_V4, &self.pin_dir, "iterate"))?;
            let net = ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8)
                .map_err(|e| io_err("decoding", &self.pin_dir)(io::Error::other(e)))?;
            out.push(ClassEntry {
                class: class as u8,
                net: net.into(),
            });
        }
        for item in self.classes_v6.iter() {
            let (k, class) =
                item.map_err(map_err(map_names::CLASSES_V6, &self.pin_dir, "iterate"))?;
            let net = ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8)
                .map_err(|e| io_err("decoding", &self.pin_dir)(io::Error::other(e)))?;
            out.push(ClassEntry {
                class: class as u8,
                net: net.into(),
            });
        }
        out.sort_by_key(|e| (e.net.addr().is_ipv6(), e.net.prefix_len(), e.net.addr()));
        Ok(out)
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        let raw =
            self.config
                .get(&0, 0)
                .map_err(map_err(map_names::CONFIG, &self.pin_dir, "get"))?;
        Ok(map_values::settings_of(&raw))
    }
}

impl Datapath {
    /// Replaces the class table (both families) with `entries`; prefixes not in `entries` are
    /// removed after the new ones are in.
    pub fn load_classes(&mut self, entries: &[ClassEntry]) -> Result<()> {
        classes::check_capacity(entries)?;
        for e in entries {
            if u32::from(e.class) >= MAX_CLASSES {
                return Err(DatapathError::InvalidClass {
                    class: u32::from(e.class),
                    max: MAX_CLASSES,
                });
            }
        }
        let old = self.classes()?;
        let path = self.view.pin_dir.clone();
        for e in entries {
            match e.net.trunc() {
                IpNet::V4(n) => self
                    .view
                    .classes_v4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        u32::from(e.class),
                        0,
                    )
                    .map_err(map_err(map_names::CLASSES_V4, &path, "insert"))?,
                IpNet::V6(n) => self
                    .view
                    .classes_v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        u32::from(e.class),
                        0,
                    )
                    .map_err(map_err(map_names::CLASSES_V6, &path, "insert"))?,
            }
        }
        // The tries hold old + new now; the fast path in CONFIG switches to the new table,
        // then stale prefixes go.
        let settings = self.config()?;
        self.write_config(settings, entries)?;
        let keep: HashSet<IpNet> = entries.iter().map(|e| e.net.trunc()).collect();
        for e in old.iter().filter(|e| !keep.contains(&e.net)) {
            let res = match e.net {
                IpNet::V4(n) => self
                    .view
                    .classes_v4
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets()))
                    .map_err(map_err(map_names::CLASSES_V4, &path, "remove")),
                IpNet::V6(n) => self
                    .view
                    .classes_v6
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets()))
                    .map_err(map_err(map_names::CLASSES_V6, &path, "remove")),
            };
            res?;
        }
        info!(entries = entries.len(), "class table loaded");
        Ok(())
    }

    fn write_config(&mut self, settings: DatapathConfig, classes: &[ClassEntry]) -> Result<()> {
        let raw = map_values::config_value(settings, classes);
        self.view.config.set(0, raw, 0).map_err(map_err(
            map_names::CONFIG,
            &self.view.pin_dir,
            "set",
        ))?;
        Ok(())
    }

    /// Changes the global settings; applies to packets from now on (existing totals keep
    /// what they counted).
    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        if u32::from(config.default_class) >= MAX_CLASSES {
            return Err(DatapathError::InvalidClass {
                class: u32::from(config.default_class),
                max: MAX_CLASSES,
            });
        }
        let classes = self.classes()?;
        self.write_config(config, &classes)
    }
}
