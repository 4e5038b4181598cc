//! Sealing a job config for the trip to the workers. A config that did not come from Django
//! (inline in the job message, or the file of `dispatcher run --queue pubsub`) cannot be
//! fetched by the workers, and its secrets must not travel or rest in clear text (shard
//! messages, the state store). It is sealed with ChaCha20-Poly1305 under a key the
//! dispatcher and the workers share (`SHARDFLOW_SEAL_KEY`, 64 hex digits, e.g. from a
//! Kubernetes Secret), bound to the run it belongs to.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, Result};

pub const SEAL_KEY_ENV: &str = "SHARDFLOW_SEAL_KEY";

#[derive(Clone)]
pub struct SealKey {
    key: std::sync::Arc<LessSafeKey>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(***)")
    }
}

impl SealKey {
    /// 32 bytes as 64 hex digits (`openssl rand -hex 32`).
    pub fn from_hex(text: &str) -> Result<Self> {
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                Error::Message(format!(
                    "{SEAL_KEY_ENV} must be 64 hex digits (32 bytes; `openssl rand -hex 32`)"
                ))
            })?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| Error::Message(format!("{SEAL_KEY_ENV} is not a usable key")))?;
        Ok(SealKey {
            key: std::sync::Arc::new(LessSafeKey::new(key)),
        })
    }

    /// The key from `SHARDFLOW_SEAL_KEY`, if set.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(SEAL_KEY_ENV) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(Self::from_hex(&v)?)),
            _ => Ok(None),
        }
    }

    /// Hex of nonce ‖ ciphertext ‖ tag; `context` (the run id) must be given again to open.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Other("no randomness for a nonce".into()))?;
        let mut buffer = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut buffer,
            )
            .map_err(|_| Error::Other("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buffer);
        Ok(hex::encode(out))
    }

    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>> {
        let refused = || {
            Error::Message(format!(
                "the sealed job config could not be opened: this process's {SEAL_KEY_ENV} is \
                 not the dispatcher's, or the config belongs to another run than {context}"
            ))
        };
        let bytes = hex::decode(sealed).map_err(|_| refused())?;
        if bytes.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut buffer = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buffer)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_configs_open_only_with_the_key_and_run() {
        let key = SealKey::from_hex(KEY).unwrap();
        let config = br#"{"connection_params": {"password": "pw-never-shown"}}"#;
        let sealed = key.seal(config, "etl-5.1").unwrap();
        assert!(!sealed.contains(&hex::encode("pw-never-shown")));
        assert_ne!(sealed, key.seal(config, "etl-5.1").unwrap(), "fresh nonce");
        assert_eq!(key.open(&sealed, "etl-5.1").unwrap(), config);

        let refused = "message: the sealed job config could not be opened: this process's \
                       SHARDFLOW_SEAL_KEY is not the dispatcher's, or the config belongs to \
                       another run than etl-6.1";
        assert_eq!(
            key.open(&sealed, "etl-6.1").unwrap_err().to_string(),
            refused
        );
        let other = SealKey::from_hex(&KEY.replace("00", "ff")).unwrap();
        assert!(other.open(&sealed, "etl-5.1").is_err());
        let mut tampered = hex::decode(&sealed).unwrap();
        tampered[NONCE_LEN] ^= 1;
        assert!(key.open(&hex::encode(tampered), "etl-5.1").is_err());
        assert!(key.open("zz", "etl-5.1").is_err());

        assert_eq!(
            SealKey::from_hex("abcd").unwrap_err().to_string(),
            "message: SHARDFLOW_SEAL_KEY must be 64 hex digits (32 bytes; `openssl rand -hex 32`)"
        );
        assert_eq!(format!("{key:?}"), "SealKey(***)");
    }
}
