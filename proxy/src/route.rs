//! Routes: which configured route a path belongs to, the upstream URI it maps to, and the pool a
//! request takes its lease on.

use std::{collections::BTreeMap, sync::Arc};

use http::{HeaderMap, Uri, uri::PathAndQuery};

use crate::{
    config::RouteConfig,
    fingerprint::Fingerprinter,
    refusal::{Reason, Refusal},
};

/// One validated route.
#[derive(Debug)]
pub struct Route {
    /// Its name (metric label).
    pub name: String,
    /// Its configuration.
    pub cfg: RouteConfig,
    /// The prefix without a trailing `/`.
    prefix: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The upstream's base path without a trailing `/`.
    base_path: String,
}

impl Route {
    /// Builds a route from a validated configuration.
    pub fn new(name: &str, cfg: &RouteConfig) -> Route {
        let uri: Uri = cfg.upstream.parse().expect("validated upstream");
        let parts = uri.into_parts();
        Route {
            name: name.to_owned(),
            prefix: cfg.normalized_prefix(),
            scheme: parts.scheme.expect("validated scheme"),
            authority: parts.authority.expect("validated authority"),
            base_path: parts
                .path_and_query
                .map(|p| p.path().trim_end_matches('/').to_owned())
                .unwrap_or_default(),
            cfg: cfg.clone(),
        }
    }

    /// The rest of `path` after this route's prefix, when it matches on a segment boundary.
    fn rest<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.prefix.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    /// The upstream URI for a request to `uri` (which this route matched).
    pub fn upstream_uri(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let rest = self.rest(uri.path()).unwrap_or("");
        let mut pq = format!("{}{}", self.base_path, rest);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = uri.query() {
            pq.push('?');
            pq.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(pq)?)
            .build()
    }

    /// The upstream's authority (for `Host`).
    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// The pool for a request: `x-slotd-pool` (already checked against `allowed_pools`), else the
    /// credential's pool, else the route's pool.
    pub fn pool(
        &self,
        header_pool: Option<String>,
        headers: &HeaderMap,
        fingerprinter: Option<&Fingerprinter>,
    ) -> Result<String, Refusal> {
        if let Some(p) = header_pool {
            return Ok(p);
        }
        if !self.cfg.credential_pools.is_empty()
            && let Some(f) = fingerprinter
            && let Some(fp) = f.of_request(headers)
            && let Some(pool) = self.cfg.credential_pools.get(&fp)
        {
            tracing::debug!(route = %self.name, fingerprint = %fp, pool = %pool, "pool chosen by credential");
            return Ok(pool.clone());
        }
        self.cfg.pool.clone().ok_or_else(|| {
            Refusal::new(Reason::UnknownCredential, "no pool is configured for this credential on this route")
        })
    }
}

/// Every route, matched longest prefix first.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Arc<Route>>,
}

impl Routes {
    /// The routes of a validated configuration.
    pub fn new(cfg: &BTreeMap<String, RouteConfig>) -> Routes {
        let mut routes: Vec<Arc<Route>> = cfg.iter().map(|(n, r)| Arc::new(Route::new(n, r))).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Routes { routes }
    }

    /// The route serving `path`.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.rest(path).is_some())
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn prefix_on_segment_boundaries_and_base_paths() {
        let mut cfg = Config::default_config();
        cfg.routes.get_mut("openai").unwrap().upstream = "http://127.0.0.1:9/v1/".into();
        let routes = Routes::new(&cfg.routes);
        let r = routes.find("/openai/chat/completions").unwrap();
        assert_eq!(r.name, "openai");
        let uri: Uri = "/openai/chat/completions?x=1".parse().unwrap();
        assert_eq!(r.upstream_uri(&uri).unwrap(), "http://127.0.0.1:9/v1/chat/completions?x=1");
        assert!(routes.find("/openaix/chat").is_none());
        let a = routes.find("/anthropic/v1/messages").unwrap();
        let uri: Uri = "/anthropic/v1/messages".parse().unwrap();
        assert_eq!(a.upstream_uri(&uri).unwrap(), "https://api.anthropic.com/v1/messages");
        let uri: Uri = "/anthropic".parse().unwrap();
        assert_eq!(a.upstream_uri(&uri).unwrap(), "https://api.anthropic.com/");
    }
}
