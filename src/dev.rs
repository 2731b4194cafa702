//! Dev mode: everything needed to try the daemon with nothing else running. A fresh RSA signing
//! key served as the dev provider's JWKS, a demo secret key (with `users:impersonate`), a
//! publishable key, and a user JWT with a tenant claim. All of it lives only in memory.

use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use gybc_authz_engine::authn::apikey::{ApiKey, KeyKind};
use gybc_authz_engine::clock::{Clock, SystemClock};
use gybc_authz_engine::config::{Config, KeySourceConfig, ProviderConfig};
use gybc_authz_engine::policy::impersonation::IMPERSONATE_SCOPE;
use gybc_authz_engine::store::{FileStore, KeyRecord, KeyStatus};

pub const DEV_PROVIDER: &str = "dev";
pub const DEV_PROJECT: &str = "gybc-dev";
pub const DEV_TENANT: &str = "dev-tenant";
pub const DEV_USER: &str = "dev-user";
const DEV_KID: &str = "dev-key-1";
/// The dev JWT's lifetime.
const DEV_TOKEN_SECS: u64 = 12 * 3600;

/// Credentials minted for this run; printed once.
pub struct DevCredentials {
    pub secret_key: String,
    pub publishable_key: String,
    pub user_jwt: String,
}

pub struct DevSetup {
    pub credentials: DevCredentials,
    pub store: Arc<FileStore>,
    /// What `store` was built from: dev mode's key service starts from them.
    pub records: Vec<KeyRecord>,
    pub jwks_json: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
#[error("dev mode setup failed: {0}")]
pub struct DevError(String);

/// A signing key with its JWKS: for dev mode, tests and benchmarks.
pub struct SigningKey {
    pub kid: String,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    pub fn generate(kid: &str) -> Result<Self, DevError> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|e| DevError(e.to_string()))?;
        let pkcs8 = pair.as_der().map_err(|e| DevError(e.to_string()))?;
        let pem = pem_wrap("PRIVATE KEY", pkcs8.as_ref());
        let encoding =
            EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| DevError(e.to_string()))?;
        let public = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let jwk = serde_json::json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(&public.n),
            "e": URL_SAFE_NO_PAD.encode(&public.e),
        });
        Ok(Self {
            kid: kid.to_owned(),
            encoding,
            jwk,
        })
    }

    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// `{"keys": [...]}` for these keys.
    pub fn jwks(keys: &[&SigningKey]) -> String {
        serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
            .to_string()
    }

    /// Signs `claims` with RS256 and this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_as(Some(&self.kid), claims)
    }

    /// Signs with this key but puts `kid` (or none) in the header: for tests of kid games.
    pub fn sign_as(&self, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .expect("RS256 signing with a valid key")
    }
}

