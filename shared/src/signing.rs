//! Signed job documents: the coordinator signs each job's document with Ed25519 once, at
//! creation; every request to a device carries the signed bytes, the signature and the key
//! id, so a device can refuse a document it cannot verify.
//!
//! Owns the exact bytes that are signed ([`document`]), signing and verification, and the
//! textual form of keys (hex). The signed bytes are carried as a string, so a device
//! verifies exactly what was signed and never has to re-serialise JSON. It never decides
//! what a device does with a refused document (fleet-sim answers REJECTED).

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::job::Action;

/// A job document as a device receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedDocument {
    /// The signed bytes, as UTF-8 JSON text: `{"jobId":"…","action":{…}}`.
    pub document: String,
    /// Ed25519 signature of `document`'s bytes, 128 hex digits.
    pub signature: String,
    /// Which key signed it (devices accept several, for rotation).
    pub key_id: String,
}

/// The bytes signed for a job: its id and action as compact JSON.
pub fn document(job_id: Uuid, action: &Action) -> String {
    serde_json::json!({"jobId": job_id, "action": action}).to_string()
}

/// A signing key with its id.
#[derive(Clone)]
pub struct Signer25519 {
    key: SigningKey,
    /// The key id sent with every signature.
    pub key_id: String,
}

impl std::fmt::Debug for Signer25519 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer25519")
            .field("key_id", &self.key_id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Signer25519 {
    /// A signer from a 32-byte seed written as 64 hex digits.
    ///
    /// # Errors
    /// The seed is not 64 hex digits.
    pub fn from_hex(seed_hex: &str, key_id: &str) -> Result<Self, String> {
        let bytes: [u8; 32] = hex::decode(seed_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("a signing key is 64 hexadecimal digits (a 32-byte Ed25519 seed)")?;
        Ok(Self {
            key: SigningKey::from_bytes(&bytes),
            key_id: key_id.to_owned(),
        })
    }

    /// A new random key (from the operating system's generator).
    ///
    /// # Errors
    /// The generator failed.
    pub fn generate(key_id: &str) -> Result<Self, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
            key_id: key_id.to_owned(),
        })
    }

    /// The seed, hex (the secret to keep).
    pub fn seed_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    /// The public key, hex (what devices are given).
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Signs a job's document.
    pub fn sign(&self, job_id: Uuid, action: &Action) -> SignedDocument {
        let document = document(job_id, action);
        let signature: Signature = self.key.sign(document.as_bytes());
        SignedDocument {
            document,
            signature: hex::encode(signature.to_bytes()),
            key_id: self.key_id.clone(),
        }
    }
}

/// The public keys a device accepts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(HashMap<String, VerifyingKey>);

impl TrustedKeys {
    /// Keys from `id=hex` entries.
    ///
    /// # Errors
    /// An entry that is not `id=<64 hex digits>` of a valid Ed25519 public key.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut keys = HashMap::new();
        for e in entries {
            let (id, hex_key) = e
                .split_once('=')
                .ok_or_else(|| format!("{e:?} is not key_id=public_key_hex"))?;
            let bytes: [u8; 32] = hex::decode(hex_key.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("key {id}: a public key is 64 hexadecimal digits"))?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| format!("key {id}: not an Ed25519 public key: {e}"))?;
            keys.insert(id.trim().to_owned(), key);
        }
        Ok(Self(keys))
    }

    /// Whether any key is trusted (no keys: signatures are not checked).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Verifies a request's document for `job_id`: signed, by a trusted key, with a valid
    /// signature over exactly `document`, which names this job.
    ///
    /// # Errors
    /// Why the document cannot be trusted (the reason names the signature).
    pub fn verify(&self, job_id: Uuid, signed: Option<&SignedDocument>) -> Result<(), String> {
        let s = signed.ok_or("signature missing: the job document is unsigned")?;
        let key = self
            .0
            .get(&s.key_id)
            .ok_or_else(|| format!("signature by unknown key {:?}", s.key_id))?;
        let sig: [u8; 64] = hex::decode(&s.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("signature malformed: not 128 hexadecimal digits")?;
        key.verify(s.document.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| format!("signature invalid for key {:?}", s.key_id))?;
        let doc: serde_json::Value = serde_json::from_str(&s.document)
            .map_err(|_| "signed document is not JSON".to_owned())?;
        if doc["jobId"].as_str() != Some(job_id.to_string().as_str()) {
            return Err("signature is for another job's document".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action() -> Action {
        serde_json::from_value(serde_json::json!({"type": "reboot"})).expect("action")
    }

    #[test]
    fn a_document_signed_by_a_trusted_key_verifies_and_anything_else_does_not() {
        let (k1, k2) = (
            Signer25519::generate("k1").expect("k1"),
            Signer25519::generate("k2").expect("k2"),
        );
        let trust_k1 = TrustedKeys::parse(&[format!("k1={}", k1.public_hex())]).expect("keys");
        let job = Uuid::now_v7();
        let good = k1.sign(job, &action());
        assert!(trust_k1.verify(job, Some(&good)).is_ok());
        // Unsigned, unknown key, tampered document, another job.
        assert!(
            trust_k1
                .verify(job, None)
                .expect_err("unsigned")
                .contains("signature")
        );
        let by_k2 = k2.sign(job, &action());
        assert!(
            trust_k1
                .verify(job, Some(&by_k2))
                .expect_err("k2")
                .contains("unknown key")
        );
        let tampered = SignedDocument {
            document: good.document.replace("reboot", "command"),
            ..good.clone()
        };
        assert!(
            trust_k1
                .verify(job, Some(&tampered))
                .expect_err("tampered")
                .contains("invalid")
        );
        assert!(trust_k1.verify(Uuid::now_v7(), Some(&good)).is_err());
        // Rotation: a device trusting both keys accepts both.
        let both = TrustedKeys::parse(&[
            format!("k1={}", k1.public_hex()),
            format!("k2={}", k2.public_hex()),
        ])
        .expect("keys");
        assert!(both.verify(job, Some(&by_k2)).is_ok());
    }

    #[test]
    fn keys_round_trip_through_hex_and_bad_ones_are_refused() {
        let k = Signer25519::generate("k").expect("key");
        let again = Signer25519::from_hex(&k.seed_hex(), "k").expect("seed");
        assert_eq!(again.public_hex(), k.public_hex());
        assert!(Signer25519::from_hex("abc", "k").is_err());
        assert!(TrustedKeys::parse(&["nokey".into()]).is_err());
        assert!(format!("{k:?}").contains("redacted"));
        assert!(!format!("{k:?}").contains(&k.seed_hex()));
    }
}
