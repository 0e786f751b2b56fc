use super::*;

fn t(url: &str) -> (bool, String, String, String, String) {
    let t = split_url(url).unwrap();
    (t.tls, t.connect, t.authority, t.name, t.path)
}

#[test]
fn urls() {
    assert_eq!(
        t("http://127.0.0.1:8080/hook?x=1"),
        (
            false,
            "127.0.0.1:8080".into(),
            "127.0.0.1:8080".into(),
            "127.0.0.1".into(),
            "/hook?x=1".into()
        )
    );
    assert_eq!(
        t("http://panel.example"),
        (
            false,
            "panel.example:80".into(),
            "panel.example".into(),
            "panel.example".into(),
            "/".into()
        )
    );
    assert_eq!(
        t("http://[::1]:9/a"),
        (
            false,
            "[::1]:9".into(),
            "[::1]:9".into(),
            "::1".into(),
            "/a".into()
        )
    );
    assert_eq!(t("http://[::1]/").1, "[::1]:80");
    // https: port 443 by default; the certificate is checked against the bare host name.
    assert_eq!(
        t("https://panel.example?q"),
        (
            true,
            "panel.example:443".into(),
            "panel.example".into(),
            "panel.example".into(),
            "/?q".into()
        )
    );
    assert_eq!(t("https://[2001:db8::1]/h").1, "[2001:db8::1]:443");
    assert_eq!(t("https://[2001:db8::1]/h").3, "2001:db8::1");
    assert_eq!(t("https://localhost:8443/h").3, "localhost");
    assert!(split_url("ftp://x").is_none());
    assert!(split_url("https://").is_none());
}

#[test]
fn a_bad_ca_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let e = ErrorChain(
        &Client::new(Some(&missing), Duration::from_secs(1))
            .err()
            .unwrap(),
    )
    .to_string();
    assert!(e.contains("nope.pem") && e.contains("reading"), "{e}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = Client::new(Some(&empty), Duration::from_secs(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("empty.pem"), "{e}");
    Client::new(None, Duration::from_secs(1)).unwrap();
}

#[test]
fn an_unreachable_https_webhook_fails_naming_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(None, Duration::from_secs(2)).unwrap();
    let e = rt
        .block_on(post(
            &c,
            &format!("https://127.0.0.1:{port}/h"),
            "k",
            "{}".into(),
        ))
        .unwrap_err();
    let msg = ErrorChain(&e).to_string();
    assert!(
        matches!(e, DeliveryError::Connect(..)) && msg.contains(&port.to_string()),
        "{msg}"
    );
}
