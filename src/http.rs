//! HTTP on the WebSocket port: parsing a request head, choosing its route, writing responses.
//!
//! Pure functions only; the reactor feeds them bytes and writes what they return. Every request
//! is answered with `Connection: close`: the routes are for health checks, scrapes and upgrades,
//! none of which gains from keep-alive.

use std::fmt::Write as _;

use crate::protocol::is_valid_id;

/// What a complete request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A valid WebSocket upgrade to `/chat/{room}`; `accept` is the `Sec-WebSocket-Accept` value.
    Upgrade {
        /// The room of the path.
        room: String,
        /// The computed accept key.
        accept: String,
        /// The `token` query parameter, if any.
        token: Option<String>,
        /// The `Origin` header, if any (browsers send it).
        origin: Option<String>,
    },
    /// `GET /`: the chat page.
    ChatPage,
    /// `GET /dashboard`: the live node dashboard.
    Dashboard,
    /// `GET /health`.
    Health,
    /// `GET /ready`.
    Ready,
    /// `GET /metrics`.
    Metrics,
    /// `GET /api/rooms/{room}/presence`, with the `token` query parameter if any.
    Presence {
        /// The room.
        room: String,
        /// The `token` query parameter.
        token: Option<String>,
    },
    /// A history or analytics query for the store. A room's history (which the chat page
    /// uses) follows the room's token; the others are operator routes.
    Api {
        /// What to ask.
        query: crate::store::query::ApiQuery,
        /// The `token` query parameter.
        token: Option<String>,
    },
    /// Anything else: an error response.
    Error(Status, String),
}

/// The HTTP statuses the server writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Ok,
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 405 (with `Allow: GET`).
    MethodNotAllowed,
    /// 408.
    RequestTimeout,
    /// 426 (with `Sec-WebSocket-Version: 13`).
    UpgradeRequired,
    /// 431.
    HeadersTooLarge,
    /// 503.
    Unavailable,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::UpgradeRequired => 426,
            Status::HeadersTooLarge => 431,
            Status::Unavailable => 503,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Unauthorized => "Unauthorized",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::UpgradeRequired => "Upgrade Required",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::Unavailable => "Service Unavailable",
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// What to do.
    pub route: Route,
    /// True for HEAD requests (answer without a body).
    pub head_only: bool,
    /// Bytes of the buffer the head used; what follows belongs to the WebSocket.
    pub len: usize,
}

/// Most headers read from one request.
const MAX_HEADERS: usize = 48;

/// Parses `buf` as an HTTP/1.1 request head. `Ok(None)` means it is not complete yet.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed HTTP request: {e}")),
    };
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("/");
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let route = route(method, path, req.version.unwrap_or(0), &header);
    Ok(Some(Head {
        route,
        head_only: method == "HEAD",
        len,
    }))
}

