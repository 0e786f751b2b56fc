//! Applying a CT's shaping to one host-side interface (and its IFB): HTB or EDT per
//! direction, in place where the structure allows.

use super::*;
use berth_runtime::error_chain::ErrorChain;

impl Shaper {
    /// Applies `config` to the CT's host-side interface `ifindex`, live and idempotently:
    /// rates change in place (queues and connections stay), directions no longer shaped are
    /// torn down. The config is validated first (burst against the interface's MTU): an
    /// invalid one changes nothing. An empty config is [`Self::remove`].
    pub fn apply(&mut self, ctid: Ctid, ifindex: u32, config: &ShapingConfig) -> Result<()> {
        let ctid = ctid.get();
        let (ifname, _, mtu) = tc::link_kind(&mut self.nl, ifindex)
            .map_err(net_err(format!("interface #{ifindex}"), ctid))?
            .ok_or(ShaperError::NoSuchIfindex { ifindex })?;
        config.validate(if mtu == 0 { DEFAULT_MTU } else { mtu })?;
        let existing = self.entry(ifindex)?;
        if let Some(e) = existing
            && e.ctid != ctid
        {
            return Err(ShaperError::WrongCt {
                ifindex,
                ctid,
                owner: e.ctid,
            });
        }
        if config.is_empty() {
            return self.remove_iface(ctid, ifindex);
        }
        let _lock = PinLock::take(&self.dir)?;
        let class_rates = |f: fn(&ClassRate) -> Option<Rate>| -> Vec<(u8, Rate)> {
            config
                .classes
                .iter()
                .filter_map(|c| f(c).map(|r| (c.class, r)))
                .collect()
        };
        let (classes_in, classes_out) = (class_rates(|c| c.rate_in), class_rates(|c| c.rate_out));
        let plans = match self.backend.backend {
            Backend::Htb => (
                plan_dir(config.rate_in, &classes_in, config.burst).map(DirShape::Htb),
                plan_dir(config.rate_out, &classes_out, config.burst).map(DirShape::Htb),
            ),
            Backend::Edt => (
                edt::state(ctid, DIR_IN, config.rate_in, &classes_in)
                    .map(|s| DirShape::Edt(Box::new(s))),
                edt::state(ctid, DIR_OUT, config.rate_out, &classes_out)
                    .map(|s| DirShape::Edt(Box::new(s))),
            ),
        };

        let result = self.apply_plans(ctid, ifindex, &ifname, config, &plans, existing);
        if result.is_err() && existing.is_none() {
            // A first apply that failed half-way leaves nothing behind.
            if let Err(e) = self.teardown(ctid, ifindex, Some(&ifname), None) {
                warn!(ctid, ifindex, error = %ErrorChain(&e), "rollback of a failed shaping setup");
            }
        }
        result
    }

