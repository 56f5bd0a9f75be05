//! Standard Webhooks verification of an OpenAI delivery (stage 2 of the receiver).
//!
//! OpenAI signs `{webhook-id}.{webhook-timestamp}.{raw body}` with HMAC-SHA256 under a
//! `whsec_` secret. We check the exact bytes received, the timestamp tolerance, and every
//! `v1,` signature in the header against every configured secret (rotation), comparing in
//! constant time. Only a [`Verified`] delivery can enter the inbox, and only this module
//! can make one.

use axum::body::Bytes;
use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, general_purpose};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::broker::MAX_SHORT_STRING;

type HmacSha256 = Hmac<Sha256>;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// Secrets are base64 with or without `=` padding (the Standard Webhooks libraries accept
/// both), but otherwise strict: a stray character must not shrink the key silently.
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Shorter keys are refused at start-up: a lax decoder once turned `whsec_xyz!` into a
/// one-byte key in an SDK. The spec asks for 24..=64 bytes; 16 leaves room for odd senders.
const MIN_KEY_BYTES: usize = 16;

/// Signatures tried per delivery; further ones are ignored.
pub const MAX_SIGNATURES: usize = 16;

/// One signing key, held as HMAC's keyed state: the key's two padded blocks are hashed once
/// at start-up, and each delivery starts from a copy of that state instead of hashing them
/// again (two of the about seven SHA-256 blocks a 160-byte delivery costs). Never appears in
/// `Debug` output or logs.
#[derive(Clone)]
pub struct Secret(HmacSha256);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Why a configured secret is unusable; reported at start-up, never per request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("no secret given")]
    Empty,
    #[error("a secret does not start with `whsec_`")]
    MissingPrefix,
    #[error("a secret is not valid base64 after `whsec_`")]
    NotBase64,
    #[error("a secret decodes to {0} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort(usize),
}

impl Secret {
    /// Parses one `whsec_<base64>` secret as shown in the OpenAI dashboard.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.strip_prefix("whsec_").ok_or(SecretError::MissingPrefix)?;
        let key = SECRET_BASE64
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if key.len() < MIN_KEY_BYTES {
            return Err(SecretError::TooShort(key.len()));
        }
        // `new_from_slice` only fails for key sizes HMAC cannot take; HMAC takes any size.
        Ok(Self(HmacSha256::new_from_slice(&key).expect("HMAC accepts any key length")))
    }

    /// The entries of a list separated by commas and/or white space, as
    /// `OPENAI_WEBHOOK_SECRET` holds it.
    pub fn list_entries(text: &str) -> impl Iterator<Item = &str> {
        text.split(|c: char| c == ',' || c.is_whitespace()).filter(|part| !part.is_empty())
    }

    /// Parses such a list.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, SecretError> {
        let secrets = Self::list_entries(text)
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(secrets)
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.0.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value OpenAI would send for this delivery (`v1,<base64>`).
    /// Used by the `send` subcommand, the tests and the benchmark.
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }
}

/// How a delivery fails verification. The first four are malformed requests (400), the
/// rest are unauthenticated ones (401).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is empty, repeated or not visible ASCII")]
    MalformedHeader(&'static str),
    #[error("webhook-timestamp is not a Unix time in seconds")]
    MalformedTimestamp,
    #[error("header webhook-id is longer than {MAX_SHORT_STRING} bytes")]
    IdTooLong,
    #[error("webhook timestamp is too old")]
    TooOld,
    #[error("webhook timestamp is too new")]
    TooNew,
    #[error("no signature matches any configured secret")]
    NoMatchingSignature,
}

impl VerifyError {
    /// True when the request is well formed but not authentic (answered 401, not 400).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::TooOld | Self::TooNew | Self::NoMatchingSignature)
    }

    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::MalformedHeader(_) => "malformed_header",
            Self::MalformedTimestamp => "malformed_timestamp",
            Self::IdTooLong => "id_too_long",
            Self::TooOld => "too_old",
            Self::TooNew => "too_new",
            Self::NoMatchingSignature => "bad_signature",
        }
    }
}

/// A delivery whose signature and timestamp checked out. Fields are private so that the
/// only way to obtain one is [`Verifier::verify`].
#[derive(Debug, Clone)]
pub struct Verified {
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
}

impl Verified {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn timestamp(&self) -> &str {
        &self.timestamp
    }
    pub fn signature(&self) -> &str {
        &self.signature
    }
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// The configured secrets and clock tolerance.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
    tolerance_secs: i64,
}

impl Verifier {
    pub fn new(secrets: Vec<Secret>, tolerance_secs: u64) -> Self {
        let tolerance_secs = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
        Self { secrets, tolerance_secs }
    }

    /// Checks a delivery received at Unix time `now`. Both ends of the tolerance window are
    /// inclusive, as in OpenAI's SDKs.
    pub fn verify(&self, headers: &HeaderMap, body: Bytes, now: i64) -> Result<Verified, VerifyError> {
        let id = single_header(headers, HEADER_ID)?;
        let timestamp = single_header(headers, HEADER_TIMESTAMP)?;
        let signature = single_header(headers, HEADER_SIGNATURE)?;
        // The id becomes the inbox message's `message_id`, an AMQP short string.
        if id.len() > MAX_SHORT_STRING {
            return Err(VerifyError::IdTooLong);
        }

        // Digits only: the SDKs' lax parsers accept "+123" or "123.5", which we do not need.
        if timestamp.len() > 18 || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VerifyError::MalformedTimestamp);
        }
        let sent: i64 = timestamp.parse().map_err(|_| VerifyError::MalformedTimestamp)?;
        if now.saturating_sub(sent) > self.tolerance_secs {
            return Err(VerifyError::TooOld);
        }
        if sent.saturating_sub(now) > self.tolerance_secs {
            return Err(VerifyError::TooNew);
        }

        // Entries we cannot decode, and other schemes (`v1a,` is asymmetric), are skipped so
        // that one odd entry cannot hide a valid one beside it.
        // At most MAX_SIGNATURES are tried: each costs an HMAC per secret, and a sender
        // signs with one key, two while it rotates.
        let candidates: Vec<Vec<u8>> = signature
            .split_ascii_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|encoded| general_purpose::STANDARD.decode(encoded).ok())
            .take(MAX_SIGNATURES)
            .collect();
        let matches = self.secrets.iter().any(|secret| {
            let mac = secret.mac(id, timestamp, &body);
            // `verify_slice` compares in constant time.
            candidates.iter().any(|candidate| mac.clone().verify_slice(candidate).is_ok())
        });
        if !matches {
            return Err(VerifyError::NoMatchingSignature);
        }
        Ok(Verified {
            id: id.to_owned(),
            timestamp: timestamp.to_owned(),
            signature: signature.to_owned(),
            body,
        })
    }
}

/// A header that must occur exactly once, as non-empty visible ASCII: a repeated
/// `webhook-id` would leave it ambiguous which one was signed.
fn single_header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(VerifyError::MissingHeader(name))?;
    if values.next().is_some() {
        return Err(VerifyError::MalformedHeader(name));
    }
    let text = value.to_str().map_err(|_| VerifyError::MalformedHeader(name))?.trim();
    if text.is_empty() {
        return Err(VerifyError::MalformedHeader(name));
    }
    Ok(text)
}

#[cfg(test)]
mod tests;
