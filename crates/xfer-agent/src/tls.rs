//! Mutual TLS between agents and operators, with a cluster CA.
//!
//! Every agent has a certificate signed by the cluster CA, valid for both server and
//! client use (an agent serves, and calls other agents as a client); an operator (the
//! `xfer` CLI) has a client certificate. Servers require a client certificate signed by
//! the CA, so a peer without one is refused during the handshake. All agent
//! certificates carry the DNS name [`AGENT_NAME`] (plus the node's IP address): a
//! client verifies that name and the CA signature; the node's own name is the
//! certificate's common name.
//!
//! [`issue`] writes a CA and certificates into a directory (what `xfer lab up` does);
//! a real cluster would use its own PKI and the same three files per node.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::AgentError;

/// The DNS name every agent certificate carries and every client verifies.
pub const AGENT_NAME: &str = "xfer-agent";

/// The three files a node or operator needs: the cluster CA, its certificate, its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.pem`, `dir/NAME.pem`, `dir/NAME.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// The CA, certificate and key, as PEM bytes.
    fn read(&self) -> Result<[Vec<u8>; 3], AgentError> {
        let r = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| AgentError::Tls {
                what: format!(
                    "read {} (issue certificates with `xfer lab up` or your cluster PKI)",
                    p.display()
                ),
                source: Box::new(source),
            })
        };
        Ok([r(&self.ca)?, r(&self.cert)?, r(&self.key)?])
    }

    /// Server side: our identity, and client certificates must be signed by the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, AgentError> {
        let [ca, cert, key] = self.read()?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false))
    }

    /// Client side: verify the server against the CA and [`AGENT_NAME`]; present our
    /// certificate.
    pub fn client_config(&self) -> Result<ClientTlsConfig, AgentError> {
        let [ca, cert, key] = self.read()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(AGENT_NAME))
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> AgentError + '_ {
    move |e| AgentError::Tls {
        what: what.to_string(),
        source: Box::new(e),
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|source| AgentError::WriteFile {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(text.as_bytes())
        .map_err(|source| AgentError::WriteFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a new cluster CA (`ca.pem`, `ca.key`) into `dir`, a certificate for each
/// node (`NAME.pem`, `NAME.key`, valid for [`AGENT_NAME`] and its address, server and
/// client use) and for each operator (client use only).
pub fn issue(
    dir: &Path,
    nodes: &[(String, IpAddr)],
    operators: &[String],
) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|source| AgentError::WriteFile {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate().map_err(gen_err("generate CA key"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA parameters"))?;
    ca.distinguished_name
        .push(DnType::CommonName, "xfer cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err("sign CA"))?;
    write(&dir.join("ca.pem"), &ca_cert.pem(), 0o644)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |name: &str, ip: Option<IpAddr>, server: bool| -> Result<(), AgentError> {
        let key = KeyPair::generate().map_err(gen_err("generate key"))?;
        let sans = if server {
            vec![AGENT_NAME.to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(sans).map_err(gen_err("certificate parameters"))?;
        if let Some(ip) = ip {
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(gen_err("sign certificate"))?;
        write(&dir.join(format!("{name}.pem")), &cert.pem(), 0o644)?;
        write(
            &dir.join(format!("{name}.key")),
            &key.serialize_pem(),
            0o600,
        )
    };
    for (name, ip) in nodes {
        leaf(name, Some(*ip), true)?;
    }
    for name in operators {
        leaf(name, None, false)?;
    }
    Ok(())
}
