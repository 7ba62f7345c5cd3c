//! NBD over TLS (NBD_OPT_STARTTLS) with real clients: libnbd's `nbds://` (GnuTLS) and qemu's
//! tls-creds-x509. Certificates are made with the `openssl` command: a CA, a server certificate
//! for 127.0.0.1, and a client certificate signed by the CA.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockferry_tests::{create_volume, require_tool, run, run_ok, tempdir, AgentConfig};

const LIMIT: Duration = Duration::from_secs(60);

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args), LIMIT);
}

/// Makes, in `dir`, the files GnuTLS and qemu look for: ca-cert.pem, server-cert.pem,
/// server-key.pem, client-cert.pem, client-key.pem (X.509 v3, P-256).
fn make_pki(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=bf-test-ca",
    ]);
    openssl(dir, &ca);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        let (key, csr, cert, ext) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
            format!("{who}.ext"),
        );
        let subj = format!("/CN=bf-test-{who}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[test]
fn tls_with_real_clients_and_client_certificates() {
    for tool in ["openssl", "nbdinfo", "qemu-io"] {
        require_tool(tool);
    }
    let tmp = tempdir();
    let pki = tmp.path().join("pki");
    let no_client_cert = tmp.path().join("pki-ca-only");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::create_dir_all(&no_client_cert).unwrap();
    make_pki(&pki);
    std::fs::copy(pki.join("ca-cert.pem"), no_client_cert.join("ca-cert.pem")).unwrap();
    let vol = tmp.path().join("sec");
    create_volume(&vol, "64M", &[]);

    let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
    let mut config = AgentConfig::new(&vol);
    config.extra = vec![
        "--tls-cert".into(),
        p("server-cert.pem"),
        "--tls-key".into(),
        p("server-key.pem"),
        "--tls-client-ca".into(),
        p("ca-cert.pem"),
        "--tls".into(),
        "required".into(),
    ];
    let agent = config.start(&tmp.path().join("agent.log"));
    let tls_uri =
        |dir: &Path| format!("nbds://{}/sec?tls-certificates={}", agent.addr, dir.display());

    // A client with a certificate signed by the CA: TLS is negotiated and the export served.
    let ok = run_ok(Command::new("nbdinfo").arg(tls_uri(&pki)), LIMIT);
    assert!(ok.stdout.contains("with TLS"), "{ok}");
    assert!(ok.stdout.contains("export-size: 67108864"), "{ok}");

    // The same CA but no client certificate: refused.
    let no_cert = run(Command::new("nbdinfo").arg(tls_uri(&no_client_cert)), LIMIT);
    assert!(!no_cert.success(), "a client without a certificate was served:\n{no_cert}");

    // Plain text to a TLS-required export: refused (NBD_REP_ERR_TLS_REQD), never served.
    let plain = run(Command::new("nbdinfo").arg(agent.uri("sec")), LIMIT);
    assert!(!plain.success(), "a plain-text client was served:\n{plain}");

    // qemu's TLS client writes and reads back a pattern.
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=sec,tls-creds=tls0",
        agent.port()
    );
    let creds = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.display());
    let io = run_ok(
        Command::new("qemu-io").args(["--object", &creds, "--image-opts"]).args([
            "-c",
            "write -P 0x3c 4096 1M",
            "-c",
            "read -P 0x3c 4096 1M",
            &opts,
        ]),
        LIMIT,
    );
    assert!(!io.both().contains("Pattern verification failed"), "{io}");
    let image = std::fs::read(vol.join("image.raw")).unwrap();
    assert!(
        image[4096..4096 + (1 << 20)].iter().all(|&b| b == 0x3c),
        "the TLS write reached the image"
    );
    agent.stop();
}
