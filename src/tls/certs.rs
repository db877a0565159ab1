//! The operator CA and the leaf certificates minted from it: loading and
//! checking the CA (PEM files), `ca generate`, and a bounded per-name leaf
//! cache.
//!
//! Every leaf shares one key pair made at start-up (P-256): minting is then
//! one signature, not a key generation, and the key never leaves memory.
//! Leaves are backdated an hour (guest clocks drift) and valid for
//! `tls.leaf-validity-days`; a cached leaf is re-minted when it has less
//! than a day left.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// Errors loading or using the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written (the cause is the source, so
    /// an error chain names it once).
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file's contents are not what they should be.
    #[error("{path}: {message}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Minting a leaf failed.
    #[error("cannot mint a certificate for {name:?}: {message}")]
    Mint {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn bad(path: &Path, message: impl std::fmt::Display) -> CaError {
    CaError::Bad {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

struct Cached {
    key: Arc<CertifiedKey>,
    expires: time::OffsetDateTime,
}

#[derive(Default)]
struct Cache {
    by_name: HashMap<String, Cached>,
    order: VecDeque<String>,
}

/// The CA that signs leaves, and the leaf cache.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    validity: time::Duration,
    max: usize,
    cache: Mutex<Cache>,
}

impl Authority {
    /// Loads the CA from PEM files and checks that it is a CA whose key
    /// matches its certificate.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        validity_days: u32,
        max: usize,
    ) -> Result<Self, CaError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key_path, e))?;
        let ca_der = pem_certs(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| bad(cert_path, "no CERTIFICATE block"))?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| bad(cert_path, e))?;
        if !issuer.key_usages().is_empty()
            && !issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign)
        {
            return Err(bad(cert_path, "the certificate may not sign certificates"));
        }
        let leaf_key = KeyPair::generate().map_err(|e| bad(key_path, e))?;
        let authority = Self::with(issuer, ca_der, leaf_key, validity_days, max)?;
        // A key that does not belong to the certificate would mint leaves
        // no guest accepts: catch it now, not at the first connection.
        authority.check_pair().map_err(|m| {
            bad(
                key_path,
                format!("does not match {}: {m}", cert_path.display()),
            )
        })?;
        Ok(authority)
    }

    fn with(
        issuer: Issuer<'static, KeyPair>,
        ca_der: CertificateDer<'static>,
        leaf_key: KeyPair,
        validity_days: u32,
        max: usize,
    ) -> Result<Self, CaError> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer =
            rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| CaError::Mint {
                name: "-".into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            issuer,
            ca_der,
            leaf_key,
            leaf_signer,
            validity: time::Duration::days(i64::from(validity_days)),
            max: max.max(1),
            cache: Mutex::default(),
        })
    }

    /// Mints a throwaway leaf and verifies it against the CA certificate.
    fn check_pair(&self) -> Result<(), String> {
        let leaf = self.mint("check.invalid").map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).map_err(|e| e.to_string())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let end = leaf.cert.first().ok_or("no leaf")?;
        let name =
            rustls::pki_types::ServerName::try_from("check.invalid").map_err(|e| e.to_string())?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(end, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The leaf for `name` (a DNS name or an IP address), from the cache or
    /// minted now.
    pub fn leaf(&self, name: &str) -> Result<(Arc<CertifiedKey>, bool), CaError> {
        let now = time::OffsetDateTime::now_utc();
        {
            let cache = self.lock();
            if let Some(c) = cache.by_name.get(name)
                && c.expires - now > time::Duration::days(1).min(self.validity / 2)
            {
                return Ok((c.key.clone(), false));
            }
        }
        let key = Arc::new(self.mint(name)?);
        let mut cache = self.lock();
        let fresh = cache
            .by_name
            .insert(
                name.to_owned(),
                Cached {
                    key: key.clone(),
                    expires: now + self.validity,
                },
            )
            .is_none();
        if fresh {
            cache.order.push_back(name.to_owned());
        }
        while cache.by_name.len() > self.max {
            let Some(oldest) = cache.order.pop_front() else {
                break;
            };
            cache.by_name.remove(&oldest);
        }
        Ok((key, true))
    }

    /// Leaves cached now.
    pub fn cached(&self) -> usize {
        self.lock().by_name.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let fail = |e: rcgen::Error| CaError::Mint {
            name: name.to_owned(),
            message: e.to_string(),
        };
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(fail)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + self.validity;
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(fail)?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.ca_der.clone()],
            self.leaf_signer.clone(),
        ))
    }
}

/// A serial number nobody can predict (RFC 5280: positive, at most 20
/// bytes): std's random hash keys, hashed over the clock.
fn random_serial() -> rcgen::SerialNumber {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = Vec::with_capacity(16);
    for i in 0..2u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        bytes.extend_from_slice(&h.finish().to_be_bytes());
    }
    if let Some(b) = bytes.first_mut() {
        *b &= 0x7f;
    }
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The CERTIFICATE blocks of a PEM text.
pub fn pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(text.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// Reads a PEM file of CA certificates (for `upstream-ca-file`).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = pem_certs(&read(path)?);
    if certs.is_empty() {
        return Err(bad(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Writes a new CA into `dir`: `ca.pem` (certificate, 0644) and `ca.key`
/// (private key, 0600, never overwritten). Returns both paths.
pub fn generate(dir: &Path, common_name: &str, days: u32) -> Result<(PathBuf, PathBuf), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let key = KeyPair::generate().map_err(|e| bad(&key_path, e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "vhost-gateway");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(|e| bad(&cert_path, e))?;
    // The key first, exclusively: an existing CA is never replaced.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    file.write_all(key.serialize_pem().as_bytes())
        .map_err(io(&key_path))?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when dropped.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("vg-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn authority(max: usize) -> (TempDir, Authority) {
        let dir = TempDir::new("ca");
        let (cert, key) = generate(&dir.0, "test CA", 30).unwrap();
        let a = Authority::load(&cert, &key, 7, max).unwrap();
        (dir, a)
    }

    #[test]
    fn generated_ca_loads_and_key_file_is_private() {
        let (dir, _) = authority(4);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.0.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Never overwritten.
        assert!(generate(&dir.0, "again", 30).is_err());
    }

    #[test]
    fn leaves_are_cached_per_name_and_bounded() {
        let (_dir, a) = authority(2);
        let (first, minted) = a.leaf("a.test").unwrap();
        assert!(minted);
        let (again, minted) = a.leaf("a.test").unwrap();
        assert!(!minted);
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.cert.len(), 2, "leaf and CA");
        a.leaf("b.test").unwrap();
        a.leaf("192.0.2.1").unwrap();
        assert_eq!(a.cached(), 2);
        let (_, minted) = a.leaf("a.test").unwrap();
        assert!(minted, "the oldest was evicted");
    }

    #[test]
    fn a_key_from_another_ca_is_rejected() {
        let one = TempDir::new("ca1");
        let two = TempDir::new("ca2");
        let (cert, _) = generate(&one.0, "one", 30).unwrap();
        let (_, key) = generate(&two.0, "two", 30).unwrap();
        let err = Authority::load(&cert, &key, 7, 4).err().unwrap();
        assert!(err.to_string().contains("does not match"), "{err}");
        let err = Authority::load(&key, &key, 7, 4).err().unwrap();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    }
}