fn has_token(value: Option<String>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Chooses the route for a request. `header` looks a header up by name (case-insensitive).
pub fn route(
    method: &str,
    target: &str,
    version: u8,
    header: &dyn Fn(&str) -> Option<String>,
) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let get = matches!(method, "GET" | "HEAD");
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let wrong_method = || {
        Route::Error(
            Status::MethodNotAllowed,
            format!("{method} is not allowed on {path}; use GET"),
        )
    };

    match segments.as_slice() {
        ["chat", room] => {
            if !is_valid_id(room) {
                return Route::Error(
                    Status::BadRequest,
                    "roomId must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'".into(),
                );
            }
            if method == "HEAD" {
                // Answered like a GET that is not an upgrade.
                return Route::Error(
                    Status::UpgradeRequired,
                    "this path is a WebSocket endpoint: send an RFC 6455 upgrade".into(),
                );
            }
            if method != "GET" {
                return wrong_method();
            }
            if version != 1 {
                return Route::Error(
                    Status::BadRequest,
                    "WebSocket upgrades need HTTP/1.1".into(),
                );
            }
            if !has_token(header("upgrade"), "websocket")
                || !has_token(header("connection"), "upgrade")
            {
                return Route::Error(
                    Status::UpgradeRequired,
                    "this path is a WebSocket endpoint: send an RFC 6455 upgrade".into(),
                );
            }
            if header("sec-websocket-version").as_deref().map(str::trim) != Some("13") {
                return Route::Error(
                    Status::UpgradeRequired,
                    "only WebSocket version 13 is supported".into(),
                );
            }
            let Some(key) = header("sec-websocket-key") else {
                return Route::Error(Status::BadRequest, "Sec-WebSocket-Key is missing".into());
            };
            let key = key.trim();
            // A valid key is 16 random bytes in base64: 24 characters ending in "==".
            if key.len() != 24 || !key.ends_with("==") {
                return Route::Error(
                    Status::BadRequest,
                    "Sec-WebSocket-Key is not a 16-byte base64 value".into(),
                );
            }
            Route::Upgrade {
                room: (*room).to_string(),
                accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
                token: crate::auth::query_param(query, "token").map(str::to_string),
                origin: header("origin"),
            }
        }
        [""] if get => Route::ChatPage,
        ["dashboard"] if get => Route::Dashboard,
        ["health"] if get => Route::Health,
        ["ready"] if get => Route::Ready,
        ["metrics"] if get => Route::Metrics,
        [""] | ["dashboard"] | ["health"] | ["ready"] | ["metrics"] => wrong_method(),
        ["api", rest @ ..] => {
            let token = crate::auth::query_param(query, "token").map(str::to_string);
            api_route(rest, query, get, token, wrong_method)
        }
        _ => Route::Error(Status::NotFound, format!("no route for {path}")),
    }
}

fn api_route(
    rest: &[&str],
    query: &str,
    get: bool,
    token: Option<String>,
    wrong_method: impl Fn() -> Route,
) -> Route {
    let parsed = crate::store::query::parse(rest, query);
    if !get && !matches!(parsed, Err((Status::NotFound, _))) {
        return wrong_method();
    }
    match parsed {
        Ok(None) => match rest {
            [_, room, _] => Route::Presence {
                room: (*room).to_string(),
                token,
            },
            _ => Route::Error(Status::NotFound, "no such route".into()),
        },
        Ok(Some(query)) => Route::Api { query, token },
        Err((status, message)) => Route::Error(status, message),
    }
}

/// A complete response with `Connection: close`.
pub fn response(status: Status, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = String::with_capacity(160 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        status.code(),
        status.reason(),
        body.len()
    );
    match status {
        Status::MethodNotAllowed => out.push_str("Allow: GET, HEAD\r\n"),
        Status::UpgradeRequired => {
            out.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n")
        }
        _ => {}
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    out.into_bytes()
}

/// A JSON error response: `{"error": "..."}` on one line.
pub fn error_response(status: Status, message: &str, head_only: bool) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    response(status, "application/json", &body, head_only)
}

