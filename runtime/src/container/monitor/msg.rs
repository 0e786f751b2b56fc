//! `MonitorMsg`: what travels on the report pipes between the monitor, init and `start`.

use std::io::{self, Read};
use std::os::fd::AsFd;

use crate::container::state::InitExit;

/// A report to `start` on the monitor's pipe: init is cloned (or could not be), then, after the
/// go-ahead, how init's first moments went: it failed before its exec, it exited, or it settled.
/// init itself sends `Failed` to the monitor on its own pipe, which its exec closes unwritten.
///
/// On the wire: a 4-byte little-endian body length, then the body: a kind byte and its payload
/// (`Started`: the PID as 4 little-endian bytes; `Failed`: UTF-8 text; `Exited`: how (0 exit
/// code, 1 signal, 2 signal with core dump), the code or signal as 4 bytes, the milliseconds
/// since exec as 4 bytes, then the console's last output as UTF-8; `Settled`: the milliseconds
/// since exec as 4 bytes and 1 byte, 1 when idle, 0 when the watch window ran out). Integers are
/// little-endian. The length lets `start` read one message without waiting for EOF: the monitor
/// keeps its pipe open for the next report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::container) enum MonitorMsg {
    /// init is cloned; its PID as the host sees it.
    Started { init_pid: i32 },
    /// The CT could not be started; what went wrong.
    Failed { error: String },
    /// init exec'd and then ended within the watch window, `after_ms` after its exec; `console`
    /// is the tail of what the CT printed on its console in this start.
    Exited {
        exit: InitExit,
        after_ms: u32,
        console: String,
    },
    /// init exec'd and is still alive: `idle` when it and every process of the CT sleep with
    /// nothing to wake them, otherwise the watch window passed.
    Settled { after_ms: u32, idle: bool },
}

const KIND_STARTED: u8 = 1;
const KIND_FAILED: u8 = 2;
const KIND_EXITED: u8 = 3;
const KIND_SETTLED: u8 = 4;
const EXIT_CODE: u8 = 0;
const EXIT_SIGNAL: u8 = 1;
const EXIT_SIGNAL_CORE: u8 = 2;
/// `Exited`'s fixed part: how, code or signal, milliseconds.
const EXITED_FIXED: usize = 1 + 4 + 4;
const HEADER: usize = 4;
/// A bound on the body so a garbage length cannot make `recv` allocate gigabytes.
const MAX_BODY: usize = 64 * 1024;

