//! Fixtures: keys, key files and signed tokens the scenarios use, written once per suite.

use super::*;

/// Keys and tokens the daemon under test knows, shared by `suite` and `run`.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct Fixtures {
    pub(crate) secret_key: String,
    pub(crate) publishable_key: String,
    /// `sk_` with a limit of 1 per 30 days: over its limit after the first request.
    pub(crate) limited_key: String,
    /// Valid user JWTs with the tenant claim (scenario c, d).
    pub(crate) tokens: Vec<String>,
    /// Distinct JWTs, each sent once (scenario e).
    pub(crate) unique_tokens: Vec<String>,
    /// A JWT with a known kid and a broken signature.
    pub(crate) bad_token: String,
    /// Seed of the deterministic key set (`keyset_key`).
    pub(crate) key_seed: u64,
}

pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// CRC32 of prefix and body as 6 base62 digits, most significant first: the key format's checksum.
pub(crate) fn key_checksum(prefix_and_body: &str) -> String {
    let mut n = crc32fast::hash(prefix_and_body.as_bytes()) as u64;
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits.to_vec()).expect("ASCII")
}

/// The `i`-th well-formed `sk_` key of the set `seed`. Deterministic, so the key file and the load
/// generator agree on a million keys without either storing them.
pub(crate) fn keyset_key(seed: u64, i: u64) -> String {
    let mut state = seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut out = String::with_capacity(41);
    out.push_str("sk_");
    while out.len() < 35 {
        let mut r = splitmix(&mut state);
        for _ in 0..10 {
            if out.len() == 35 {
                break;
            }
            out.push(BASE62[(r % 62) as usize] as char);
            r /= 62;
        }
    }
    let sum = key_checksum(&out);
    out.push_str(&sum);
    out
}

pub(crate) fn hash_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A JSON key file: the named keys, then `n` keys of the deterministic set (ids `ks<i>`).
pub(crate) fn write_key_file(path: &Path, fx: &Fixtures, n: u64) -> Res<()> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    w.write_all(b"{\"keys\":[\n")?;
    let named = [
        (
            "key_secret",
            &fx.secret_key,
            "secret",
            format!(r#","scopes":["threads:read"],"rate_limit":"{HIGH_LIMIT}""#),
        ),
        (
            "key_app",
            &fx.publishable_key,
            "publishable",
            format!(r#","rate_limit":"{HIGH_LIMIT}""#),
        ),
        (
            "key_limited",
            &fx.limited_key,
            "secret",
            r#","rate_limit":"1/30d""#.to_owned(),
        ),
    ];
    for (i, (id, key, kind, extra)) in named.iter().enumerate() {
        let sep = if i == 0 { "" } else { ",\n" };
        write!(
            w,
            r#"{sep}{{"id":"{id}","hash":"sha256:{}","kind":"{kind}","tenant":"{TENANT}"{extra}}}"#,
            hash_hex(key)
        )?;
    }
    for i in 0..n {
        let key = keyset_key(fx.key_seed, i);
        write!(
            w,
            ",\n{{\"id\":\"ks{i}\",\"hash\":\"sha256:{}\",\"kind\":\"secret\",\"tenant\":\"{TENANT}\"}}",
            hash_hex(&key)
        )?;
    }
    w.write_all(b"\n]}\n")?;
    w.flush()?;
    Ok(())
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Mints the signing key, the JWKS file and every credential; RSA signing of the unique tokens
/// runs on every core.
pub(crate) fn make_fixtures(dir: &Path, unique: usize) -> Res<(Fixtures, Arc<SigningKey>)> {
    let key = Arc::new(SigningKey::generate("bench-1").map_err(|e| e.to_string())?);
    std::fs::write(dir.join("jwks.json"), SigningKey::jwks(&[&key]))?;
    let now = now_secs();
    let token = |sub: &str| key.sign(&firebase_claims(PROJECT, sub, Some(TENANT), now, 6 * 3600));
    let tokens: Vec<String> = (0..TOKEN_POOL)
        .map(|i| token(&format!("user-{i}")))
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = unique.div_ceil(threads).max(1);
    let unique_tokens: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let key = key.clone();
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(unique))
                        .map(|i| {
                            key.sign(&firebase_claims(
                                PROJECT,
                                &format!("unique-{i}"),
                                Some(TENANT),
                                now,
                                6 * 3600,
                            ))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("minting thread"))
            .collect()
    });
    // Same header and claims, last signature characters changed: a signature failure.
    let mut bad = tokens[0].clone().into_bytes();
    let n = bad.len();
    for b in &mut bad[n - 8..] {
        *b = if *b == b'A' { b'B' } else { b'A' };
    }
    let mut seed = now ^ 0x5EED;
    let fx = Fixtures {
        secret_key: ApiKey::generate(gybc_authz_engine::authn::apikey::KeyKind::Secret),
        publishable_key: ApiKey::generate(gybc_authz_engine::authn::apikey::KeyKind::Publishable),
        limited_key: ApiKey::generate(gybc_authz_engine::authn::apikey::KeyKind::Secret),
        tokens,
        unique_tokens,
        bad_token: String::from_utf8(bad)?,
        key_seed: splitmix(&mut seed),
    };
    for i in [0, 1, 999_999] {
        let k = keyset_key(fx.key_seed, i);
        ApiKey::parse(&k).map_err(|e| format!("generated key {k} does not parse: {e}"))?;
        assert_eq!(ApiKey::parse(&k)?.hash(), KeyHash::of(&k));
    }
    std::fs::write(dir.join("fixtures.json"), serde_json::to_vec(&fx)?)?;
    Ok((fx, key))
}
