//! The API key format: `sk_` or `pk_`, a base62 random body (≥128 bits), and a 6-character base62
//! CRC32 checksum. A key that fails this check is rejected before any cache or store lookup, and
//! secret scanners can recognise leaked keys by their shape.

use std::cell::RefCell;
use std::fmt;

use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher13};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters in a generated key: 32 × log2(62) ≈ 190 bits.
pub const BODY_CHARS: usize = 32;
/// 22 base62 characters are the fewest that carry 128 bits.
const MIN_BODY_CHARS: usize = 22;
const MAX_BODY_CHARS: usize = 100;
const CHECKSUM_CHARS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// `sk_`: backend to backend; may impersonate users with `users:impersonate`.
    Secret,
    /// `pk_`: shipped in client apps; only valid together with a user's JWT.
    Publishable,
}

impl KeyKind {
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::Secret => "sk_",
            KeyKind::Publishable => "pk_",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Secret => "secret",
            KeyKind::Publishable => "publishable",
        }
    }
}

/// A syntactically valid key. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey<'a> {
    kind: KeyKind,
    text: &'a str,
}

impl fmt::Debug for ApiKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.kind.prefix())
    }
}

/// Why a string is not a key. Deliberately coarse: the client learns only `invalid_api_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("unknown key prefix")]
    Prefix,
    #[error("key has the wrong length or characters")]
    Shape,
    #[error("key checksum does not match")]
    Checksum,
}

impl<'a> ApiKey<'a> {
    pub fn parse(text: &'a str) -> Result<Self, KeyFormatError> {
        let (kind, rest) = if let Some(rest) = text.strip_prefix("sk_") {
            (KeyKind::Secret, rest)
        } else if let Some(rest) = text.strip_prefix("pk_") {
            (KeyKind::Publishable, rest)
        } else {
            return Err(KeyFormatError::Prefix);
        };
        let len = rest.len();
        if !(MIN_BODY_CHARS + CHECKSUM_CHARS..=MAX_BODY_CHARS + CHECKSUM_CHARS).contains(&len)
            || !rest.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(KeyFormatError::Shape);
        }
        let (body, sum) = text.split_at(text.len() - CHECKSUM_CHARS);
        if checksum(body) != sum.as_bytes() {
            return Err(KeyFormatError::Checksum);
        }
        Ok(ApiKey { kind, text })
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The key's SHA-256, which the store is indexed by. The same key arrives over and over,
    /// and a SHA-256 in software is thousands of instructions per request, so each thread
    /// remembers the hashes of the keys it saw last (`RecentHashes`).
    pub fn hash(&self) -> KeyHash {
        RECENT_HASHES.with_borrow_mut(|recent| recent.hash(self.text))
    }

    pub fn expose(&self) -> &'a str {
        self.text
    }

    /// A new random key (CSPRNG), returned as an owned string: show it once, store its hash.
    pub fn generate(kind: KeyKind) -> String {
        let mut out = String::with_capacity(3 + BODY_CHARS + CHECKSUM_CHARS);
        out.push_str(kind.prefix());
        out.push_str(&random_base62(BODY_CHARS));
        let sum = checksum(&out);
        out.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
        out
    }
}

thread_local! {
    static RECENT_HASHES: RefCell<RecentHashes> = RefCell::new(RecentHashes::new());
}

/// The SHA-256 of the last key seen in each of `RECENT_SLOTS` slots, found by a keyed 128-bit
/// SipHash of the key (a random key per thread, so no client can aim two keys at one slot or
/// forge a match). The slot keeps that SipHash, never the key: two different keys share an entry
/// only if their 128-bit SipHashes collide, as for the token caches (`authn::jwt`). Bounded:
/// a flood of random keys only overwrites slots.
struct RecentHashes {
    sip: SipHasher13,
    slots: Box<[Option<(u128, KeyHash)>]>,
}

/// Per thread: 64 KiB for 1,024 keys.
const RECENT_SLOTS: usize = 1024;

impl RecentHashes {
    fn new() -> Self {
        let mut key = [0u8; 16];
        aws_lc_rs::rand::fill(&mut key).expect("the system CSPRNG is available");
        Self {
            sip: SipHasher13::new_with_key(&key),
            slots: vec![None; RECENT_SLOTS].into_boxed_slice(),
        }
    }

