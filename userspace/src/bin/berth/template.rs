//! template list / import / build / remove.

use anyhow::{Context, Result};
use berth_runtime::container;
use berth_runtime::template::{DebianInit, TemplateStore};
use serde_json::json;

use crate::Ctx;
use crate::cli::{BuildCmd, TemplateCmd};
use crate::table::Align;

pub fn template(ctx: &Ctx, t: TemplateCmd) -> Result<()> {
    ctx.host.ensure_dirs()?;
    let store = TemplateStore::open(ctx.host.template_dir())?;
    match t {
        TemplateCmd::List => {
            let list = store.list()?;
            ctx.print(serde_json::to_value(&list)?, || {
                let rows = list
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            format!("{:?}", t.kind).to_lowercase(),
                            berth::human::bytes(t.size),
                        ]
                    })
                    .collect();
                let headers = [
                    ("NAME", Align::Left),
                    ("KIND", Align::Left),
                    ("SIZE", Align::Right),
                ];
                print!("{}", crate::table::render(&headers, rows, true));
            });
        }
        TemplateCmd::Import { file, name } => {
            let info = store
                .import(&file, name.as_deref())
                .with_context(|| format!("import template {}", file.display()))?;
            ctx.print(serde_json::to_value(&info)?, || {
                println!("template {} imported", info.name)
            });
        }
        TemplateCmd::Build(BuildCmd::Busybox { name }) => {
            let info = store.build_busybox(&name)?;
            ctx.print(serde_json::to_value(&info)?, || {
                println!("template {} built", info.name)
            });
        }
        TemplateCmd::Build(BuildCmd::Debian {
            suite,
            name,
            mirror,
            init,
        }) => {
            let init: DebianInit = init.parse()?;
            let name = name.unwrap_or_else(|| format!("debian-{suite}"));
            let info = store.build_debian(&suite, &name, mirror.as_deref(), init)?;
            ctx.print(serde_json::to_value(&info)?, || {
                println!("template {} built", info.name)
            });
        }
        TemplateCmd::Remove { name } => {
            container::remove_template(&ctx.host, &name)?;
            ctx.print(json!({"removed": name}), || {
                println!("template {name} removed")
            });
        }
    }
    Ok(())
}
