//! PEM, read one way everywhere: with `rustls-pki-types`' decoder, the one
//! rustls itself uses, so what machined serves, what osctl presents and
//! what validation accepts are parsed by the same code.
//!
//! Blocks of kinds the decoder does not know (`PGP ...`, `EC PARAMETERS`)
//! are skipped; text between blocks is ignored.

use rustls_pki_types::pem::{PemObject, SectionKind};
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why PEM text gave no usable certificate or key.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("no PEM private key found")]
    NoKey,
    #[error("found a {found} block, expected {expected}")]
    Unexpected {
        found: &'static str,
        expected: &'static str,
    },
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

impl From<rustls_pki_types::pem::Error> for PemError {
    fn from(e: rustls_pki_types::pem::Error) -> Self {
        PemError::Malformed(e.to_string())
    }
}

/// The label of a block kind, as it appears after `-----BEGIN `.
pub fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        _ => "non-certificate",
    }
}

/// Every block of `pem`, in order, with its kind.
pub fn blocks(pem: impl AsRef<[u8]>) -> Result<Vec<(SectionKind, Vec<u8>)>, PemError> {
    Ok(<(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_ref()).collect::<Result<Vec<_>, _>>()?)
}

/// Every certificate of `pem`, in order (other blocks are ignored); at
/// least one.
pub fn certs_from_pem(pem: impl AsRef<[u8]>) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_ref()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// Certificates and nothing else (a trust bundle, a `crt` field): every
/// block must be a certificate; at least one.
pub fn only_certs_from_pem(
    pem: impl AsRef<[u8]>,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut certs = Vec::new();
    for (kind, der) in blocks(pem)? {
        if kind != SectionKind::Certificate {
            return Err(PemError::Unexpected {
                found: label(kind),
                expected: "CERTIFICATE",
            });
        }
        certs.push(CertificateDer::from(der));
    }
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// The first block of `pem`, which must be a certificate.
pub fn first_cert_der(pem: impl AsRef<[u8]>) -> Result<CertificateDer<'static>, PemError> {
    match blocks(pem)?.into_iter().next() {
        None => Err(PemError::NoCertificate),
        Some((SectionKind::Certificate, der)) => Ok(CertificateDer::from(der)),
        Some((kind, _)) => Err(PemError::Unexpected {
            found: label(kind),
            expected: "CERTIFICATE",
        }),
    }
}

/// The first private key of `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: impl AsRef<[u8]>) -> Result<PrivateKeyDer<'static>, PemError> {
    match PrivateKeyDer::from_pem_slice(pem.as_ref()) {
        Ok(k) => Ok(k),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(PemError::NoKey),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, LeafSpec, Usage};

    #[test]
    fn reads_certificates_and_keys() {
        let ca = CertificateAuthority::generate("t").unwrap();
        let leaf = ca.issue(&LeafSpec::new("l", Usage::Server)).unwrap();
        let chain = format!("{}{}", leaf.cert_pem, ca.cert_pem());
        let certs = certs_from_pem(&chain).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(first_cert_der(&chain).unwrap(), certs[0]);
        assert_eq!(only_certs_from_pem(&chain).unwrap(), certs);
        assert!(matches!(
            key_from_pem(&leaf.key_pem).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));

        // A key and a certificate together: certs_from_pem takes the
        // certificate, the strict readers refuse the key.
        let both = format!("{}{}", leaf.key_pem, leaf.cert_pem);
        assert_eq!(certs_from_pem(&both).unwrap().len(), 1);
        assert!(key_from_pem(&both).is_ok());
        let e = first_cert_der(&both).unwrap_err().to_string();
        assert_eq!(e, "found a PRIVATE KEY block, expected CERTIFICATE");
        assert!(only_certs_from_pem(&both).is_err());
    }

    #[test]
    fn says_what_is_missing_or_malformed() {
        assert!(matches!(
            certs_from_pem("hello"),
            Err(PemError::NoCertificate)
        ));
        assert!(matches!(first_cert_der(""), Err(PemError::NoCertificate)));
        assert!(matches!(key_from_pem("hello"), Err(PemError::NoKey)));
        let truncated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(
            certs_from_pem(truncated),
            Err(PemError::Malformed(_))
        ));
        let bad_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            first_cert_der(bad_base64),
            Err(PemError::Malformed(_))
        ));
        // Blocks of unknown kinds are skipped.
        let pgp = "-----BEGIN PGP SIGNATURE-----\nAAAA\n-----END PGP SIGNATURE-----\n";
        assert!(matches!(certs_from_pem(pgp), Err(PemError::NoCertificate)));
    }
}