fn pem_wrap(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Firebase-shaped claims for `project`.
pub fn firebase_claims(
    project: &str,
    sub: &str,
    tenant: Option<&str>,
    now: u64,
    lifetime: u64,
) -> serde_json::Value {
    let mut c = serde_json::json!({
        "iss": format!("https://securetoken.google.com/{project}"),
        "aud": project,
        "sub": sub,
        "user_id": sub,
        "iat": now,
        "auth_time": now,
        "exp": now + lifetime,
        "firebase": { "sign_in_provider": "password" },
    });
    if let Some(t) = tenant {
        c["tenant_id"] = serde_json::Value::String(t.to_owned());
    }
    c
}

/// Mints the dev credentials and points `cfg` at them: the dev provider becomes the default.
pub fn setup(cfg: &mut Config) -> Result<DevSetup, DevError> {
    let signing = SigningKey::generate(DEV_KID)?;
    let jwks_json: Arc<str> = SigningKey::jwks(&[&signing]).into();
    cfg.jwt.providers.retain(|p| p.name != DEV_PROVIDER);
    cfg.jwt.providers.insert(
        0,
        ProviderConfig {
            name: DEV_PROVIDER.into(),
            project_id: DEV_PROJECT.into(),
            tenant_claim: "tenant_id".into(),
            keys: KeySourceConfig::Inline {
                json: jwks_json.to_string(),
            },
        },
    );
    cfg.jwt.default_provider = Some(DEV_PROVIDER.into());

    let now = SystemClock.now_secs();
    let secret_key = ApiKey::generate(KeyKind::Secret);
    let publishable_key = ApiKey::generate(KeyKind::Publishable);
    let record = |id: &str, key: &str, kind: KeyKind, scopes: Vec<String>| KeyRecord {
        id: id.into(),
        hash: gybc_authz_engine::authn::apikey::KeyHash::of(key),
        kind,
        tenant: DEV_TENANT.into(),
        scopes,
        rate_limit: None,
        status: KeyStatus::Active,
        expires_at: None,
        name: Some(format!("dev {}", kind.as_str())),
        created_at: Some(now),
        allowed_origins: vec![],
        jwt_provider: (kind == KeyKind::Publishable).then(|| DEV_PROVIDER.into()),
        identity_platform_tenant: None,
    };
    let records = vec![
        record(
            "key_dev_secret",
            &secret_key,
            KeyKind::Secret,
            vec![IMPERSONATE_SCOPE.into()],
        ),
        record(
            "key_dev_publishable",
            &publishable_key,
            KeyKind::Publishable,
            vec![],
        ),
    ];
    let store = Arc::new(FileStore::from_records(records.clone()));
    let user_jwt = signing.sign(&firebase_claims(
        DEV_PROJECT,
        DEV_USER,
        Some(DEV_TENANT),
        now,
        DEV_TOKEN_SECS,
    ));
    Ok(DevSetup {
        credentials: DevCredentials {
            secret_key,
            publishable_key,
            user_jwt,
        },
        store,
        records,
        jwks_json,
    })
}

/// The banner `serve --dev` prints once, with commands that work as printed: the key service's
/// path and the identity headers it trusts are the configured ones.
pub fn banner(
    c: &DevCredentials,
    exe: &str,
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    key_service: std::net::SocketAddr,
    cfg: &Config,
) -> String {
    format!(
        concat!(
            "\n",
            "gybc-authz dev mode: demo credentials (valid until this process exits; shown only here)\n",
            "\n",
            "  tenant           {tenant}\n",
            "  secret key       {sk}\n",
            "  publishable key  {pk}\n",
            "  user JWT         {jwt}\n",
            "\n",
            "  gRPC ext_authz   {grpc}\n",
            "  HTTP             http://{http}/readyz   (dev JWKS: http://{http}/dev/jwks.json)\n",
            "\n",
            "Try them (each prints the decision as Envoy would receive it):\n",
            "  {exe} check --addr {grpc} -H 'x-api-key: {sk}'\n",
            "  {exe} check --addr {grpc} -H 'x-api-key: {sk}' -H 'x-on-behalf-of: user_123'\n",
            "  {exe} check --addr {grpc} -H 'authorization: Bearer {jwt}'\n",
            "  {exe} check --addr {grpc} -H 'x-api-key: {pk}' -H 'authorization: Bearer {jwt}'\n",
            "\n",
            "Create a key with the key service (docs/key-service.md). Here it has no Envoy and no gybc-authz\n",
            "in front, so the identity headers they would set are given by hand: dev mode only, on loopback.\n",
            "  curl -sS -X POST http://{ks}{prefix}/create-key -H 'content-type: application/json' -H '{method_h}: jwt' -H '{tenant_h}: {tenant}' -H '{user_h}: {user}' -d '{{\"kind\": \"KEY_KIND_SECRET\", \"name\": \"my first key\"}}'\n",
            "\n",
        ),
        tenant = DEV_TENANT,
        user = DEV_USER,
        ks = key_service,
        prefix = cfg.key_service.path_prefix.trim_end_matches('/'),
        method_h = cfg.headers.auth_method,
        tenant_h = cfg.headers.tenant_id,
        user_h = cfg.headers.user_id,
        exe = exe,
        grpc = grpc,
        http = http,
        sk = c.secret_key,
        pk = c.publishable_key,
        jwt = c.user_jwt,
    )
}
