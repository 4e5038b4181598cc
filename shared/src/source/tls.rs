//! TLS to PostgreSQL with libpq's `sslmode` semantics, through rustls (no OpenSSL):
//! `disable`, `allow` and `prefer` (TLS when the server offers it, unverified: libpq's
//! default), `require` (TLS or nothing; unverified, unless a root certificate is given, which
//! makes it `verify-ca`, as libpq does), `verify-ca` (the chain must lead to `sslrootcert`),
//! `verify-full` (and the certificate must name the host). Client certificates with
//! `sslcert`/`sslkey`. A certificate or key is a file path or the PEM itself, inline.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::{Error, Result};

/// Makes aws-lc-rs the process's rustls provider, once. sqlx builds its TLS configurations
/// from the process default, which rustls cannot pick when, as here, both of its providers
/// are compiled in (through other crates): it would panic on the first TLS connection.
pub fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Err: another provider was installed first, which serves as well.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the connection fails rather than go without TLS.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// What tokio-postgres does about TLS: try it, insist on it, or not.
    pub fn transport(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            SslMode::Disable => T::Disable,
            // `allow` tries without TLS first; tokio-postgres cannot, and TLS first is safer.
            SslMode::Allow | SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// How the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Encrypted, but any certificate is taken (`prefer`, `require` without a root).
    None,
    /// The chain must lead to a trusted root; the name is not checked (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// The TLS settings of a PostgreSQL connection.
#[derive(Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub verification: Verification,
    roots: Vec<CertificateDer<'static>>,
    client: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("verification", &self.verification)
            .field("roots", &self.roots.len())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// A certificate, key or bundle given as a path or as the PEM itself.
pub(crate) fn pem_bytes(field: &str, value: &str) -> Result<Vec<u8>> {
    if value.contains("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    std::fs::read(value).map_err(|e| {
        Error::Spec(crate::spec::SpecError::single(
            &format!("connection_params.{field}"),
            format!("cannot read the file it names: {e}"),
        ))
    })
}

pub(crate) fn spec_error(field: &str, why: impl Into<String>) -> Error {
    Error::Spec(crate::spec::SpecError::single(
        &format!("connection_params.{field}"),
        why.into(),
    ))
}

fn certificates(field: &str, value: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = pem_bytes(field, value)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| spec_error(field, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(spec_error(field, "holds no PEM certificate"));
    }
    Ok(certs)
}

