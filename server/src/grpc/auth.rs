//! Bearer-token authentication, one token per service: `authorization: Bearer <token>` metadata is
//! checked by a tonic interceptor before any handler runs, so a refused call changes nothing.
//!
//! - no `authorization` metadata (or not a `Bearer` one) -> UNAUTHENTICATED
//! - a token that is not this service's (an agent token on the admin service included) -> PERMISSION_DENIED
//!
//! With high availability the same interceptor answers every call on a standby with UNAVAILABLE and
//! the leader's address (see [`crate::ha`]).
//!
//! A service whose token is not configured is open; [`crate::serve`] refuses to listen beyond
//! loopback in that case unless `allow_insecure_remote` is set.

use slotd_proto::AUTHORIZATION_HEADER;
use tonic::{Request, Status, service::Interceptor};

pub use crate::token::Token;

/// The interceptor for one service: requires its token when one is configured.
#[derive(Clone, Debug)]
pub struct RequireToken {
    token: Option<Token>,
    service: &'static str,
    /// With high availability: only the leader serves (see [`crate::ha`]).
    role: Option<crate::ha::RoleReader>,
}

impl RequireToken {
    /// Requires `token` (when `Some`) on calls to `service` (named in refusals).
    pub fn new(token: Option<Token>, service: &'static str) -> Self {
        Self { token, service, role: None }
    }

    /// Also refuses every call while this member is not the leader (UNAVAILABLE + `slotd-leader`).
    pub fn with_role(mut self, role: Option<crate::ha::RoleReader>) -> Self {
        self.role = role;
        self
    }

    /// The agent service's check (`slotd.v1.Slotd`).
    pub fn agent(token: Option<Token>) -> Self {
        Self::new(token, "slotd.v1.Slotd")
    }

    /// The admin service's check (`slotd.v1.Admin`). Wrap the admin server with
    /// `AdminServer::with_interceptor(service, RequireToken::admin(cfg.admin_token.clone()))`.
    pub fn admin(token: Option<Token>) -> Self {
        Self::new(token, "slotd.v1.Admin")
    }

    /// Checks one call's metadata.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        let Some(value) = req.metadata().get(AUTHORIZATION_HEADER) else {
            return Err(Status::unauthenticated(format!(
                "{} requires `authorization: Bearer <token>` metadata",
                self.service
            )));
        };
        let presented = value.as_bytes();
        let token = match presented.split_first_chunk::<7>() {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
            _ => {
                return Err(Status::unauthenticated(format!(
                    "{}: authorization metadata must be `Bearer <token>`",
                    self.service
                )));
            }
        };
        if want.matches(token) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{}: token not accepted", self.service)))
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(&req)?;
        if let Some(role) = &self.role {
            role.admit()?;
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn call(check: &RequireToken, auth: Option<&str>) -> Result<(), Code> {
        let mut req = Request::new(());
        if let Some(a) = auth {
            req.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        check.check(&req).map_err(|s| s.code())
    }

    #[test]
    fn refusals_have_the_right_codes() {
        let c = RequireToken::agent(Some(Token::new("s3cret\n").unwrap()));
        assert_eq!(call(&c, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&c, Some("bearer s3cret")), Ok(()));
        assert_eq!(call(&c, None), Err(Code::Unauthenticated));
        assert_eq!(call(&c, Some("Basic abc")), Err(Code::Unauthenticated));
        assert_eq!(call(&c, Some("Bearer")), Err(Code::Unauthenticated));
        assert_eq!(call(&c, Some("Bearer s3cre")), Err(Code::PermissionDenied));
        assert_eq!(call(&c, Some("Bearer s3cret2")), Err(Code::PermissionDenied));
        assert_eq!(call(&RequireToken::agent(None), None), Ok(()));
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(Token::new("  ").is_err());
        assert!(Token::new("a b").is_err());
        let t = Token::new("abc").unwrap();
        assert!(!format!("{t:?}").contains("abc"));
        assert!(t.matches(b"abc") && !t.matches(b"abd") && !t.matches(b"ab") && !t.matches(b""));
    }
}