/// The `101 Switching Protocols` answer to an upgrade.
pub fn upgrade_response(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::query::ApiQuery;

    fn head(text: &str) -> Route {
        match parse_head(text.as_bytes()) {
            Ok(Some(h)) => h.route,
            other => panic!("not complete: {other:?}"),
        }
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade(path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        )
    }

    #[test]
    fn upgrade_gets_the_rfc_accept_key() {
        assert_eq!(
            head(&upgrade("/chat/room_1-a?token=x")),
            Route::Upgrade {
                room: "room_1-a".into(),
                // The example of RFC 6455 §1.3.
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
                token: Some("x".into()),
                origin: None,
            }
        );
    }

    #[test]
    fn bad_rooms_and_plain_gets_are_refused() {
        let long = format!("/chat/{}", "a".repeat(65));
        for path in ["/chat/a.b", "/chat/%20", long.as_str()] {
            assert!(
                matches!(head(&upgrade(path)), Route::Error(Status::BadRequest, _)),
                "{path}"
            );
        }
        assert!(matches!(
            head(&upgrade("/chat/")),
            Route::Error(Status::BadRequest, _)
        ));
        assert!(matches!(
            head(&upgrade(&format!("/chat/{}", "a".repeat(64)))),
            Route::Upgrade { .. }
        ));
        assert!(matches!(
            head("GET /chat/7 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Error(Status::UpgradeRequired, _)
        ));
        let old = upgrade("/chat/7").replace("Version: 13", "Version: 8");
        assert!(matches!(
            head(&old),
            Route::Error(Status::UpgradeRequired, _)
        ));
        let nokey = upgrade("/chat/7").replace(KEY, "short");
        assert!(matches!(head(&nokey), Route::Error(Status::BadRequest, _)));
        let post = upgrade("/chat/7").replace("GET", "POST");
        assert!(matches!(
            head(&post),
            Route::Error(Status::MethodNotAllowed, _)
        ));
    }

    #[test]
    fn routes() {
        let get = |p: &str| head(&format!("GET {p} HTTP/1.1\r\n\r\n"));
        assert_eq!(get("/"), Route::ChatPage);
        assert_eq!(get("/dashboard"), Route::Dashboard);
        assert_eq!(get("/health"), Route::Health);
        assert_eq!(get("/ready"), Route::Ready);
        assert_eq!(get("/metrics"), Route::Metrics);
        assert_eq!(
            get("/api/rooms/7/presence?token=t"),
            Route::Presence {
                room: "7".into(),
                token: Some("t".into())
            }
        );
        assert!(matches!(
            get("/api/rooms/7/messages?limit=5"),
            Route::Api {
                query: ApiQuery::RoomMessages { limit: 5, .. },
                ..
            }
        ));
        assert!(matches!(
            get("/api/users/5/rooms"),
            Route::Api {
                query: ApiQuery::UserRooms { user: 5 },
                ..
            }
        ));
        assert!(matches!(
            get("/api/active-users"),
            Route::Api {
                query: ApiQuery::ActiveUsers { .. },
                ..
            }
        ));
        assert!(matches!(
            get("/api/nope"),
            Route::Error(Status::NotFound, _)
        ));
        assert!(matches!(
            get("/api/rooms/a.b/presence"),
            Route::Error(Status::BadRequest, _)
        ));
        assert!(matches!(
            get("/api/rooms/a.b/messages"),
            Route::Error(Status::BadRequest, _)
        ));
        for user in ["abc", "0", "100001", "-1", "1.5", ""] {
            let path = format!("/api/users/{user}/messages");
            assert!(
                matches!(get(&path), Route::Error(Status::BadRequest, _)),
                "{path}"
            );
        }
        assert!(matches!(
            get("/api/users/100000/rooms"),
            Route::Api {
                query: ApiQuery::UserRooms { user: 100000 },
                ..
            }
        ));
        assert!(matches!(
            head("HEAD /chat/7 HTTP/1.1\r\n\r\n"),
            Route::Error(Status::UpgradeRequired, _)
        ));
        assert!(matches!(
            head("DELETE /health HTTP/1.1\r\n\r\n"),
            Route::Error(Status::MethodNotAllowed, _)
        ));
        assert!(matches!(
            head("POST /api/analytics HTTP/1.1\r\n\r\n"),
            Route::Error(Status::MethodNotAllowed, _)
        ));
    }

    #[test]
    fn partial_and_malformed_heads() {
        assert!(matches!(
            parse_head(b"GET /health HTTP/1.1\r\nHost"),
            Ok(None)
        ));
        assert!(parse_head(b"\x16\x03\x01 hello\r\n\r\n").is_err());
        let text = format!("{}rest", upgrade("/chat/1"));
        let h = parse_head(text.as_bytes()).ok().flatten().map(|h| h.len);
        assert_eq!(
            h,
            Some(text.len() - 4),
            "leftover bytes belong to the WebSocket"
        );
    }

    #[test]
    fn responses_have_length_and_close() {
        let r =
            String::from_utf8(error_response(Status::NotFound, "no", false)).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.contains("Content-Length: 14\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n{\"error\":\"no\"}"));
        let h = String::from_utf8(error_response(Status::NotFound, "no", true)).unwrap_or_default();
        assert!(h.ends_with("\r\n\r\n"));
    }
}
