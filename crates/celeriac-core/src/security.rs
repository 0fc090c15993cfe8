//! Signed task messages, on the wire of Celery's `auth` serializer.
//!
//! For deployments where more parties can write to the broker than should be able to run tasks.
//! With `serializer = "auth"` every task message body this app sends is signed with an X.509 RSA
//! key, and a worker runs only messages whose signature verifies against a certificate in its
//! store. Python Celery apps configured with `setup_security()` read and write the same bytes.
//!
//! # The wire format
//!
//! The content type is `application/data`, the content encoding `utf-8`, and the body the
//! standard base64 (with padding) of five fields joined by the two bytes `0x00 0x01`:
//!
//! 1. base64 of the signer id: the certificate issuer's attribute values in certificate order,
//!    each followed by a space, then the serial number in decimal (`Test CA Acme 4242`);
//! 2. base64 of the signature;
//! 3. the inner content type (`application/json`);
//! 4. the inner content encoding (`utf-8`);
//! 5. the inner body: the usual serialized `[args, kwargs, embed]`.
//!
//! A reader splits at most four times, so the inner body may hold any bytes. The signature is
//! RSA-PSS over the inner body alone, with MGF1 over the configured digest (`sha256` unless
//! `security_digest` says otherwise) and the longest salt the key allows.
//!
//! # A key design decision: headers are not signed
//!
//! Celery signs the body only, and the headers (task name, id, eta, expiry, retries) travel
//! beside it unsigned. Celeriac keeps that wire, so that Python peers interoperate: a
//! signature proves that a key holder wrote these arguments (and the canvas embedded with
//! them), not that they were meant for this task name or this id. `docs/SECURITY.md` spells out
//! what someone with write access to the broker can still do.
//!
//! The format functions ([`pack`], [`unpack`], [`signer_id`]) and the [`BodySigner`] trait need
//! no cryptography; `Security`, which loads keys and signs, needs the `security` feature
//! (the `openssl` crate).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::error::{Error, ErrorKind, Result};
use crate::protocol::Message;

/// The content type of a signed body (`application/data`).
pub const SIGNED_CONTENT_TYPE: &str = "application/data";

/// The content encoding of a signed body (`utf-8`: the body is base64 text).
pub const SIGNED_CONTENT_ENCODING: &str = "utf-8";

/// The separator between the fields of a signed body.
const SEP: &[u8] = b"\x00\x01";

/// Signs the bodies of outgoing messages and verifies incoming ones.
///
/// Implemented by `Security` (feature `security`); the app and the worker
/// hold it as `Arc<dyn BodySigner>`, so they need no cryptography of their own. An
/// implementation signs and checks serialized bodies ([`sign_body`](Self::sign_body),
/// [`verify_body`](Self::verify_body)); task messages ([`sign`](Self::sign),
/// [`verify`](Self::verify)) and remote-control messages
/// ([`broadcast::Signed`](crate::broadcast::Signed)) are built on those two.
pub trait BodySigner: Send + Sync + fmt::Debug {
    /// The signed form (`application/data`, see [`pack`]) of a body serialized as
    /// `content_type` in `content_encoding`.
    fn sign_body(&self, content_type: &str, content_encoding: &str, body: &[u8])
    -> Result<Vec<u8>>;

    /// Checks a signed body (the text [`sign_body`](Self::sign_body) writes) and returns its
    /// fields. Fails (kind [`ErrorKind::Security`]) for a malformed signed body, a signer that
    /// is not trusted, an expired signer certificate and a signature that does not verify.
    fn verify_body(&self, signed: &[u8]) -> Result<Packed>;

    /// Replaces `message`'s body with its signed form (`application/data`). A message that
    /// is signed already is left as it is.
    fn sign(&self, message: &mut Message) -> Result<()> {
        if is_signed(message) {
            return Ok(());
        }
        message.body = self.sign_body(
            &message.content_type,
            &message.content_encoding,
            &message.body,
        )?;
        message.content_type = SIGNED_CONTENT_TYPE.to_owned();
        message.content_encoding = SIGNED_CONTENT_ENCODING.to_owned();
        Ok(())
    }

    /// Checks the signature of a signed `message` and returns the message with the inner
    /// content type, encoding and body, ready for [`Message::decode_body`].
    ///
    /// Fails (kind [`ErrorKind::Security`]) for an unsigned message, a signed body that holds
    /// another signed body, and everything [`verify_body`](Self::verify_body) refuses.
    fn verify(&self, message: &Message) -> Result<Message> {
        if !is_signed(message) {
            return Err(Error::new(
                ErrorKind::Security,
                format!(
                    "unsigned message refused: content type {:?}, but serializer \"auth\" \
                     accepts only signed ones ({SIGNED_CONTENT_TYPE})",
                    message.content_type
                ),
            ));
        }
        let packed = self.verify_body(&message.body)?;
        Ok(Message {
            headers: message.headers.clone(),
            properties: message.properties.clone(),
            content_type: packed.content_type,
            content_encoding: packed.content_encoding,
            body: packed.body,
        })
    }
}