impl PgTls {
    /// From `sslmode` (default `prefer`), `sslrootcert`, `sslcert` and `sslkey`; `get` reads
    /// a parameter. Without `sslrootcert`, verification trusts the public web roots
    /// (`webpki-roots`), as libpq's `sslrootcert=system` does.
    pub fn from_params(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mode = match get("sslmode") {
            None => SslMode::Prefer,
            Some(text) => SslMode::parse(&text).ok_or_else(|| {
                spec_error(
                    "sslmode",
                    format!(
                        "{text:?} is not one of disable, allow, prefer, require, verify-ca, \
                         verify-full"
                    ),
                )
            })?,
        };
        let root = get("sslrootcert");
        let system = root.as_deref() == Some("system");
        // libpq: sslrootcert=system trusts the public roots, and only with verify-full, since
        // any of the many public CAs would otherwise vouch for any server.
        if system && mode != SslMode::VerifyFull {
            return Err(spec_error(
                "sslmode",
                "must be verify-full with sslrootcert=system: the public CAs sign certificates \
                 for anyone, so only the host name makes one this server's",
            ));
        }
        // verify-ca without a CA of the job's own would take any publicly signed certificate.
        if mode == SslMode::VerifyCa && root.is_none() {
            return Err(spec_error(
                "sslrootcert",
                "is needed with sslmode=verify-ca: without the server's CA, any certificate a \
                 public CA signed would be taken (verify-full checks the host name instead)",
            ));
        }
        let given_root = root.filter(|_| !system);
        let roots = match &given_root {
            Some(value) => certificates("sslrootcert", value)?,
            None => Vec::new(),
        };
        let verification = match mode {
            SslMode::VerifyFull => Verification::Full,
            SslMode::VerifyCa => Verification::Chain,
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
            // same as that of verify-ca".
            SslMode::Require if given_root.is_some() => Verification::Chain,
            _ => Verification::None,
        };
        let client = match (get("sslcert"), get("sslkey")) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let certs = certificates("sslcert", &cert)?;
                let key = PrivateKeyDer::from_pem_slice(&pem_bytes("sslkey", &key)?)
                    .map_err(|e| spec_error("sslkey", format!("not a PEM private key: {e}")))?;
                Some((certs, Arc::new(key)))
            }
            (Some(_), None) => return Err(spec_error("sslkey", "is needed with sslcert")),
            (None, Some(_)) => return Err(spec_error("sslcert", "is needed with sslkey")),
        };
        Ok(PgTls {
            mode,
            verification,
            roots,
            client,
        })
    }

    /// The rustls connector tokio-postgres hands its socket to.
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut store = RootCertStore::empty();
        if self.roots.is_empty() {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        } else {
            for root in &self.roots {
                store
                    .add(root.clone())
                    .map_err(|e| spec_error("sslrootcert", format!("not a usable CA: {e}")))?;
            }
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| spec_error("sslrootcert", format!("not a usable CA: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = Arc::new(ModeVerifier {
            verification: self.verification,
            webpki,
            provider: provider.clone(),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Source(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((certs, key)) => builder
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(|e| spec_error("sslcert", format!("unusable with sslkey: {e}")))?,
        };
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// Checks the server's certificate as far as the mode asks.
#[derive(Debug)]
struct ModeVerifier {
    verification: Verification,
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ModeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.verification {
            Verification::None => Ok(ServerCertVerified::assertion()),
            Verification::Full => self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            Verification::Chain => match self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                // verify-ca: the chain is what matters, not the name.
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a failed TLS handshake means, in words (PostgreSQL's and MySQL's connections both go
/// through rustls): `text` is the connection error's chain.
pub fn tls_failure(text: &str) -> Option<&'static str> {
    // rustls' words for each (its Display, with or without the context it adds).
    let causes: [(&[&str], &str); 7] = [
        (
            &["UnknownIssuer"],
            "the server's certificate is not signed by a trusted CA (sslrootcert, ssl_ca)",
        ),
        (
            &["NotValidForName", "certificate not valid for name"],
            "the server's certificate does not name this host (verify-full, VERIFY_IDENTITY)",
        ),
        (
            &["Expired", "certificate expired"],
            "the server's certificate has expired",
        ),
        (
            &["NotValidYet", "certificate not valid yet"],
            "the server's certificate is not valid yet",
        ),
        (
            &["server does not support TLS"],
            "the server does not offer TLS, which the ssl mode requires",
        ),
        (
            &[
                "PeerIncompatible",
                "peer is incompatible",
                "HandshakeFailure",
            ],
            "the server's TLS is not one rustls speaks (TLS 1.2 or 1.3 with current ciphers)",
        ),
        (
            &["invalid peer certificate"],
            "the server's certificate is not accepted",
        ),
    ];
    causes
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| text.contains(n)))
        .map(|(_, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA made with openssl for these tests only (no key kept).
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBlDCCATmgAwIBAgIUISQukf2T9DnadWVdrE1xo1CQ+bswCgYIKoZIzj0EAwIw\nHjEcMBoGA1UEAwwTc2hhcmRmbG93LXVuaXQtdGVzdDAgFw0yNjEyMDIwMzAyNDRa\nGA8yMTI2MTEwODAzMDI0NFowHjEcMBoGA1UEAwwTc2hhcmRmbG93LXVuaXQtdGVz\ndDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABA2ZLAASw7qd88zD64toudxdJUJJ\nl5pDYkFFy2GOWnkRrdWxds6qDoHr3Lm/gE87MErsvnwZ8/QWMwuIDOc2bQujUzBR\nMB0GA1UdDgQWBBQh+cpNKH0iuKpqgHn4GrcDGb80XDAfBgNVHSMEGDAWgBQh+cpN\nKH0iuKpqgHn4GrcDGb80XDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kA\nMEYCIQDG7pgJ+xnf88pfCDfBPRkJ3uiH1uawQpYibaXprYUgvQIhAIUGfCnPvvt7\nbQ3ZDQqHKVJRyXwrhMUtJctWEZhE5P9y\n-----END CERTIFICATE-----\n";

    fn tls(params: &[(&str, &str)]) -> Result<PgTls> {
        PgTls::from_params(|k| {
            params
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn modes_follow_libpq() {
        let none = tls(&[]).unwrap();
        assert_eq!(
            (none.mode, none.verification),
            (SslMode::Prefer, Verification::None)
        );
        let require = tls(&[("sslmode", "require")]).unwrap();
        assert_eq!(require.verification, Verification::None);
        assert!(require.mode.requires_tls());
        let require_root = tls(&[("sslmode", "require"), ("sslrootcert", TEST_CA)]).unwrap();
        assert_eq!(require_root.verification, Verification::Chain);
        assert!(require_root.connector().is_ok());
        let err = tls(&[("sslmode", "verify-ca")]).unwrap_err().to_string();
        assert!(
            err.contains("connection_params.sslrootcert") && err.contains("verify-ca"),
            "{err}"
        );
        let err = tls(&[("sslmode", "require"), ("sslrootcert", "system")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("must be verify-full with sslrootcert=system"),
            "{err}"
        );
        let system = tls(&[("sslmode", "verify-full"), ("sslrootcert", "system")]).unwrap();
        assert_eq!(system.verification, Verification::Full);
        let full = tls(&[("sslmode", "verify-full")]).unwrap();
        assert_eq!(full.verification, Verification::Full);
        assert!(full.connector().is_ok());
        let err = tls(&[("sslmode", "verify")]).unwrap_err().to_string();
        assert!(err.contains("\"verify\" is not one of disable"), "{err}");
        let err = tls(&[(
            "sslrootcert",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let err = tls(&[
            ("sslcert", "/nonexistent.pem"),
            ("sslkey", "/nonexistent.key"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("connection_params.sslcert") && err.contains("cannot read"),
            "{err}"
        );
        assert!(
            tls(&[("sslcert", "x")])
                .unwrap_err()
                .to_string()
                .contains("sslkey")
        );
    }

    #[test]
    fn handshake_failures_are_named() {
        assert_eq!(
            tls_failure("error performing TLS handshake: invalid peer certificate: UnknownIssuer"),
            Some("the server's certificate is not signed by a trusted CA (sslrootcert, ssl_ca)")
        );
        assert_eq!(
            tls_failure("error performing TLS handshake: server does not support TLS"),
            Some("the server does not offer TLS, which the ssl mode requires")
        );
        assert_eq!(
            tls_failure(
                "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; \
                 certificate is only valid for DnsName(\"localhost\")"
            ),
            Some("the server's certificate does not name this host (verify-full, VERIFY_IDENTITY)")
        );
        assert_eq!(tls_failure("connection refused"), None);
    }
}
