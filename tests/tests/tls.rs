//! Agents authenticate each other and operators with mutual TLS (cluster CA):
//! a peer without a valid certificate is refused.

use xfer_agent::client::Client;
use xfer_agent::tls::{issue, TlsFiles};
use xfer_tests::{chain, TestLab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_cluster_certificate_are_refused() {
    let lab = TestLab::up("tct", 1).await;
    let h1 = lab.lab.host("h1").expect("h1");
    // The operator's certificate works.
    let c = Client::connect(&h1.endpoint, Some(&lab.lab.operator_tls()))
        .await
        .unwrap_or_else(|e| panic!("operator: {}", chain(&e)));
    assert_eq!(c.hello().node, "h1");

    // No certificate at all: refused before anything is sent.
    let none = Client::connect(&h1.endpoint, None)
        .await
        .expect_err("no TLS");
    assert!(chain(&none).contains("needs TLS"), "{}", chain(&none));
    let plain = Client::connect(&h1.endpoint.replace("https", "http"), None)
        .await
        .expect_err("plaintext to a TLS port");
    eprintln!("plaintext: {}", chain(&plain));

    // A certificate of another CA (same names, same address): refused by the handshake.
    let rogue = tempfile::tempdir().expect("tmp");
    issue(
        rogue.path(),
        &[("h1".into(), h1.address.into())],
        &["operator".into()],
    )
    .expect("issue rogue");
    let err = Client::connect(
        &h1.endpoint,
        Some(&TlsFiles::in_dir(rogue.path(), "operator")),
    )
    .await
    .expect_err("a certificate of another CA must be refused");
    eprintln!("rogue CA: {}", chain(&err));

    // A client certificate of the right CA but the server checked against another CA:
    // the client refuses the server too (mutual).
    let mixed = TlsFiles {
        ca: rogue.path().join("ca.pem"),
        ..lab.lab.operator_tls()
    };
    Client::connect(&h1.endpoint, Some(&mixed))
        .await
        .expect_err("server not signed by the CA the client trusts");
}
