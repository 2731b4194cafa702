//! `gybc-authz keys …`: create, list, show, revoke and rotate API keys in the configured store,
//! and show a key's usage per hour.
//! A new key is printed once; nothing else ever prints a key or a whole hash.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use gybc_authz_engine::authn::apikey::KeyKind;
use gybc_authz_engine::config::{Config, ProcessEnv};
use gybc_authz_engine::ratelimit::RateLimit;
use gybc_authz_engine::store::admin::{AdminError, AdminStore, Created, KeyUsage, NewKey, Scope};
use gybc_authz_engine::store::{KeyRecord, KeyStatus};
use gybc_authz_engine::usage::Counts;
use serde_json::json;

#[derive(Args)]
pub struct KeysArgs {
    /// The daemon's config file: its `key_store` (and `redis`) section says where keys live.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/gybc-authz/config.yaml"
    )]
    config: PathBuf,
    /// `text` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Secret,
    Publishable,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a key, store its hash and metadata, print the key once.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        kind: Kind,
        /// A scope such as `users:impersonate`; repeatable.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// `<requests>/<window>`, e.g. `100/60s`; default: the daemon's `rate_limit.default`.
        #[arg(long, value_parser = parse_rate_limit)]
        rate_limit: Option<RateLimit>,
        /// RFC 3339 time after which the key is refused, e.g. `2027-01-31T00:00:00Z`.
        #[arg(long, value_parser = parse_time)]
        expires: Option<u64>,
        #[arg(long)]
        name: Option<String>,
        /// Publishable keys: an allowed browser origin; repeatable.
        #[arg(long = "allowed-origin")]
        allowed_origins: Vec<String>,
        /// Publishable keys: the JWT provider (config name) that signs the users' tokens.
        #[arg(long)]
        jwt_provider: Option<String>,
        /// Publishable keys: the Identity Platform tenant the users must belong to.
        #[arg(long)]
        identity_platform_tenant: Option<String>,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show one key's metadata.
    Show { id: String },
    /// Revoke a key; on Redis every replica drops it within a second.
    Revoke { id: String },
    /// Issue a new key with the same metadata; the old one keeps working for the grace period.
    Rotate {
        id: String,
        /// How long the old key keeps working, e.g. `24h`, `30m`, `0s`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        grace: Duration,
    },
    /// A key's decisions per hour (allowed, rate limited, denied), summed over every replica;
    /// needs the Redis key store.
    Usage {
        id: String,
        /// Start: an RFC 3339 time, or how long ago (`48h`, `7d`). Default: a day before --until.
        #[arg(long, value_parser = parse_when)]
        since: Option<u64>,
        /// End (excluded): an RFC 3339 time, or how long ago. Default: now.
        #[arg(long, value_parser = parse_when)]
        until: Option<u64>,
    },
}

fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    s.parse()
        .map_err(|e: gybc_authz_engine::ratelimit::RateLimitParseError| e.to_string())
}

fn parse_time(s: &str) -> Result<u64, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time: {e}"))?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("`{s}` is before 1970"))
}

/// An RFC 3339 time, or a duration meaning that long ago.
fn parse_when(s: &str) -> Result<u64, String> {
    if let Ok(t) = parse_time(s) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration like 48h"))?;
    Ok(now_secs().saturating_sub(ago.as_secs()))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 24h or 30m: {e}"))
}

