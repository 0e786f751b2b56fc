//! State-changing requests run in a worker process: berthd re-executes itself with
//! [`WORKER_ARG`], writes one [`WorkerRequest`] on its stdin and reads one [`WorkerReply`]
//! from its stdout. The worker calls the library functions `berth`'s verbs call, in a fresh
//! single-threaded process — `start` forks the CT's monitor, which keeps running Rust code,
//! and a fork of the multi-threaded daemon could inherit a lock held by another thread. A
//! failed or crashed operation also cannot take the daemon down.

use std::io::{Read, Write};
use std::path::PathBuf;

use berth_runtime::Ctid;
use berth_runtime::config::Host;
use berth_runtime::container::{self, CtError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::body::{CreateBody, PatchBody};
use super::error::ApiError;
use crate::exit_codes::ErrorCode;
use crate::lifecycle_hooks::DatapathHooks;

/// argv[1] that makes berthd a worker.
pub const WORKER_ARG: &str = "--api-worker";

/// The largest request a worker reads (bodies are bounded far below it by the router).
const MAX_REQUEST: u64 = 1 << 20;

/// What an operation does, with its CT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    Create { body: Box<CreateBody> },
    Set { ctid: Ctid, body: Box<PatchBody> },
    Start { ctid: Ctid },
    Stop { ctid: Ctid, fast: bool },
    Restart { ctid: Ctid },
    Suspend { ctid: Ctid },
    Resume { ctid: Ctid },
    Destroy { ctid: Ctid },
}

impl Op {
    pub fn ctid(&self) -> Option<Ctid> {
        match self {
            Op::Create { body } => Ctid::new(body.ctid).ok(),
            Op::Set { ctid, .. }
            | Op::Start { ctid }
            | Op::Stop { ctid, .. }
            | Op::Restart { ctid }
            | Op::Suspend { ctid }
            | Op::Resume { ctid }
            | Op::Destroy { ctid } => Some(*ctid),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Set { .. } => "set",
            Op::Start { .. } => "start",
            Op::Stop { .. } => "stop",
            Op::Restart { .. } => "restart",
            Op::Suspend { .. } => "suspend",
            Op::Resume { .. } => "resume",
            Op::Destroy { .. } => "destroy",
        }
    }
}

/// The installation the worker acts on: berthd's own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRequest {
    pub root: PathBuf,
    pub run: PathBuf,
    pub cgroup_parent: String,
    pub bpffs: PathBuf,
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerReply {
    /// The result object, as the CLI's `--json` prints it.
    Ok(Value),
    Err(ApiError),
}

/// The worker's `main`: one request from stdin, one reply on stdout. The exit code is 0
/// whenever a reply was written (the reply says whether the operation failed).
pub fn worker_main() -> u8 {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().take(MAX_REQUEST).read_to_end(&mut input) {
        eprintln!("berthd worker: reading the request: {e}");
        return 2;
    }
    let reply = match serde_json::from_slice::<WorkerRequest>(&input) {
        Ok(req) => match run(&req) {
            Ok(v) => WorkerReply::Ok(v),
            Err(e) => WorkerReply::Err(e),
        },
        Err(e) => WorkerReply::Err(ApiError::internal(format!("bad worker request: {e}"))),
    };
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, &reply)
        .map_err(std::io::Error::from)
        .and_then(|()| out.flush());
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("berthd worker: writing the reply: {e}");
            2
        }
    }
}

fn lib(e: CtError) -> ApiError {
    ApiError::of(&e)
}