    fn apply_plans(
        &mut self,
        ctid: u32,
        ifindex: u32,
        ifname: &str,
        config: &ShapingConfig,
        (plan_in, plan_out): &(Option<DirShape>, Option<DirShape>),
        existing: Option<ShapeIface>,
    ) -> Result<()> {
        self.attach(ifindex, ifname)?;
        if let Some(p) = plan_in {
            self.apply_dir(ctid, ifindex, ifname, p)?;
        }
        let old_ifb = existing.map_or(0, |e| e.ifb_ifindex);
        let mut ifb = 0;
        if let Some(p) = plan_out {
            let name = ifb_name(ifname, ifindex);
            let reuse = old_ifb != 0
                && matches!(
                    tc::link_kind(&mut self.nl, old_ifb)
                        .map_err(net_err(format!("IFB {name}"), ctid))?,
                    Some((_, kind, _)) if kind == "ifb"
                );
            ifb = if reuse {
                old_ifb
            } else {
                self.ensure_ifb(ctid, &name)?
            };
            self.apply_dir(ctid, ifb, &name, p)?;
        }

        let mut flags = 0;
        let mut entry = ShapeIface {
            ctid,
            ifb_ifindex: ifb,
            ..Default::default()
        };
        // With EDT nothing reads the HTB class from skb->priority: SHAPE_IN stays off (the
        // classifier then only enforces packet rates to the CT).
        if let Some(DirShape::Htb(p)) = plan_in {
            flags |= SHAPE_IN | if p.rest { REST_IN } else { 0 };
            entry.classes_in = p.own;
        }
        match plan_out {
            Some(DirShape::Htb(p)) => {
                flags |= SHAPE_OUT | if p.rest { REST_OUT } else { 0 };
                entry.classes_out = p.own;
            }
            Some(DirShape::Edt(_)) => flags |= SHAPE_OUT,
            None => {}
        }
        for (dir, pps, flag) in [
            (DIR_IN, config.pps_in, PPS_IN),
            (DIR_OUT, config.pps_out, PPS_OUT),
        ] {
            let key = u64::from(ifindex) | u64::from(dir) << 32;
            match pps {
                Some(rate) => {
                    flags |= flag;
                    let keep = self.pps.get(&key, 0).ok().filter(|b| b.rate == rate);
                    if keep.is_none() {
                        let path = self.dir.join("maps").join(map_names::PPS);
                        self.pps.insert(key, pps_bucket(rate), 0).map_err(map_err(
                            map_names::PPS,
                            &path,
                            "insert",
                        ))?;
                    }
                }
                None => {
                    let _ = self.pps.remove(&key);
                }
            }
        }
        entry.flags = flags;
        let path = self.dir.join("maps").join(map_names::IFACES);
        // The programs switch over with this one update: queues first, then the entry that
        // sends traffic into them; on the way down the entry first, then the queues.
        self.ifaces.insert(ifindex, entry, 0).map_err(map_err(
            map_names::IFACES,
            &path,
            "insert",
        ))?;

        if plan_in.is_none() {
            self.unshape_dev(ctid, ifindex, Some(ifname))?;
        }
        if old_ifb != 0 && old_ifb != ifb {
            self.unshape_dev(ctid, old_ifb, None)?;
            tc::del_link_index(&mut self.nl, old_ifb, &format!("IFB #{old_ifb}"))
                .map_err(net_err("removing the IFB", ctid))?;
        }
        info!(
            ctid,
            ifindex,
            ifname,
            backend = self.backend.backend.name(),
            ?config,
            "shaping applied"
        );
        Ok(())
    }

    /// Shapes one device (host-side interface or IFB) as `plan` says, switching from the
    /// other backend's setup if it has one.
    fn apply_dir(&mut self, ctid: u32, dev: u32, devname: &str, plan: &DirShape) -> Result<()> {
        match plan {
            DirShape::Htb(p) => {
                self.drop_edt(dev, Some(devname));
                self.apply_htb(ctid, dev, devname, p)
            }
            DirShape::Edt(st) => {
                let err = |what: &str| net_err(format!("{what} on {devname}"), ctid);
                tc::set_root_fq(&mut self.nl, dev, devname, HTB_MAJOR, &edt::fq_params(st))
                    .map_err(err("setting the root fq"))?;
                // Keep the departure clocks of a live rate change: only the rates move.
                let mut st = **st;
                if let Ok(old) = self.edt.get(&dev, 0) {
                    for (new, old) in st.slots.iter_mut().zip(old.slots.iter()) {
                        if new.ns_per_byte_q16 != 0 {
                            new.t_next = old.t_next;
                        }
                    }
                }
                let path = self.dir.join("maps").join(map_names::EDT);
                self.edt
                    .insert(dev, st, 0)
                    .map_err(map_err(map_names::EDT, &path, "insert"))?;
                self.attach_hook(Hook::Edt, dev, devname)
            }
        }
    }

