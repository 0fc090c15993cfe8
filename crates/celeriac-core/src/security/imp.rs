//! [`Security`]: keys, certificates and RSA-PSS through the `openssl` crate.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Signer, Verifier};
use openssl::x509::X509;

use super::{BodySigner, Packed, pack, unpack};
use crate::config::{Config, Password};
use crate::error::{Error, ErrorKind, Result};
use crate::protocol::ContentType;

/// Where the key, the certificates and the digest come from: Celery's `security_*` settings.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SecuritySettings {
    /// PEM file of this app's RSA private key (`security_key`).
    pub key: PathBuf,
    /// The key's passphrase, when it is encrypted (`security_key_password`).
    pub key_password: Option<Password>,
    /// PEM file of the certificate that goes with the key (`security_certificate`).
    pub certificate: PathBuf,
    /// The trusted certificates (`security_cert_store`): a directory (every file in it is a
    /// PEM certificate) or a pattern whose last part may hold `*` and `?`
    /// (`/etc/celery/certs/*.pem`).
    pub cert_store: String,
    /// The digest name: `sha256` (default), `sha384`, `sha512` or `sha224`.
    pub digest: String,
}

impl SecuritySettings {
    /// The settings named in `config`; fails when a required one is missing.
    pub fn from_config(config: &Config) -> Result<Self> {
        let need = |v: &Option<String>, name: &str| {
            v.clone().ok_or_else(|| {
                Error::config(format!(
                    "serializer \"auth\" needs {name} (see docs/SECURITY.md)"
                ))
            })
        };
        Ok(SecuritySettings {
            key: need(&config.security_key, "security_key")?.into(),
            key_password: config.security_key_password.clone(),
            certificate: need(&config.security_certificate, "security_certificate")?.into(),
            cert_store: need(&config.security_cert_store, "security_cert_store")?,
            digest: config.security_digest.clone(),
        })
    }
}

/// Signs and verifies message bodies as Celery's `auth` serializer does (feature `security`).
///
/// Built once at start-up by [`Security::load`], which checks everything it can: the key and
/// certificates are readable RSA ones, the key matches its certificate, no certificate has
/// expired, no two certificates in the store share an id.
///
/// ```no_run
/// # fn main() -> celeriac_core::Result<()> {
/// use celeriac_core::security::{BodySigner, Security, SecuritySettings};
/// let mut settings = SecuritySettings::default();
/// settings.key = "/etc/celery/worker.key".into();
/// settings.certificate = "/etc/celery/worker.pem".into();
/// settings.cert_store = "/etc/celery/certs".into();
/// settings.digest = "sha256".into();
/// let security = Security::load(&settings)?;
/// # let _ = &security as &dyn BodySigner;
/// # Ok(()) }
/// ```
pub struct Security {
    key: PKey<Private>,
    id: String,
    digest: MessageDigest,
    digest_name: String,
    store: HashMap<String, Trusted>,
}

struct Trusted {
    key: PKey<Public>,
    cert: X509,
    file: PathBuf,
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Security")
            .field("signer", &self.id)
            .field("digest", &self.digest_name)
            .field("trusted", &self.store.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn security(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Security, message)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::config(format!("cannot read {what} {}", path.display())).with_source(e))
}

/// The digest named `name`, from the SHA-2 family.
fn digest_named(name: &str) -> Result<MessageDigest> {
    match name.to_ascii_lowercase().replace('-', "").as_str() {
        "sha224" => Ok(MessageDigest::sha224()),
        "sha256" => Ok(MessageDigest::sha256()),
        "sha384" => Ok(MessageDigest::sha384()),
        "sha512" => Ok(MessageDigest::sha512()),
        _ => Err(Error::config(format!(
            "unknown security_digest {name:?} (known: sha224, sha256, sha384, sha512)"
        ))),
    }
}

/// Reads an RSA certificate, naming `path` in every error.
fn certificate(path: &Path, what: &str) -> Result<X509> {
    let pem = read(path, what)?;
    let cert = X509::from_pem(&pem).map_err(|e| {
        Error::config(format!(
            "{what} {} is not a PEM certificate",
            path.display()
        ))
        .with_source(e)
    })?;
    let key = cert.public_key().map_err(|e| {
        Error::config(format!(
            "{what} {} has no readable public key",
            path.display()
        ))
        .with_source(e)
    })?;
    if key.id() != Id::RSA {
        return Err(Error::config(format!(
            "{what} {} does not hold an RSA key (only RSA is supported, as in Celery)",
            path.display()
        )));
    }
    Ok(cert)
}