/// One operation through the library, answered like the CLI's `--json`.
pub fn run(req: &WorkerRequest) -> Result<Value, ApiError> {
    let host = Host::new(
        Some(req.root.clone()),
        Some(req.run.clone()),
        Some(req.cgroup_parent.clone()),
    )
    .map_err(|e| ApiError::of(&e))?;
    let mut hooks = DatapathHooks::new(Some(req.bpffs.clone()));
    let bad = |e: super::body::BodyError| ApiError::coded(e.0, ErrorCode::InvalidValue);
    Ok(match &req.op {
        Op::Create { body } => {
            let ctid = body.ctid().map_err(bad)?;
            let opts = body.opts().map_err(bad)?;
            container::create(&host, ctid, &opts).map_err(lib)?;
            json!({"ctid": ctid, "created": true, "privileged": body.privileged})
        }
        Op::Set { ctid, body } => {
            let opts = body.opts(*ctid).map_err(bad)?;
            container::set(&host, *ctid, &opts, body.save(), &mut hooks).map_err(lib)?;
            json!({"ctid": ctid, "saved": body.save()})
        }
        // Starting a running CT and stopping a stopped one succeed unchanged, as with the CLI.
        Op::Start { ctid } => match container::start(&host, *ctid, &mut hooks) {
            Ok(st) => {
                json!({"ctid": ctid, "status": "running", "changed": true, "init_pid": st.init_pid})
            }
            Err(CtError::AlreadyRunning(_)) => {
                let st = container::status(&host, *ctid).map_err(lib)?;
                json!({"ctid": ctid, "status": st.state, "changed": false, "init_pid": st.init_pid})
            }
            Err(e) => return Err(lib(e)),
        },
        Op::Stop { ctid, fast } => {
            let changed = match container::stop(&host, *ctid, *fast, &mut hooks) {
                Ok(()) => true,
                Err(CtError::NotRunning(_)) => false,
                Err(e) => return Err(lib(e)),
            };
            json!({"ctid": ctid, "status": "stopped", "changed": changed, "stopped": true})
        }
        Op::Restart { ctid } => {
            let st = container::restart(&host, *ctid, &mut hooks).map_err(lib)?;
            json!({"ctid": ctid, "status": "running", "init_pid": st.init_pid})
        }
        Op::Suspend { ctid } => {
            container::suspend(&host, *ctid).map_err(lib)?;
            json!({"ctid": ctid, "status": "suspended"})
        }
        Op::Resume { ctid } => {
            container::resume(&host, *ctid).map_err(lib)?;
            json!({"ctid": ctid, "status": "running"})
        }
        Op::Destroy { ctid } => {
            container::destroy(&host, *ctid, &mut hooks).map_err(lib)?;
            json!({"ctid": ctid, "destroyed": true})
        }
    })
}

/// Runs `op` in a worker process of `exe` (berthd itself).
pub async fn spawn(exe: &std::path::Path, req: &WorkerRequest) -> Result<Value, ApiError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let input = serde_json::to_vec(req).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut child = tokio::process::Command::new(exe)
        .arg(WORKER_ARG)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| ApiError::internal(format!("starting the worker {}: {e}", exe.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    stdin
        .write_all(&input)
        .await
        .map_err(|e| ApiError::internal(format!("writing to the worker: {e}")))?;
    drop(stdin);
    let mut out = Vec::new();
    let read = stdout.read_to_end(&mut out).await;
    let status = child
        .wait()
        .await
        .map_err(|e| ApiError::internal(format!("waiting for the worker: {e}")))?;
    read.map_err(|e| ApiError::internal(format!("reading the worker's reply: {e}")))?;
    match serde_json::from_slice::<WorkerReply>(&out) {
        Ok(WorkerReply::Ok(v)) => Ok(v),
        Ok(WorkerReply::Err(mut e)) => {
            // The status is not serialized: derive it from the code again.
            e.status = code_status(&e.code);
            Err(e)
        }
        Err(_) => Err(ApiError::internal(format!(
            "the {} worker ended ({status}) without a reply",
            req.op.name()
        ))),
    }
}

fn code_status(code: &str) -> u16 {
    crate::exit_codes::TABLE
        .iter()
        .find(|(c, ..)| c.as_str() == code)
        .map_or(500, |(c, ..)| super::error::status_of(*c).as_u16())
}
