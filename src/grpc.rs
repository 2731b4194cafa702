//! The ext_authz gRPC adapter: CheckRequest → RequestContext → decide → CheckResponse. No decision
//! logic lives here; a gRPC error means Envoy sent something that is not an HTTP check.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use crate::authorize::Authorizer;
use crate::config::LimitsConfig;
use crate::observe::Observer;
use crate::request::RequestContext;
use crate::response::Responder;

pub struct AuthzService {
    pub authorizer: Arc<Authorizer>,
    pub responder: Arc<Responder>,
    pub limits: LimitsConfig,
    pub observer: Arc<Observer>,
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let ctx = RequestContext::from_check(request.get_ref(), &self.limits)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let decision = self.authorizer.decide(&ctx).await;
        let response = self.responder.build(&decision);
        self.observer.decision(&ctx, &decision, started.elapsed());
        Ok(Response::new(response))
    }
}