/// `cert`'s signer id (see [`super::signer_id`]).
pub(crate) fn id_of(cert: &X509) -> Result<String> {
    let mut values = Vec::new();
    for entry in cert.issuer_name().entries() {
        let v = entry
            .data()
            .to_string()
            .map_err(|e| Error::config("a certificate issuer value is not text").with_source(e))?;
        values.push(v);
    }
    let serial = cert
        .serial_number()
        .to_bn()
        .and_then(|b| b.to_dec_str())
        .map_err(|e| Error::config("cannot read a certificate serial number").with_source(e))?;
    Ok(super::signer_id(values.iter().map(String::as_str), &serial))
}

/// Whether `cert` is past its end date.
fn expired(cert: &X509) -> Result<bool> {
    let now = Asn1Time::days_from_now(0)
        .map_err(|e| Error::config("cannot read the clock").with_source(e))?;
    let order = cert
        .not_after()
        .compare(&now)
        .map_err(|e| Error::config("cannot read a certificate end date").with_source(e))?;
    Ok(order == Ordering::Less)
}

/// The files a `security_cert_store` value names, sorted.
fn store_files(store: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(store);
    let listing = |dir: &Path| {
        std::fs::read_dir(dir).map_err(|e| {
            Error::config(format!(
                "cannot read security_cert_store directory {}",
                dir.display()
            ))
            .with_source(e)
        })
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in listing(path)? {
            let entry = entry.map_err(|e| {
                Error::config(format!("cannot read security_cert_store {store}")).with_source(e)
            })?;
            if entry.path().is_file() {
                files.push(entry.path());
            }
        }
    } else if path.is_file() {
        files.push(path.to_owned());
    } else {
        let pattern = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.contains(['*', '?']))
            .ok_or_else(|| {
                Error::config(format!(
                    "security_cert_store {store} is neither a directory, a file nor a pattern"
                ))
            })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        for entry in listing(dir)? {
            let entry = entry.map_err(|e| {
                Error::config(format!("cannot read security_cert_store {store}")).with_source(e)
            })?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| wildcard(pattern, n)) && entry.path().is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Matches `name` against `pattern`, where `*` is any run and `?` any one character.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Security {
    /// Loads the key, its certificate and the store named by `settings`, refusing (with the
    /// file named) what Celery refuses and what would only fail later: an unreadable or non-RSA
    /// key or certificate, a key that does not match its certificate, an expired certificate
    /// (this app's or one in the store), an empty store, and two store certificates with the
    /// same id.
    pub fn load(settings: &SecuritySettings) -> Result<Security> {
        let digest = digest_named(&settings.digest)?;
        let pem = read(&settings.key, "security_key")?;
        let key = match &settings.key_password {
            Some(p) => PKey::private_key_from_pem_passphrase(&pem, p.expose().as_bytes()),
            None => PKey::private_key_from_pem(&pem),
        }
        .map_err(|e| {
            Error::config(format!(
                "security_key {} is not a PEM private key (or its password is wrong)",
                settings.key.display()
            ))
            .with_source(e)
        })?;
        if key.id() != Id::RSA {
            return Err(Error::config(format!(
                "security_key {} is not an RSA key (only RSA is supported, as in Celery)",
                settings.key.display()
            )));
        }
        // PSS needs room for the digest and a salt: refuse keys too small for it here rather
        // than at the first message.
        if key.bits() < 1024 || (key.bits() as usize + 6) / 8 < digest.size() + 2 {
            return Err(Error::config(format!(
                "security_key {} is a {}-bit RSA key: too small (at least 1024 bits; 2048 or \
                 more is advised)",
                settings.key.display(),
                key.bits()
            )));
        }
        let own = certificate(&settings.certificate, "security_certificate")?;
        let own_key = own.public_key().map_err(|e| {
            Error::config("cannot read the security_certificate public key").with_source(e)
        })?;
        if !own_key.public_eq(&key) {
            return Err(Error::config(format!(
                "security_key {} does not match security_certificate {}",
                settings.key.display(),
                settings.certificate.display()
            )));
        }
        if expired(&own)? {
            return Err(Error::config(format!(
                "security_certificate {} has expired",
                settings.certificate.display()
            )));
        }
        let id = id_of(&own)?;
        let mut store: HashMap<String, Trusted> = HashMap::new();
        for file in store_files(&settings.cert_store)? {
            let cert = certificate(&file, "security_cert_store certificate")?;
            let cert_id = id_of(&cert)?;
            if expired(&cert)? {
                return Err(Error::config(format!(
                    "security_cert_store certificate {} ({cert_id:?}) has expired",
                    file.display()
                )));
            }
            if let Some(other) = store.get(&cert_id) {
                return Err(Error::config(format!(
                    "security_cert_store certificates {} and {} share the id {cert_id:?}",
                    other.file.display(),
                    file.display()
                )));
            }
            let public = cert
                .public_key()
                .map_err(|e| Error::config("cannot read a certificate key").with_source(e))?;
            store.insert(
                cert_id,
                Trusted {
                    key: public,
                    cert,
                    file,
                },
            );
        }
        if store.is_empty() {
            return Err(Error::config(format!(
                "security_cert_store {} holds no certificate",
                settings.cert_store
            )));
        }
        Ok(Security {
            key,
            id,
            digest,
            digest_name: settings.digest.clone(),
            store,
        })
    }

    /// Loads the settings named in `config` (see [`Security::load`]).
    pub fn from_config(config: &Config) -> Result<Security> {
        Security::load(&SecuritySettings::from_config(config)?)
    }

    /// This app's signer id, as written into every body it signs.
    pub fn signer(&self) -> &str {
        &self.id
    }

    /// The ids of the trusted certificates, sorted.
    pub fn trusted(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.store.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// The longest PSS salt for an RSA key of `bits` bits with this digest.
    fn salt_len(&self, bits: u32) -> i32 {
        let em_len = (bits as i32 + 6) / 8;
        em_len - self.digest.size() as i32 - 2
    }

    /// Signs `data` with this app's key.
    pub fn sign_bytes(&self, data: &[u8]) -> Result<Vec<u8>> {
        let fail = |e: openssl::error::ErrorStack| security("cannot sign the body").with_source(e);
        let mut s = Signer::new(self.digest, &self.key).map_err(fail)?;
        s.set_rsa_padding(Padding::PKCS1_PSS).map_err(fail)?;
        s.set_rsa_mgf1_md(self.digest).map_err(fail)?;
        s.set_rsa_pss_saltlen(RsaPssSaltlen::custom(self.salt_len(self.key.bits())))
            .map_err(fail)?;
        s.sign_oneshot_to_vec(data).map_err(fail)
    }

    /// Checks `packed`: its signer is trusted and unexpired, and its signature verifies.
    pub fn verify_packed(&self, packed: &Packed) -> Result<()> {
        let Some(trusted) = self.store.get(&packed.signer) else {
            return Err(security(format!(
                "unknown certificate {:?}: the signer is not in security_cert_store",
                packed.signer
            )));
        };
        if expired(&trusted.cert)? {
            return Err(security(format!(
                "the certificate of signer {:?} has expired",
                packed.signer
            )));
        }
        let fail =
            |e: openssl::error::ErrorStack| security("cannot check the signature").with_source(e);
        let mut v = Verifier::new(self.digest, &trusted.key).map_err(fail)?;
        v.set_rsa_padding(Padding::PKCS1_PSS).map_err(fail)?;
        v.set_rsa_mgf1_md(self.digest).map_err(fail)?;
        v.set_rsa_pss_saltlen(RsaPssSaltlen::custom(self.salt_len(trusted.key.bits())))
            .map_err(fail)?;
        // A malformed signature is an error from OpenSSL, a wrong one is `false`: both refuse.
        match v.verify_oneshot(&packed.signature, &packed.body) {
            Ok(true) => Ok(()),
            _ => Err(security(format!(
                "the signature of signer {:?} does not match the body",
                packed.signer
            ))),
        }
    }
}

impl BodySigner for Security {
    fn sign_body(
        &self,
        content_type: &str,
        content_encoding: &str,
        body: &[u8],
    ) -> Result<Vec<u8>> {
        Ok(pack(&Packed {
            signer: self.id.clone(),
            signature: self.sign_bytes(body)?,
            content_type: content_type.to_owned(),
            content_encoding: content_encoding.to_owned(),
            body: body.to_vec(),
        }))
    }

    fn verify_body(&self, signed: &[u8]) -> Result<Packed> {
        let packed = unpack(signed)?;
        self.verify_packed(&packed)?;
        // Nested signing and pickle are refused here, before anything reads the body.
        if ContentType::from_mime(&packed.content_type)? == ContentType::Auth {
            return Err(security("a signed body may not hold another signed body"));
        }
        Ok(packed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Body, Headers, Message};
    use openssl::asn1::Asn1Integer;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::rsa::Rsa;
    use openssl::x509::X509NameBuilder;
    use serde_json::{Map, json};

    /// A fresh directory for one test's files.
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "celeriac-security-{}-{name}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A self-signed certificate for `key`, issued by `CN=<cn>, O=Acme`, with `serial`, valid
    /// from `from` to `to` (Unix seconds).
    fn cert(key: &PKey<Private>, cn: &str, serial: u32, from: i64, to: i64) -> X509 {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "Acme")
            .unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        let serial = Asn1Integer::from_bn(&BigNum::from_u32(serial).unwrap()).unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::from_unix(from).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(to).unwrap()).unwrap();
        b.sign(key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn rsa() -> PKey<Private> {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    }

    /// One party's files: `<name>.key`, `<name>.pem`.
    struct Party {
        key: PathBuf,
        cert: PathBuf,
    }

    fn write(d: &Path, name: &str, key: &PKey<Private>, cert: &X509) -> Party {
        let p = Party {
            key: d.join(format!("{name}.key")),
            cert: d.join(format!("{name}.pem")),
        };
        std::fs::write(&p.key, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        std::fs::write(&p.cert, cert.to_pem().unwrap()).unwrap();
        p
    }

    fn settings(p: &Party, store: &Path) -> SecuritySettings {
        SecuritySettings {
            key: p.key.clone(),
            key_password: None,
            certificate: p.cert.clone(),
            cert_store: store.display().to_string(),
            digest: "sha256".to_owned(),
        }
    }

    /// Alice's settings, with a store holding Alice's certificate only.
    fn alice(d: &Path) -> (SecuritySettings, PKey<Private>) {
        let key = rsa();
        let c = cert(&key, "Test CA", 4242, now() - 60, now() + 86_400);
        let p = write(d, "alice", &key, &c);
        let store = d.join("store");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::copy(&p.cert, store.join("alice.pem")).unwrap();
        (settings(&p, &store), key)
    }

    fn message() -> Message {
        let body = Body::new(vec![json!(2), json!(3)], Map::new());
        Message::new(Headers::new("tasks.add", "id-1"), &body, ContentType::Json).unwrap()
    }

    fn err(r: Result<impl fmt::Debug>) -> Error {
        r.expect_err("should have been refused")
    }

    #[test]
    fn signs_and_verifies_with_celerys_signer_id() {
        let d = dir("roundtrip");
        let (s, _) = alice(&d);
        let sec = Security::load(&s).unwrap();
        assert_eq!(sec.signer(), "Test CA Acme 4242");
        assert_eq!(sec.trusted(), vec!["Test CA Acme 4242"]);
        let plain = message();
        let mut m = plain.clone();
        sec.sign(&mut m).unwrap();
        assert_eq!(m.content_type, "application/data");
        assert_eq!(m.content_encoding, "utf-8");
        let packed = unpack(&m.body).unwrap();
        assert_eq!(packed.signer, "Test CA Acme 4242");
        assert_eq!(packed.signature.len(), 256);
        assert_eq!(packed.body, plain.body);
        let back = sec.verify(&m).unwrap();
        assert_eq!(back, plain);
        assert_eq!(back.decode_body().unwrap().args, vec![json!(2), json!(3)]);
        // Signing twice leaves a signed message as it is.
        let once = m.clone();
        sec.sign(&mut m).unwrap();
        assert_eq!(m, once);
        // PSS is randomized: the same body signs differently each time, and both verify.
        let mut again = plain.clone();
        sec.sign(&mut again).unwrap();
        assert_ne!(again.body, once.body);
        sec.verify(&again).unwrap();
    }

    #[test]
    fn every_digest_round_trips_and_unknown_ones_are_refused() {
        let d = dir("digests");
        let (mut s, _) = alice(&d);
        for digest in ["sha224", "sha384", "SHA512"] {
            s.digest = digest.to_owned();
            let sec = Security::load(&s).unwrap();
            let mut m = message();
            sec.sign(&mut m).unwrap();
            sec.verify(&m).unwrap();
        }
        s.digest = "md5".to_owned();
        let e = err(Security::load(&s));
        assert!(
            e.to_string().contains("unknown security_digest \"md5\""),
            "{e}"
        );
    }

    #[test]
    fn tampering_with_any_field_is_refused() {
        let d = dir("tamper");
        let (s, _) = alice(&d);
        let sec = Security::load(&s).unwrap();
        let mut m = message();
        sec.sign(&mut m).unwrap();
        let good = unpack(&m.body).unwrap();
        let with = |f: &dyn Fn(&mut Packed)| {
            let mut p = good.clone();
            f(&mut p);
            let mut t = m.clone();
            t.body = pack(&p);
            sec.verify(&t).map(|_| ())
        };
        type Tamper<'a> = (&'a str, &'a dyn Fn(&mut Packed), &'a str);
        let cases: [Tamper<'_>; 5] = [
            ("body", &|p| p.body[3] ^= 1, "does not match the body"),
            (
                "signature",
                &|p| p.signature[10] ^= 1,
                "does not match the body",
            ),
            (
                "short signature",
                &|p| p.signature.truncate(100),
                "does not match",
            ),
            (
                "signer",
                &|p| p.signer = "Other CA Acme 4242".into(),
                "unknown certificate",
            ),
            (
                "content type",
                &|p| p.content_type = "application/x-python-serialize".into(),
                "pickle",
            ),
        ];
        for (what, f, why) in cases {
            let e = err(with(f));
            assert!(e.to_string().contains(why), "{what}: {e}");
        }
        // The outer base64, and an unsigned message.
        let mut t = m.clone();
        t.body[5] = b'!';
        assert!(
            err(sec.verify(&t))
                .to_string()
                .contains("malformed signed body")
        );
        let e = err(sec.verify(&message()));
        assert_eq!(e.kind(), ErrorKind::Security);
        assert!(e.to_string().contains("unsigned message refused"), "{e}");
    }

    #[test]
    fn a_wrong_key_or_an_unknown_signer_is_refused() {
        let d = dir("wrong");
        let (s, _) = alice(&d);
        let sec = Security::load(&s).unwrap();
        // Mallory claims Alice's id (same issuer and serial) with her own key.
        let mallory = rsa();
        let mc = cert(&mallory, "Test CA", 4242, now() - 60, now() + 86_400);
        let mp = write(&d, "mallory", &mallory, &mc);
        let own_store = dir("mallory-store");
        std::fs::copy(&mp.cert, own_store.join("m.pem")).unwrap();
        let forger = Security::load(&settings(&mp, &own_store)).unwrap();
        let mut m = message();
        forger.sign(&mut m).unwrap();
        let e = err(sec.verify(&m));
        assert!(e.to_string().contains("does not match the body"), "{e}");
        // Bob is not in Alice's store.
        let bob = rsa();
        let bc = cert(&bob, "Bob CA", 7, now() - 60, now() + 86_400);
        let bp = write(&d, "bob", &bob, &bc);
        let bob_sec = Security::load(&settings(&bp, &own_store)).unwrap();
        let mut m = message();
        bob_sec.sign(&mut m).unwrap();
        let e = err(sec.verify(&m));
        assert!(
            e.to_string()
                .contains("unknown certificate \"Bob CA Acme 7\""),
            "{e}"
        );
    }

    #[test]
    fn setup_refuses_what_celery_refuses_naming_the_file() {
        let d = dir("setup");
        let (s, alice_key) = alice(&d);
        // An expired certificate in the store.
        let old = rsa();
        let oc = cert(&old, "Old CA", 1, now() - 86_400 * 2, now() - 86_400);
        let op = write(&d, "old", &old, &oc);
        let store = dir("expired-store");
        std::fs::copy(&op.cert, store.join("old.pem")).unwrap();
        let e = err(Security::load(&settings(
            &Party {
                key: s.key.clone(),
                cert: s.certificate.clone(),
            },
            &store,
        )));
        assert!(e.to_string().contains("old.pem"), "{e}");
        assert!(e.to_string().contains("has expired"), "{e}");
        // This app's own certificate expired.
        let e = err(Security::load(&settings(&op, Path::new(&s.cert_store))));
        assert!(e.to_string().contains("security_certificate"), "{e}");
        assert!(e.to_string().contains("has expired"), "{e}");
        // Two certificates with one id.
        let dup = dir("dup-store");
        std::fs::copy(&s.certificate, dup.join("a.pem")).unwrap();
        let twin = cert(&alice_key, "Test CA", 4242, now() - 60, now() + 3600);
        std::fs::write(dup.join("b.pem"), twin.to_pem().unwrap()).unwrap();
        let mut bad = s.clone();
        bad.cert_store = dup.display().to_string();
        let e = err(Security::load(&bad));
        assert!(
            e.to_string().contains("share the id \"Test CA Acme 4242\""),
            "{e}"
        );
        // An empty store; a pattern matching nothing; a pattern matching one file.
        bad.cert_store = dir("empty").display().to_string();
        assert!(
            err(Security::load(&bad))
                .to_string()
                .contains("holds no certificate")
        );
        bad.cert_store = format!("{}/*.crt", dup.display());
        assert!(
            err(Security::load(&bad))
                .to_string()
                .contains("holds no certificate")
        );
        bad.cert_store = format!("{}/a.p?m", dup.display());
        Security::load(&bad).unwrap();
        // A key that does not match its certificate.
        let mut bad = s.clone();
        bad.certificate = op.cert.clone();
        let e = err(Security::load(&bad));
        assert!(
            e.to_string()
                .contains("does not match security_certificate"),
            "{e}"
        );
        // A missing file, a file that is not PEM.
        let mut bad = s.clone();
        bad.key = d.join("missing.key");
        let e = err(Security::load(&bad));
        assert!(e.to_string().contains("cannot read security_key"), "{e}");
        assert!(e.to_string().contains("missing.key"), "{e}");
        std::fs::write(d.join("junk.pem"), "not a certificate").unwrap();
        let mut bad = s.clone();
        bad.certificate = d.join("junk.pem");
        let e = err(Security::load(&bad));
        assert!(
            e.to_string().contains("junk.pem is not a PEM certificate"),
            "{e}"
        );
    }

    #[test]
    fn only_rsa_keys_and_encrypted_keys_with_their_password() {
        let d = dir("rsa");
        let (s, key) = alice(&d);
        let ec = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let ecp = write(
            &d,
            "ec",
            &ec,
            &cert(&ec, "EC CA", 3, now() - 60, now() + 3600),
        );
        let e = err(Security::load(&settings(&ecp, Path::new(&s.cert_store))));
        assert!(e.to_string().contains("not an RSA key"), "{e}");
        let small = PKey::from_rsa(Rsa::generate(512).unwrap()).unwrap();
        let sp = write(
            &d,
            "small",
            &small,
            &cert(&small, "S", 5, now() - 60, now() + 3600),
        );
        let e = err(Security::load(&settings(&sp, Path::new(&s.cert_store))));
        assert!(e.to_string().contains("512-bit RSA key: too small"), "{e}");
        let mut bad = s.clone();
        bad.certificate = ecp.cert.clone();
        let e = err(Security::load(&bad));
        assert!(e.to_string().contains("does not hold an RSA key"), "{e}");
        // An encrypted key: the right password opens it, a wrong one is an error.
        let pem = key
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"s3cret")
            .unwrap();
        let locked = d.join("locked.key");
        std::fs::write(&locked, pem).unwrap();
        let mut ok = s.clone();
        ok.key = locked;
        ok.key_password = Some(Password::new("s3cret"));
        Security::load(&ok).unwrap();
        ok.key_password = Some(Password::new("wrong"));
        let e = err(Security::load(&ok));
        assert!(e.to_string().contains("password is wrong"), "{e}");
        assert!(!format!("{ok:?}").contains("wrong"));
    }
}