/// The fields of a signed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// Who signed: the id of a certificate (see [`signer_id`]).
    pub signer: String,
    /// The signature of [`body`](Self::body).
    pub signature: Vec<u8>,
    /// The content type of the inner body, e.g. `application/json`.
    pub content_type: String,
    /// The content encoding of the inner body, e.g. `utf-8`.
    pub content_encoding: String,
    /// The inner body, as signed.
    pub body: Vec<u8>,
}

/// Writes the signed body of `packed` (base64 text).
pub fn pack(packed: &Packed) -> Vec<u8> {
    let signer = B64.encode(packed.signer.as_bytes());
    let signature = B64.encode(&packed.signature);
    let mut raw = Vec::with_capacity(
        signer.len() + signature.len() + packed.content_type.len() + packed.body.len() + 32,
    );
    for field in [
        signer.as_bytes(),
        signature.as_bytes(),
        packed.content_type.as_bytes(),
        packed.content_encoding.as_bytes(),
    ] {
        raw.extend_from_slice(field);
        raw.extend_from_slice(SEP);
    }
    raw.extend_from_slice(&packed.body);
    B64.encode(raw).into_bytes()
}

/// Reads a signed body written by [`pack`] or by Celery's `auth` serializer. Checks only the
/// shape, not the signature.
pub fn unpack(body: &[u8]) -> Result<Packed> {
    let bad = |what: &str| {
        Error::new(
            ErrorKind::Security,
            format!("malformed signed body: {what}"),
        )
    };
    let text: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let raw = B64.decode(&text).map_err(|_| bad("not base64"))?;
    let mut fields = Vec::with_capacity(5);
    let mut rest = raw.as_slice();
    while fields.len() < 4 {
        let Some(at) = rest.windows(2).position(|w| w == SEP) else {
            return Err(bad("fewer than five fields"));
        };
        fields.push(&rest[..at]);
        rest = &rest[at + 2..];
    }
    let signer = B64
        .decode(fields[0])
        .map_err(|_| bad("the signer is not base64"))?;
    let signer = String::from_utf8(signer).map_err(|_| bad("the signer is not utf-8"))?;
    let signature = B64
        .decode(fields[1])
        .map_err(|_| bad("the signature is not base64"))?;
    let text = |b: &[u8], what: &str| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| bad(what))
    };
    Ok(Packed {
        signer,
        signature,
        content_type: text(fields[2], "the content type is not utf-8")?,
        content_encoding: text(fields[3], "the content encoding is not utf-8")?,
        body: rest.to_vec(),
    })
}

/// A certificate's id as Celery names signers: the issuer's attribute values in certificate
/// order, joined by spaces, then a space and the serial number in decimal.
pub fn signer_id<'a>(issuer_values: impl IntoIterator<Item = &'a str>, serial: &str) -> String {
    let mut id = issuer_values.into_iter().collect::<Vec<_>>().join(" ");
    id.push(' ');
    id.push_str(serial);
    id
}

/// Whether `message` carries a signed body.
pub fn is_signed(message: &Message) -> bool {
    message.content_type == SIGNED_CONTENT_TYPE
}

#[cfg(feature = "security")]
mod imp;
#[cfg(feature = "security")]
pub use imp::{Security, SecuritySettings};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_round_trip_any_inner_body() {
        let p = Packed {
            signer: "Test CA Acme 4242".to_owned(),
            signature: vec![0, 1, 2, 255, 0, 1],
            content_type: "application/json".to_owned(),
            content_encoding: "utf-8".to_owned(),
            // The separator inside the body: the reader splits four times only.
            body: b"[[1, \"\x00\x01\"], {}, {}]\x00\x01".to_vec(),
        };
        let wire = pack(&p);
        assert!(wire.iter().all(u8::is_ascii_graphic));
        assert_eq!(unpack(&wire).unwrap(), p);
    }

    #[test]
    fn the_layout_is_celerys() {
        let p = Packed {
            signer: "CA 1".to_owned(),
            signature: b"sig".to_vec(),
            content_type: "application/json".to_owned(),
            content_encoding: "utf-8".to_owned(),
            body: b"[]".to_vec(),
        };
        let raw = B64.decode(pack(&p)).unwrap();
        assert_eq!(
            raw,
            b"Q0EgMQ==\x00\x01c2ln\x00\x01application/json\x00\x01utf-8\x00\x01[]".to_vec()
        );
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        for (body, why) in [
            (&b"not base64!"[..], "not base64"),
            (b"YWJj", "fewer than five fields"),
        ] {
            let e = unpack(body).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Security);
            assert!(e.to_string().contains(why), "{e}");
        }
        let raw = B64.encode(b"!!\x00\x01c2ln\x00\x01a\x00\x01b\x00\x01c");
        assert!(
            unpack(raw.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("signer")
        );
    }

    #[test]
    fn signer_ids_join_issuer_values_and_the_serial() {
        assert_eq!(signer_id(["Test CA", "Acme"], "4242"), "Test CA Acme 4242");
    }
}
