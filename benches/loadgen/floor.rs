//! The floor: a no-op ext_authz server, the cost every server pays before deciding anything.

use super::*;

/// The floor: always allows. `gybc_headers` picks the answer's size (see `Cmd::Noop`).
pub(crate) struct Noop {
    pub(crate) answer: CheckResponse,
}

pub(crate) fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

impl Noop {
    pub(crate) fn new(gybc_headers: bool) -> Self {
        let ok = if gybc_headers {
            OkHttpResponse {
                headers: vec![
                    overwrite("x-tenant-id", "tenant-bench"),
                    overwrite("x-auth-method", "api_key"),
                    overwrite("x-api-key-id", "key_bench"),
                    overwrite("x-scopes", "threads:read"),
                ],
                headers_to_remove: [
                    "x-user-id",
                    "x-impersonated-by",
                    "x-api-key",
                    "x-on-behalf-of",
                ]
                .map(String::from)
                .to_vec(),
                response_headers_to_add: vec![
                    overwrite("x-ratelimit-limit", "1000000000"),
                    overwrite("x-ratelimit-remaining", "999999999"),
                    overwrite("x-ratelimit-reset", "1800000000"),
                ],
                ..Default::default()
            }
        } else {
            OkHttpResponse {
                headers: vec![overwrite("x-noop", "1")],
                ..Default::default()
            }
        };
        Self {
            answer: CheckResponse {
                status: Some(RpcStatus {
                    code: 0,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::OkResponse(ok)),
                ..Default::default()
            },
        }
    }
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // A clone, as a real server builds its answer per request.
        Ok(tonic::Response::new(self.answer.clone()))
    }
}

pub(crate) async fn serve_noop(addr: SocketAddr, gybc_headers: bool) -> Res<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("LISTENING {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Same transport settings as the daemon (src/app.rs): TCP_NODELAY, default tonic server.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Noop::new(gybc_headers)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
