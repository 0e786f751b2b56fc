//! create, start, stop, restart, destroy, mount, umount, suspend, resume, exec and enter.
//!
//! Shaping glue that belongs in the runtime's lifecycle (it moves there next): [`create`] rolls
//! a CT back with `destroy` when its initial settings fail, and [`start`] / [`restart`] hand the
//! saved shaping to the hooks through [`shaping_for_start`].

use anyhow::Result;
use berth::ctnet::shaping_of;
use berth_runtime::Ctid;
use berth_runtime::config::CtConfig;
use berth_runtime::container::{self, CreateOpts, SetOpts};
use serde_json::json;

use crate::Ctx;
use crate::cli::CreateArgs;

pub fn create(ctx: &mut Ctx, a: CreateArgs) -> Result<()> {
    let ctid: Ctid = a.ctid.parse()?;
    container::create(
        &ctx.host,
        ctid,
        &CreateOpts {
            template: a.template,
            hostname: a.hostname,
            name: a.name,
            userns: a.userns,
            copy: a.copy,
        },
    )?;
    if !a.ipadd.is_empty() {
        let opts = SetOpts {
            ipadd: a.ipadd,
            ..Default::default()
        };
        if let Err(e) = container::set(&ctx.host, ctid, &opts, true, &mut ctx.hooks) {
            // create is all or nothing: no CT with half its settings.
            let _ = container::destroy(&ctx.host, ctid);
            return Err(e.into());
        }
    }
    ctx.print(json!({"ctid": ctid, "created": true}), || {
        println!("CT {ctid} created")
    });
    Ok(())
}

/// Sets the hooks' shaping to the CT's saved shaping, for the interfaces a start creates.
fn shaping_for_start(ctx: &mut Ctx, ctid: Ctid) -> Result<()> {
    ctx.hooks.shaping = shaping_of(CtConfig::load(&ctx.host, ctid)?.shaping.as_ref())
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

pub fn start(ctx: &mut Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    shaping_for_start(ctx, ctid)?;
    let st = container::start(&ctx.host, ctid, &mut ctx.hooks)?;
    ctx.print(json!({"ctid": ctid, "init_pid": st.init_pid}), || {
        println!("CT {ctid} started (init PID {})", st.init_pid)
    });
    Ok(())
}

pub fn stop(ctx: &mut Ctx, ct: &str, fast: bool) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::stop(&ctx.host, ctid, fast, &mut ctx.hooks)?;
    ctx.print(json!({"ctid": ctid, "stopped": true}), || {
        println!("CT {ctid} stopped")
    });
    Ok(())
}

pub fn restart(ctx: &mut Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    shaping_for_start(ctx, ctid)?;
    let st = container::restart(&ctx.host, ctid, &mut ctx.hooks)?;
    ctx.print(json!({"ctid": ctid, "init_pid": st.init_pid}), || {
        println!("CT {ctid} restarted (init PID {})", st.init_pid)
    });
    Ok(())
}

pub fn destroy(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::destroy(&ctx.host, ctid)?;
    ctx.print(json!({"ctid": ctid, "destroyed": true}), || {
        println!("CT {ctid} destroyed")
    });
    Ok(())
}

pub fn mount(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::mount_ct(&ctx.host, ctid)?;
    ctx.print(json!({"ctid": ctid, "mounted": true}), || {
        println!("CT {ctid} mounted at {}", ctx.host.root_dir(ctid).display())
    });
    Ok(())
}

pub fn umount(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::umount_ct(&ctx.host, ctid)?;
    ctx.print(json!({"ctid": ctid, "mounted": false}), || {
        println!("CT {ctid} unmounted")
    });
    Ok(())
}

pub fn suspend(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::suspend(&ctx.host, ctid)?;
    ctx.print(json!({"ctid": ctid, "state": "suspended"}), || {
        println!("CT {ctid} suspended")
    });
    Ok(())
}

pub fn resume(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::resume(&ctx.host, ctid)?;
    ctx.print(json!({"ctid": ctid, "state": "running"}), || {
        println!("CT {ctid} resumed")
    });
    Ok(())
}

/// The command's exit code, clamped to what an exit status can carry.
pub fn exec(ctx: &Ctx, ct: &str, cmd: &[String]) -> Result<u8> {
    let ctid = ctx.resolve(ct)?;
    let code = container::exec::exec(&ctx.host, ctid, cmd)?;
    Ok(code.clamp(0, 255) as u8)
}

/// The shell's exit code, clamped like [`exec`]'s.
pub fn enter(ctx: &Ctx, ct: &str) -> Result<u8> {
    let ctid = ctx.resolve(ct)?;
    let code = container::exec::enter(&ctx.host, ctid)?;
    Ok(code.clamp(0, 255) as u8)
}