pub async fn run(args: KeysArgs) -> ExitCode {
    let cfg = match Config::load(&args.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{}: {e}", args.config.display());
            return ExitCode::from(64);
        }
    };
    match execute(&cfg, args.command, args.output).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if args.output == Output::Json {
                println!(
                    "{}",
                    json!({ "error": e.to_string(), "exit_code": e.exit_code() })
                );
            }
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn execute(cfg: &Config, command: KeysCommand, output: Output) -> Result<(), AdminError> {
    if let KeysCommand::Create {
        jwt_provider: Some(p),
        ..
    } = &command
        && !cfg.jwt.providers.iter().any(|x| &x.name == p)
    {
        return Err(AdminError::Invalid(format!(
            "no JWT provider named `{p}` in the config"
        )));
    }
    let store = AdminStore::from_config(cfg).await?;
    match command {
        KeysCommand::Create {
            tenant,
            kind,
            scopes,
            rate_limit,
            expires,
            name,
            allowed_origins,
            jwt_provider,
            identity_platform_tenant,
        } => {
            let created = store
                .create(NewKey {
                    tenant,
                    kind: match kind {
                        Kind::Secret => KeyKind::Secret,
                        Kind::Publishable => KeyKind::Publishable,
                    },
                    scopes,
                    rate_limit,
                    expires_at: expires,
                    name,
                    allowed_origins,
                    jwt_provider,
                    identity_platform_tenant,
                })
                .await?;
            print_created(&created, output, None);
        }
        KeysCommand::List { tenant } => {
            let records: Vec<KeyRecord> = store
                .list()
                .await?
                .into_iter()
                .filter(|r| tenant.as_ref().is_none_or(|t| &r.tenant == t))
                .collect();
            match output {
                Output::Json => println!(
                    "{}",
                    json!({ "keys": records.iter().map(describe).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    println!(
                        "{:<22} {:<12} {:<20} {:<8} {:<10} {:<22} NAME",
                        "ID", "KIND", "TENANT", "STATUS", "HASH", "EXPIRES"
                    );
                    for r in &records {
                        println!(
                            "{:<22} {:<12} {:<20} {:<8} {:<10} {:<22} {}",
                            r.id,
                            r.kind.as_str(),
                            r.tenant,
                            status(r),
                            hash_prefix(r),
                            r.expires_at.map(time).unwrap_or_else(|| "-".into()),
                            r.name.as_deref().unwrap_or("")
                        );
                    }
                }
            }
        }
        KeysCommand::Show { id } => print_record(&store.get(&id).await?, output),
        KeysCommand::Revoke { id } => {
            let r = store.revoke(&id).await?;
            match output {
                Output::Json => println!("{}", json!({ "revoked": describe(&r) })),
                Output::Text => println!("Revoked {} (tenant {}).", r.id, r.tenant),
            }
        }
        KeysCommand::Rotate { id, grace } => {
            let (created, old) = store.rotate(&id, grace).await?;
            print_created(&created, output, Some(&old));
        }
        KeysCommand::Usage { id, since, until } => {
            let end = until.unwrap_or_else(now_secs);
            let start = since.unwrap_or(end.saturating_sub(24 * 3600));
            if start >= end {
                return Err(AdminError::Invalid("--since must be before --until".into()));
            }
            if end - start > store.usage_retention_secs() {
                return Err(AdminError::Invalid(format!(
                    "the range spans more than the {} days usage is kept",
                    store.usage_retention_secs() / 86_400
                )));
            }
            print_usage(&store.usage(Scope::All, &id, start, end).await?, output);
        }
    }
    Ok(())
}

fn status(r: &KeyRecord) -> &'static str {
    match r.status {
        KeyStatus::Active => "active",
        KeyStatus::Revoked => "revoked",
    }
}

/// Enough of the hash to tell keys apart; never the whole of it.
fn hash_prefix(r: &KeyRecord) -> String {
    format!("{}…", &r.hash.to_hex()[..8])
}

fn time(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn describe(r: &KeyRecord) -> serde_json::Value {
    json!({
        "id": r.id,
        "kind": r.kind.as_str(),
        "tenant": r.tenant,
        "status": status(r),
        "scopes": r.scopes,
        "rate_limit": r.rate_limit.map(|l| l.to_string()),
        "expires_at": r.expires_at.map(time),
        "name": r.name,
        "created_at": r.created_at.map(time),
        "allowed_origins": r.allowed_origins,
        "jwt_provider": r.jwt_provider,
        "identity_platform_tenant": r.identity_platform_tenant,
        "hash_prefix": &r.hash.to_hex()[..8],
    })
}

fn print_record(r: &KeyRecord, output: Output) {
    match output {
        Output::Json => println!("{}", describe(r)),
        Output::Text => {
            let d = describe(r);
            for (k, v) in d.as_object().expect("an object") {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{k:<26}{v}");
            }
        }
    }
}

fn print_usage(u: &KeyUsage, output: Output) {
    let counts = |c: &Counts| json!({ "allowed": c.allowed, "rate_limited": c.rate_limited, "denied": c.denied });
    match output {
        Output::Json => {
            let buckets: Vec<_> = u
                .buckets
                .iter()
                .map(|b| {
                    let mut v = counts(&b.counts);
                    v["start_time"] = time(b.hour_start).into();
                    v
                })
                .collect();
            println!(
                "{}",
                json!({
                    "id": u.id,
                    "start_time": time(u.start),
                    "end_time": time(u.end),
                    "buckets": buckets,
                    "total": counts(&u.total),
                })
            );
        }
        Output::Text => {
            println!(
                "{:<22} {:>12} {:>12} {:>12}",
                "HOUR (UTC)", "ALLOWED", "RATE_LIMITED", "DENIED"
            );
            let row = |label: &str, c: &Counts| {
                println!(
                    "{label:<22} {:>12} {:>12} {:>12}",
                    c.allowed, c.rate_limited, c.denied
                )
            };
            for b in &u.buckets {
                row(&time(b.hour_start), &b.counts);
            }
            row("TOTAL", &u.total);
            eprintln!(
                "Key {}, {} to {}; hours without decisions left out.",
                u.id,
                time(u.start),
                time(u.end)
            );
        }
    }
}

fn print_created(c: &Created, output: Output, replaced: Option<&KeyRecord>) {
    match output {
        Output::Json => {
            let mut v = json!({ "key": c.key, "record": describe(&c.record) });
            if let Some(old) = replaced {
                v["replaced"] = describe(old);
            }
            println!("{v}");
        }
        Output::Text => {
            println!("{}", c.key);
            eprintln!(
                "Created {} ({} key, tenant {}). The key above is shown only now: store it safely.",
                c.record.id,
                c.record.kind.as_str(),
                c.record.tenant
            );
            if let Some(old) = replaced {
                eprintln!(
                    "The old key {} keeps working until {}.",
                    old.id,
                    old.expires_at.map(time).unwrap_or_else(|| "-".into())
                );
            }
        }
    }
}