    /// Removes the EDT entry and program of `dev` (a missing one is fine).
    fn drop_edt(&mut self, dev: u32, devname: Option<&str>) {
        let _ = self.edt.remove(&dev);
        let link = self.links_dir(dev).join(EDT.file);
        if let Err(e) = std::fs::remove_file(&link)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dev, error = %e, "unpinning the EDT link");
        }
        if let Some(name) = devname {
            hooks::detach_cls_bpf(name, Hook::Edt.attach_type(), EDT.name);
        }
    }

    /// Takes the shaping off one device: EDT entry and program, and our root qdisc (HTB or
    /// fq with handle `1:`); the device falls back to its default qdisc.
    pub(super) fn unshape_dev(&mut self, ctid: u32, dev: u32, devname: Option<&str>) -> Result<()> {
        let name = devname
            .map(str::to_owned)
            .or_else(|| sys::if_indextoname(dev))
            .unwrap_or_else(|| format!("#{dev}"));
        self.drop_edt(dev, Some(&name));
        if let Some(kind) = tc::root_kind(&mut self.nl, dev, HTB_MAJOR).unwrap_or(None)
            && (kind == "htb" || kind == "fq")
        {
            tc::del_root(&mut self.nl, dev, &name).map_err(net_err(
                format!("removing the {kind} qdisc of {name}"),
                ctid,
            ))?;
        }
        Ok(())
    }

    fn ensure_ifb(&mut self, ctid: u32, name: &str) -> Result<u32> {
        let index = match tc::create_ifb(&mut self.nl, name) {
            Ok(i) => i,
            // A leftover of ours (same naming scheme, e.g. after a crash): reuse it.
            Err(NetError::LinkExists { .. }) => {
                let i = sys::if_nametoindex(name).ok_or_else(|| ShaperError::Net {
                    what: format!("IFB {name}"),
                    ctid,
                    source: NetError::LinkNotFound {
                        ifname: name.to_owned(),
                        ns: tc::NS.to_owned(),
                    },
                })?;
                match tc::link_kind(&mut self.nl, i)
                    .map_err(net_err(format!("IFB {name}"), ctid))?
                {
                    Some((_, kind, _)) if kind == "ifb" => i,
                    _ => {
                        return Err(ShaperError::Net {
                            what: format!("IFB {name}"),
                            ctid,
                            source: NetError::LinkExists {
                                ifname: name.to_owned(),
                                ns: tc::NS.to_owned(),
                            },
                        });
                    }
                }
            }
            Err(e) => return Err(net_err(format!("creating IFB {name}"), ctid)(e)),
        };
        self.nl
            .link_set_up(index, name)
            .map_err(net_err(format!("bringing up IFB {name}"), ctid))?;
        Ok(index)
    }

    /// Makes the HTB of `dev` match `plan`: classes changed in place, missing ones created,
    /// ones that no longer fit (gone, or under another parent) deleted deepest first.
    fn apply_htb(&mut self, ctid: u32, dev: u32, devname: &str, plan: &DirPlan) -> Result<()> {
        let nl = &mut self.nl;
        let err = |what: &str| net_err(format!("{what} on {devname}"), ctid);
        let existing = if tc::root_htb(nl, dev, HTB_MAJOR).map_err(err("reading qdiscs"))? {
            tc::classes(nl, dev)
                .map_err(err("reading classes"))?
                .into_iter()
                .filter(|c| c.handle >> 16 == HTB_MAJOR)
                .collect()
        } else {
            tc::add_root_htb(nl, dev, devname, HTB_MAJOR, MINOR_BULK, DIRECT_QLEN)
                .map_err(err("adding the root HTB"))?;
            Vec::new()
        };
        let wanted: BTreeMap<u32, u32> =
            plan.classes.iter().map(|c| (c.classid, c.parent)).collect();
        let mut stale: Vec<u32> = existing
            .iter()
            // HTB reports a top-level class's parent as TC_H_ROOT, not as the qdisc handle.
            .filter(|c| {
                let parent = if c.parent == u32::MAX {
                    handle(HTB_MAJOR, 0)
                } else {
                    c.parent
                };
                wanted.get(&c.handle) != Some(&parent)
            })
            .map(|c| c.handle)
            .collect();
        stale.sort_by_key(|h| std::cmp::Reverse(depth(*h)));
        for h in stale {
            tc::del_class(nl, dev, devname, h).map_err(err("deleting a class"))?;
        }
        for c in &plan.classes {
            tc::set_htb_class(nl, dev, devname, c.classid, c.parent, &c.params)
                .map_err(err("setting a class"))?;
            match c.leaf {
                Some(Leaf::Bulk(limit)) => tc::set_fifo(
                    nl,
                    dev,
                    devname,
                    c.classid,
                    c.classid & 0xffff,
                    "bfifo",
                    limit,
                ),
                Some(Leaf::Interactive(limit)) => tc::set_fifo(
                    nl,
                    dev,
                    devname,
                    c.classid,
                    c.classid & 0xffff,
                    "pfifo",
                    limit,
                ),
                None => Ok(()),
            }
            .map_err(err("setting a leaf queue"))?;
        }
        Ok(())
    }
}
