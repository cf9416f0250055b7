//! What each route needs: the one table the API's guard consults. A route missing from it
//! needs an admin, so a route added without a line here is closed, not open.

use axum::http::Method;

use super::Role;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (liveness and readiness probes).
    Public,
    /// `/metrics`: public unless `coordinator.auth.metrics_public` is false, then a viewer.
    Metrics,
    /// At least this role.
    Role(Role),
}

/// Every route with what it needs (method, route pattern as axum matched it, access).
pub const ROUTES: &[(Method, &str, Access)] = &[
    (Method::GET, "/healthz", Access::Public),
    (Method::GET, "/readyz", Access::Public),
    (Method::GET, "/metrics", Access::Metrics),
    (
        Method::POST,
        "/v1/devices/import",
        Access::Role(Role::Admin),
    ),
    (Method::GET, "/v1/devices", Access::Role(Role::Viewer)),
    (Method::GET, "/v1/devices/count", Access::Role(Role::Viewer)),
    (Method::GET, "/v1/devices/{id}", Access::Role(Role::Viewer)),
    (
        Method::GET,
        "/v1/devices/{id}/jobs",
        Access::Role(Role::Viewer),
    ),
    (Method::PATCH, "/v1/devices/{id}", Access::Role(Role::Admin)),
    (
        Method::DELETE,
        "/v1/devices/{id}",
        Access::Role(Role::Admin),
    ),
    (Method::GET, "/v1/groups", Access::Role(Role::Viewer)),
    (Method::GET, "/v1/queries", Access::Role(Role::Viewer)),
    (
        Method::PUT,
        "/v1/queries/{name}",
        Access::Role(Role::Operator),
    ),
    (
        Method::DELETE,
        "/v1/queries/{name}",
        Access::Role(Role::Operator),
    ),
    (Method::POST, "/v1/jobs", Access::Role(Role::Operator)),
    (Method::GET, "/v1/jobs", Access::Role(Role::Viewer)),
    (Method::POST, "/v1/schedules", Access::Role(Role::Operator)),
    (Method::POST, "/v1/templates", Access::Role(Role::Operator)),
    (Method::GET, "/v1/templates", Access::Role(Role::Viewer)),
    (
        Method::GET,
        "/v1/templates/{name}",
        Access::Role(Role::Viewer),
    ),
    (
        Method::DELETE,
        "/v1/templates/{name}",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/templates/{name}/jobs",
        Access::Role(Role::Operator),
    ),
    (Method::GET, "/v1/schedules", Access::Role(Role::Viewer)),
    (
        Method::GET,
        "/v1/schedules/{id}",
        Access::Role(Role::Viewer),
    ),
    (
        Method::DELETE,
        "/v1/schedules/{id}",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/schedules/{id}/pause",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/schedules/{id}/resume",
        Access::Role(Role::Operator),
    ),
    (Method::GET, "/v1/jobs/{id}", Access::Role(Role::Viewer)),
    (Method::DELETE, "/v1/jobs/{id}", Access::Role(Role::Admin)),
    (
        Method::POST,
        "/v1/jobs/{id}/cancel",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/pause",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/resume",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/approve",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/rerun",
        Access::Role(Role::Operator),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/rollback",
        Access::Role(Role::Operator),
    ),
    (
        Method::GET,
        "/v1/jobs/{id}/devices",
        Access::Role(Role::Viewer),
    ),
    (
        Method::GET,
        "/v1/jobs/{id}/report",
        Access::Role(Role::Viewer),
    ),
    (
        Method::GET,
        "/v1/jobs/{id}/results",
        Access::Role(Role::Viewer),
    ),
    (
        Method::GET,
        "/v1/jobs/{id}/events",
        Access::Role(Role::Viewer),
    ),
    (Method::GET, "/v1/dlq", Access::Role(Role::Viewer)),
    (Method::POST, "/v1/dlq/replay", Access::Role(Role::Admin)),
    (Method::GET, "/v1/tokens", Access::Role(Role::Admin)),
    (Method::POST, "/v1/tokens", Access::Role(Role::Admin)),
    (Method::DELETE, "/v1/tokens/{id}", Access::Role(Role::Admin)),
    (Method::GET, "/v1/audit", Access::Role(Role::Admin)),
    (Method::GET, "/v1/whoami", Access::Role(Role::Viewer)),
    // The dashboard (`crate::dashboard`): its pages render only for a signed-in caller and
    // send anyone else to sign in; its actions are calls of the routes above.
    (Method::GET, "/", Access::Public),
    (Method::GET, "/ui/login", Access::Public),
    (Method::POST, "/ui/login", Access::Public),
    (Method::POST, "/ui/logout", Access::Public),
    (Method::GET, "/ui/oidc/start", Access::Public),
    (Method::GET, "/ui/oidc/callback", Access::Public),
    (Method::GET, "/ui/jobs", Access::Public),
    (Method::GET, "/ui/jobs/{id}", Access::Public),
    (Method::GET, "/ui/new", Access::Public),
    (Method::GET, "/ui/devices", Access::Public),
    (Method::GET, "/ui/devices/{id}", Access::Public),
    (Method::GET, "/ui/schedules", Access::Public),
    (Method::GET, "/ui/deadletters", Access::Public),
    (Method::GET, "/ui/tokens", Access::Public),
    (Method::GET, "/ui/audit", Access::Public),
    (Method::GET, "/ui/assets/{file}", Access::Public),
    // The API's description (`crate::api::openapi`): no secret in it.
    (Method::GET, "/openapi.json", Access::Public),
    (Method::GET, "/docs", Access::Public),
];

/// What `method` on the route pattern `route` needs; admin for anything not in [`ROUTES`].
pub fn access(method: &Method, route: &str) -> Access {
    ROUTES
        .iter()
        .find(|(m, r, _)| m == method && *r == route)
        .map_or(Access::Role(Role::Admin), |(_, _, a)| *a)
}

/// Whether a call changes state (and so is written to the audit log).
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_need_a_viewer_writes_an_operator_and_administration_an_admin() {
        assert_eq!(access(&Method::GET, "/healthz"), Access::Public);
        assert_eq!(
            access(&Method::GET, "/v1/jobs/{id}"),
            Access::Role(Role::Viewer)
        );
        assert_eq!(
            access(&Method::POST, "/v1/jobs"),
            Access::Role(Role::Operator)
        );
        assert_eq!(
            access(&Method::POST, "/v1/dlq/replay"),
            Access::Role(Role::Admin)
        );
        // A route nobody listed is closed to all but admins.
        assert_eq!(
            access(&Method::PUT, "/v1/something-new"),
            Access::Role(Role::Admin)
        );
    }

    #[test]
    fn every_write_is_audited_and_no_read_is() {
        assert!(changes_state(&Method::POST));
        assert!(changes_state(&Method::DELETE));
        assert!(!changes_state(&Method::GET));
    }

    #[test]
    fn roles_are_ordered_and_parse_from_their_names() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