/// Why bytes on a report pipe are not a `MonitorMsg`.
#[derive(Debug, thiserror::Error)]
pub enum MonitorMsgError {
    #[error("no message: the pipe closed first")]
    Empty,
    #[error("message cut short: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("message body of {0} bytes (must be 1 to {MAX_BODY})")]
    BadLength(u32),
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("`started` message with a {0}-byte payload (must be 4)")]
    BadStarted(usize),
    #[error("init PID {0} is not a process ID")]
    BadPid(i32),
    #[error("`exited` message with a {0}-byte payload (must be at least {EXITED_FIXED})")]
    BadExited(usize),
    #[error("`exited` message with an unknown way of ending {0}")]
    BadExitHow(u8),
    #[error("`exited` message with signal {0}")]
    BadSignal(i32),
    #[error("`settled` message with a {0}-byte payload (must be 5)")]
    BadSettled(usize),
    #[error("`settled` message with idle flag {0} (must be 0 or 1)")]
    BadIdle(u8),
    #[error("text is not UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    #[error("unexpected `{0}` message")]
    Unexpected(&'static str),
    #[error("reading the pipe")]
    Read(#[source] io::Error),
}

type MsgResult<T> = std::result::Result<T, MonitorMsgError>;

/// Appends as much of `text` as fits in `room` bytes, cut at a character boundary (an overlong
/// text is cut rather than sent as a bad message).
fn push_text(body: &mut Vec<u8>, text: &str, room: usize) {
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    body.extend_from_slice(&text.as_bytes()[..end]);
}

/// The last `n` non-empty lines of console output, as a terminal would show them: carriage
/// returns and escape sequences (colours, cursor moves) dropped, other control characters
/// removed, trailing blanks trimmed, each line cut at 200 characters.
pub(in crate::container) fn console_lines(text: &str, n: usize) -> Vec<String> {
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // CSI: ESC [ parameters… final byte in @..~; other escapes: ESC and one character.
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    for p in chars.by_ref() {
                        if ('@'..='~').contains(&p) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => clean.push(c),
            c if c.is_control() => {}
            c => clean.push(c),
        }
    }
    let lines: Vec<String> = clean
        .lines()
        .map(|l| l.trim_end().chars().take(200).collect::<String>())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

impl MonitorMsg {
    /// The kind's name, for errors about a message that came at the wrong time.
    pub(in crate::container) fn kind(&self) -> &'static str {
        match self {
            MonitorMsg::Started { .. } => "started",
            MonitorMsg::Failed { .. } => "failed",
            MonitorMsg::Exited { .. } => "exited",
            MonitorMsg::Settled { .. } => "settled",
        }
    }

    pub(in crate::container) fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            MonitorMsg::Started { init_pid } => {
                body.push(KIND_STARTED);
                body.extend_from_slice(&init_pid.to_le_bytes());
            }
            MonitorMsg::Failed { error } => {
                body.push(KIND_FAILED);
                push_text(&mut body, error, MAX_BODY - 1);
            }
            MonitorMsg::Exited {
                exit,
                after_ms,
                console,
            } => {
                body.push(KIND_EXITED);
                let (how, n) = match *exit {
                    InitExit::Exited { code } => (EXIT_CODE, code),
                    InitExit::Killed {
                        signal,
                        core_dumped: false,
                    } => (EXIT_SIGNAL, signal),
                    InitExit::Killed {
                        signal,
                        core_dumped: true,
                    } => (EXIT_SIGNAL_CORE, signal),
                };
                body.push(how);
                body.extend_from_slice(&n.to_le_bytes());
                body.extend_from_slice(&after_ms.to_le_bytes());
                push_text(&mut body, console, MAX_BODY - 1 - EXITED_FIXED);
            }
            MonitorMsg::Settled { after_ms, idle } => {
                body.push(KIND_SETTLED);
                body.extend_from_slice(&after_ms.to_le_bytes());
                body.push(u8::from(*idle));
            }
        }
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes exactly one whole message.
    pub(in crate::container) fn decode(bytes: &[u8]) -> MsgResult<Self> {
        if bytes.is_empty() {
            return Err(MonitorMsgError::Empty);
        }
        let Some(header) = bytes.first_chunk::<HEADER>() else {
            return Err(MonitorMsgError::Truncated {
                got: bytes.len(),
                want: HEADER,
            });
        };
        let want = HEADER + body_len(*header)?;
        if bytes.len() < want {
            return Err(MonitorMsgError::Truncated {
                got: bytes.len(),
                want,
            });
        }
        if bytes.len() > want {
            return Err(MonitorMsgError::Trailing(bytes.len() - want));
        }
        let (kind, payload) = (bytes[HEADER], &bytes[HEADER + 1..]);
        let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(MonitorMsgError::NotUtf8)
        };
        match kind {
            KIND_STARTED => {
                let pid: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| MonitorMsgError::BadStarted(payload.len()))?;
                let init_pid = i32::from_le_bytes(pid);
                if init_pid <= 0 {
                    return Err(MonitorMsgError::BadPid(init_pid));
                }
                Ok(MonitorMsg::Started { init_pid })
            }
            KIND_FAILED => Ok(MonitorMsg::Failed {
                error: text(payload)?,
            }),
            KIND_EXITED => {
                if payload.len() < EXITED_FIXED {
                    return Err(MonitorMsgError::BadExited(payload.len()));
                }
                let n = le32(&payload[1..5]) as i32;
                let exit = match payload[0] {
                    EXIT_CODE => InitExit::Exited { code: n },
                    how @ (EXIT_SIGNAL | EXIT_SIGNAL_CORE) => {
                        if !(1..=libc::SIGRTMAX()).contains(&n) {
                            return Err(MonitorMsgError::BadSignal(n));
                        }
                        InitExit::Killed {
                            signal: n,
                            core_dumped: how == EXIT_SIGNAL_CORE,
                        }
                    }
                    how => return Err(MonitorMsgError::BadExitHow(how)),
                };
                Ok(MonitorMsg::Exited {
                    exit,
                    after_ms: le32(&payload[5..9]),
                    console: text(&payload[EXITED_FIXED..])?,
                })
            }
            KIND_SETTLED => {
                if payload.len() != 5 {
                    return Err(MonitorMsgError::BadSettled(payload.len()));
                }
                let idle = match payload[4] {
                    0 => false,
                    1 => true,
                    b => return Err(MonitorMsgError::BadIdle(b)),
                };
                Ok(MonitorMsg::Settled {
                    after_ms: le32(&payload[..4]),
                    idle,
                })
            }
            k => Err(MonitorMsgError::UnknownKind(k)),
        }
    }

    /// Reads one message: its header, then as many bytes as it announces (no more, no EOF needed).
    pub(in crate::container) fn recv(r: &mut impl Read) -> MsgResult<Self> {
        let mut buf = vec![0u8; HEADER];
        let got = read_full(r, &mut buf)?;
        if got < HEADER {
            buf.truncate(got);
            return Self::decode(&buf);
        }
        let len = body_len([buf[0], buf[1], buf[2], buf[3]])?;
        buf.resize(HEADER + len, 0);
        let got = read_full(r, &mut buf[HEADER..])?;
        buf.truncate(HEADER + got);
        Self::decode(&buf)
    }

    /// Writes the whole message to a pipe (in one write when it fits PIPE_BUF, so atomically).
    pub(in crate::container) fn send(&self, fd: impl AsFd) -> nix::Result<()> {
        let buf = self.encode();
        let mut off = 0;
        while off < buf.len() {
            match nix::unistd::write(&fd, &buf[off..]) {
                Ok(n) => off += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn body_len(header: [u8; HEADER]) -> MsgResult<usize> {
    let len = u32::from_le_bytes(header);
    match usize::try_from(len) {
        Ok(n) if (1..=MAX_BODY).contains(&n) => Ok(n),
        _ => Err(MonitorMsgError::BadLength(len)),
    }
}

/// Fills `buf` unless EOF comes first; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> MsgResult<usize> {
    let mut off = 0;
    while off < buf.len() {
        match r.read(&mut buf[off..]) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MonitorMsgError::Read(e)),
        }
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn samples() -> Vec<MonitorMsg> {
        vec![
            MonitorMsg::Started { init_pid: 1 },
            MonitorMsg::Started { init_pid: 4242 },
            MonitorMsg::Started { init_pid: i32::MAX },
            MonitorMsg::Failed {
                error: String::new(),
            },
            MonitorMsg::Failed {
                error: "exec /sbin/init inside the CT: ENOENT: No such file or directory".into(),
            },
            MonitorMsg::Failed {
                error: "ünïcødé ✓ text".into(),
            },
            MonitorMsg::Exited {
                exit: InitExit::Exited { code: 3 },
                after_ms: 0,
                console: "boom\r\nsecond ✓ line\r\n".into(),
            },
            MonitorMsg::Exited {
                exit: InitExit::Exited { code: -1 },
                after_ms: u32::MAX,
                console: String::new(),
            },
            MonitorMsg::Exited {
                exit: InitExit::Killed {
                    signal: libc::SIGSEGV,
                    core_dumped: false,
                },
                after_ms: 312,
                console: "x".into(),
            },
            MonitorMsg::Exited {
                exit: InitExit::Killed {
                    signal: libc::SIGRTMAX(),
                    core_dumped: true,
                },
                after_ms: 999,
                console: String::new(),
            },
            MonitorMsg::Settled {
                after_ms: 4,
                idle: true,
            },
            MonitorMsg::Settled {
                after_ms: 1000,
                idle: false,
            },
        ]
    }

    #[test]
    fn kinds_are_named() {
        let names: Vec<&str> = samples().iter().map(MonitorMsg::kind).collect();
        for k in ["started", "failed", "exited", "settled"] {
            assert!(names.contains(&k), "{names:?}");
        }
        assert_eq!(
            MonitorMsgError::Unexpected("settled").to_string(),
            "unexpected `settled` message"
        );
    }

    #[test]
    fn roundtrip() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(MonitorMsg::decode(&bytes).unwrap(), m);
            assert_eq!(MonitorMsg::recv(&mut bytes.as_slice()).unwrap(), m);
        }
    }

    #[test]
    fn recv_reads_one_message_at_a_time() {
        let all = samples();
        let stream: Vec<u8> = all.iter().flat_map(MonitorMsg::encode).collect();
        let mut r = stream.as_slice();
        for m in &all {
            assert_eq!(&MonitorMsg::recv(&mut r).unwrap(), m);
        }
        assert!(matches!(
            MonitorMsg::recv(&mut r),
            Err(MonitorMsgError::Empty)
        ));
    }

    #[test]
    fn roundtrip_over_a_pipe() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let m = MonitorMsg::Started { init_pid: 77 };
        m.send(&w).unwrap();
        // The writer stays open: recv must not wait for EOF.
        let mut f = fs::File::from(r);
        assert_eq!(MonitorMsg::recv(&mut f).unwrap(), m);
        drop(w);
        assert!(matches!(
            MonitorMsg::recv(&mut f),
            Err(MonitorMsgError::Empty)
        ));
    }

    #[test]
    fn overlong_error_is_cut_at_a_char_boundary() {
        let error = "é".repeat(MAX_BODY);
        let bytes = MonitorMsg::Failed {
            error: error.clone(),
        }
        .encode();
        assert!(bytes.len() <= HEADER + MAX_BODY);
        match MonitorMsg::decode(&bytes).unwrap() {
            MonitorMsg::Failed { error: got } => {
                assert!(!got.is_empty());
                assert!(error.starts_with(&got));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn overlong_console_is_cut_at_a_char_boundary() {
        let console = "✓".repeat(MAX_BODY);
        let m = MonitorMsg::Exited {
            exit: InitExit::Exited { code: 1 },
            after_ms: 7,
            console: console.clone(),
        };
        let bytes = m.encode();
        assert!(bytes.len() <= HEADER + MAX_BODY);
        match MonitorMsg::recv(&mut bytes.as_slice()).unwrap() {
            MonitorMsg::Exited {
                exit,
                after_ms,
                console: got,
            } => {
                assert_eq!((exit, after_ms), (InitExit::Exited { code: 1 }, 7));
                assert!(got.len() > MAX_BODY - 16);
                assert!(console.starts_with(&got));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn console_lines_are_what_a_terminal_shows() {
        let text =
            "one\r\n\r\n\x1b[0;1;31mFAILED\x1b[0m to mount\r\n\x1b]0;title\x07x\tx  \r\nbell\x07\n";
        assert_eq!(
            console_lines(text, 10),
            ["one", "FAILED to mount", "0;titlex\tx", "bell"]
        );
        assert_eq!(console_lines(text, 2), ["0;titlex\tx", "bell"]);
        assert!(console_lines("", 10).is_empty());
        assert!(console_lines("\r\n \n", 10).is_empty());
        let many: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let last = console_lines(&many, 10);
        assert_eq!(last.len(), 10);
        assert_eq!((last[0].as_str(), last[9].as_str()), ("line 20", "line 29"));
        let long = "é".repeat(500);
        assert_eq!(console_lines(&long, 1)[0].chars().count(), 200);
        // an escape sequence cut off at the end of the buffer
        assert_eq!(console_lines("ok\n\x1b[0;3", 10), ["ok"]);
    }

    #[test]
    fn empty_input() {
        assert!(matches!(
            MonitorMsg::decode(&[]),
            Err(MonitorMsgError::Empty)
        ));
        assert!(matches!(
            MonitorMsg::recv(&mut io::empty()),
            Err(MonitorMsgError::Empty)
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 1..bytes.len() {
                let part = &bytes[..cut];
                for res in [MonitorMsg::decode(part), MonitorMsg::recv(&mut &part[..])] {
                    match res {
                        Err(MonitorMsgError::Truncated { got, want }) => {
                            assert_eq!(got, cut);
                            assert!(want > got);
                        }
                        other => panic!("{m:?} cut at {cut}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = MonitorMsg::Started { init_pid: 5 }.encode();
        bytes.extend_from_slice(b"xy");
        assert!(matches!(
            MonitorMsg::decode(&bytes),
            Err(MonitorMsgError::Trailing(2))
        ));
    }

    #[test]
    fn bad_lengths() {
        for len in [0u32, MAX_BODY as u32 + 1, u32::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.push(KIND_FAILED);
            assert!(
                matches!(MonitorMsg::decode(&bytes), Err(MonitorMsgError::BadLength(l)) if l == len)
            );
            assert!(
                matches!(MonitorMsg::recv(&mut bytes.as_slice()), Err(MonitorMsgError::BadLength(l)) if l == len)
            );
        }
    }

    #[test]
    fn bad_bodies() {
        let frame = |body: &[u8]| {
            let mut b = (body.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(body);
            b
        };
        assert!(matches!(
            MonitorMsg::decode(&frame(&[9, 1, 2])),
            Err(MonitorMsgError::UnknownKind(9))
        ));
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_STARTED, 1, 0])),
            Err(MonitorMsgError::BadStarted(2))
        ));
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_STARTED, 1, 0, 0, 0, 0])),
            Err(MonitorMsgError::BadStarted(5))
        ));
        for pid in [0i32, -1, i32::MIN] {
            let mut body = vec![KIND_STARTED];
            body.extend_from_slice(&pid.to_le_bytes());
            assert!(
                matches!(MonitorMsg::decode(&frame(&body)), Err(MonitorMsgError::BadPid(p)) if p == pid)
            );
        }
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_FAILED, 0xff, 0xfe])),
            Err(MonitorMsgError::NotUtf8(_))
        ));

        let exited = |how: u8, n: i32, tail: &[u8]| {
            let mut body = vec![KIND_EXITED, how];
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&9u32.to_le_bytes());
            body.extend_from_slice(tail);
            frame(&body)
        };
        assert!(matches!(
            MonitorMsg::decode(&exited(EXIT_CODE, 3, b"ok")),
            Ok(MonitorMsg::Exited { exit: InitExit::Exited { code: 3 }, after_ms: 9, console }) if console == "ok"
        ));
        for short in 0..EXITED_FIXED {
            let body = &exited(EXIT_CODE, 3, b"")[HEADER..HEADER + 1 + short];
            assert!(
                matches!(MonitorMsg::decode(&frame(body)), Err(MonitorMsgError::BadExited(n)) if n == short)
            );
        }
        assert!(matches!(
            MonitorMsg::decode(&exited(3, 1, b"")),
            Err(MonitorMsgError::BadExitHow(3))
        ));
        for sig in [0, -1, libc::SIGRTMAX() + 1] {
            for how in [EXIT_SIGNAL, EXIT_SIGNAL_CORE] {
                assert!(
                    matches!(MonitorMsg::decode(&exited(how, sig, b"")), Err(MonitorMsgError::BadSignal(s)) if s == sig)
                );
            }
        }
        assert!(matches!(
            MonitorMsg::decode(&exited(EXIT_CODE, 1, &[0xc3])),
            Err(MonitorMsgError::NotUtf8(_))
        ));

        for len in [0usize, 4, 6] {
            let mut body = vec![KIND_SETTLED];
            body.resize(1 + len, 1);
            assert!(
                matches!(MonitorMsg::decode(&frame(&body)), Err(MonitorMsgError::BadSettled(n)) if n == len)
            );
        }
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_SETTLED, 1, 0, 0, 0, 2])),
            Err(MonitorMsgError::BadIdle(2))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A fixed xorshift stream: random lengths and bytes, some with a plausible header.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let n = (next() % 40) as usize;
            let mut bytes: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            if n >= HEADER && next() % 2 == 0 {
                let len = ((n - HEADER) as u32).saturating_sub((next() % 3) as u32);
                bytes[..HEADER].copy_from_slice(&len.to_le_bytes());
            }
            let _ = MonitorMsg::decode(&bytes);
            let _ = MonitorMsg::recv(&mut bytes.as_slice());
        }
    }

    #[test]
    fn errors_do_not_repeat_their_source() {
        let e = MonitorMsg::decode(&[1, 0, 0, 0, KIND_FAILED][..4]).unwrap_err();
        assert_eq!(e.to_string(), "message cut short: 4 of 5 bytes");
        let bad = [2u8, 0, 0, 0, KIND_FAILED, 0xff];
        let e = MonitorMsg::decode(&bad).unwrap_err();
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&source));
    }
}