    fn hash(&mut self, key: &str) -> KeyHash {
        let mut h = self.sip;
        std::hash::Hasher::write(&mut h, key.as_bytes());
        let id = h.finish128().as_u128();
        let slot = &mut self.slots[id as usize % RECENT_SLOTS];
        match slot {
            Some((seen, hash)) if *seen == id => *hash,
            _ => {
                let hash = KeyHash::of(key);
                *slot = Some((id, hash));
                hash
            }
        }
    }
}

/// `n` uniformly random base62 characters from the system CSPRNG.
pub fn random_base62(n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        aws_lc_rs::rand::fill(&mut buf).expect("the system CSPRNG is available");
        // Rejection sampling: 62 × 4 = 248, so bytes below 248 map uniformly onto the alphabet.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() == n {
                break;
            }
            out.push(BASE62[(*b % 62) as usize] as char);
        }
    }
    out
}

/// CRC32 of prefix + body, as 6 base62 digits (62⁶ > 2³²). On the stack: every key parse runs it.
fn checksum(prefix_and_body: &str) -> [u8; CHECKSUM_CHARS] {
    let mut n = crc32fast::hash(prefix_and_body.as_bytes()) as u64;
    let mut digits = [b'0'; CHECKSUM_CHARS];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits
}

/// SHA-256 of a key: what stores and caches are keyed by. The key itself is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses `sha256:<64 hex>` or bare `<64 hex>`.
    pub fn parse(s: &str) -> Option<Self> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        // Either case decodes: no lowered copy per hash (a million of them in a large key file).
        hex::decode_to_slice(hex_part, &mut out).ok()?;
        Some(KeyHash(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell hashes apart in a log; the whole hash is never printed.
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_hash_is_always_the_keys_own() {
        // More keys than slots, each hashed while others overwrite slots: every answer is the
        // SHA-256 of the key asked about, first time or remembered.
        let keys: Vec<String> = (0..3 * RECENT_SLOTS)
            .map(|_| ApiKey::generate(KeyKind::Secret))
            .collect();
        for round in 0..2 {
            for k in keys.iter().chain(keys.iter().take(16)) {
                let parsed = ApiKey::parse(k).unwrap();
                assert_eq!(parsed.hash(), KeyHash::of(k), "round {round}");
                assert_eq!(parsed.hash(), KeyHash::of(k), "round {round}, remembered");
            }
        }
    }

    #[test]
    fn generated_keys_parse_and_carry_their_kind() {
        for kind in [KeyKind::Secret, KeyKind::Publishable] {
            let k = ApiKey::generate(kind);
            assert!(k.starts_with(kind.prefix()));
            assert_eq!(k.len(), 3 + BODY_CHARS + CHECKSUM_CHARS);
            let parsed = ApiKey::parse(&k).unwrap();
            assert_eq!(parsed.kind(), kind);
            assert_eq!(parsed.hash(), KeyHash::of(&k));
        }
        assert_ne!(
            ApiKey::generate(KeyKind::Secret),
            ApiKey::generate(KeyKind::Secret)
        );
    }

    #[test]
    fn malformed_keys_are_rejected() {
        let k = ApiKey::generate(KeyKind::Secret);
        assert_eq!(ApiKey::parse("ak_123").unwrap_err(), KeyFormatError::Prefix);
        assert_eq!(
            ApiKey::parse("sk_short").unwrap_err(),
            KeyFormatError::Shape
        );
        assert_eq!(
            ApiKey::parse(&format!("{k}!")).unwrap_err(),
            KeyFormatError::Shape
        );
        assert_eq!(
            ApiKey::parse(&k.replace("sk_", "SK_")).unwrap_err(),
            KeyFormatError::Prefix
        );
        // One mistyped character: the checksum catches it.
        let mut typo = k.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(ApiKey::parse(&typo).unwrap_err(), KeyFormatError::Checksum);
        // A secret key's body with a publishable prefix fails its checksum too.
        assert!(ApiKey::parse(&k.replacen("sk_", "pk_", 1)).is_err());
    }

    #[test]
    fn hashes_round_trip_through_text() {
        let h = KeyHash::of("sk_x");
        assert_eq!(KeyHash::parse(&h.to_hex()), Some(h));
        assert_eq!(
            KeyHash::parse(&format!("sha256:{}", h.to_hex().to_uppercase())),
            Some(h)
        );
        assert_eq!(KeyHash::parse("sha256:zz"), None);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }
}
