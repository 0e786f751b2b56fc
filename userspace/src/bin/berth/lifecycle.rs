//! create, start, stop, restart, destroy, mount, umount, suspend, resume, exec and enter.

use anyhow::Result;
use berth_runtime::Ctid;
use berth_runtime::container::{self, CreateOpts, CtError};
use serde_json::json;

use crate::Ctx;
use crate::cli::CreateArgs;

pub fn create(ctx: &Ctx, a: CreateArgs) -> Result<()> {
    let ctid: Ctid = a.ctid.parse()?;
    let billing = crate::set::billing_flags(&a.billing)?.merge(&Default::default())?;
    let quota = crate::quota::quota_flags(&a.quota)?.merge(&Default::default())?;
    container::create(
        &ctx.host,
        ctid,
        &CreateOpts {
            template: a.template,
            hostname: a.hostname,
            name: a.name,
            privileged: a.privileged,
            copy: a.copy,
            ipadd: a.ipadd,
            billing,
            quota,
            ..Default::default()
        },
    )?;
    if a.privileged {
        eprintln!(
            "berth: warning: CT {ctid} is privileged: its root is root on the host. Privileged CTs are for trusted workloads only."
        );
    }
    ctx.print(
        json!({"ctid": ctid, "created": true, "privileged": a.privileged}),
        || println!("CT {ctid} created"),
    );
    Ok(())
}

/// Starting a running CT succeeds with a notice (vzctl returns 0 there too), so a panel
/// can repeat a start safely.
pub fn start(ctx: &mut Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    match container::start(&ctx.host, ctid, &mut ctx.hooks) {
        Ok(st) => ctx.print(
            json!({"ctid": ctid, "status": "running", "changed": true, "init_pid": st.init_pid}),
            || println!("CT {ctid} started (init PID {})", st.init_pid),
        ),
        Err(CtError::AlreadyRunning(_)) => {
            ctx.notice(format_args!("CT {ctid} is already running"));
            let st = container::status(&ctx.host, ctid)?;
            ctx.print(
                json!({"ctid": ctid, "status": st.state, "changed": false, "init_pid": st.init_pid}),
                || {},
            );
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Stopping a stopped CT succeeds with a notice, as with vzctl; the stop still cleans up
/// what a crash may have left.
pub fn stop(ctx: &mut Ctx, ct: &str, fast: bool) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    let changed = match container::stop(&ctx.host, ctid, fast, &mut ctx.hooks) {
        Ok(()) => true,
        Err(CtError::NotRunning(_)) => {
            ctx.notice(format_args!("CT {ctid} is not running"));
            false
        }
        Err(e) => return Err(e.into()),
    };
    ctx.print(
        json!({"ctid": ctid, "status": "stopped", "changed": changed, "stopped": true}),
        || {
            if changed {
                println!("CT {ctid} stopped")
            }
        },
    );
    Ok(())
}

pub fn restart(ctx: &mut Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    let st = container::restart(&ctx.host, ctid, &mut ctx.hooks)?;
    ctx.print(
        json!({"ctid": ctid, "status": "running", "init_pid": st.init_pid}),
        || println!("CT {ctid} restarted (init PID {})", st.init_pid),
    );
    Ok(())
}

pub fn destroy(ctx: &mut Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::destroy(&ctx.host, ctid, &mut ctx.hooks)?;
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
    ctx.print(json!({"ctid": ctid, "status": "suspended"}), || {
        println!("CT {ctid} suspended")
    });
    Ok(())
}

pub fn resume(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    container::resume(&ctx.host, ctid)?;
    ctx.print(json!({"ctid": ctid, "status": "running"}), || {
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
