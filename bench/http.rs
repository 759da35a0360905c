//! What the benchmark clients need of HTTP: one exchange per connection, cookies, a login
//! like a browser's. Included by the examples that use it (`#[path = "http.rs"] mod http;`).

#![allow(dead_code)]

use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::TcpStream;

/// One HTTP/1.1 exchange on a fresh connection; returns the status line, the `Set-Cookie`
/// name=value pairs and the body.
pub async fn http(
    server: &str,
    request: String,
) -> Result<(String, Vec<(String, String)>, String), String> {
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| format!("connecting to {server}: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let cookies = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            if !name.eq_ignore_ascii_case("set-cookie") {
                return None;
            }
            let pair = value.trim().split(';').next()?;
            let (k, v) = pair.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    Ok((status, cookies, body.to_string()))
}

pub fn cookie_header(jar: &[(String, String)]) -> String {
    jar.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn merge(jar: &mut Vec<(String, String)>, set: Vec<(String, String)>) {
    for (k, v) in set {
        jar.retain(|(name, _)| *name != k);
        jar.push((k, v));
    }
}

pub fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Logs `username` in like a browser (login page for the CSRF token, the form, then the page
/// it redirects to) and returns the cookies the server set.
pub async fn login(server: &str, username: &str, password: &str) -> Result<String, String> {
    let (_, set, body) = http(
        server,
        format!("GET /login HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n"),
    )
    .await?;
    let mut jar = Vec::new();
    merge(&mut jar, set);
    let token = body
        .split("name=\"csrf_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no CSRF token on the login page")?
        .to_string();
    let form = format!(
        "csrf_token={}&username={}&password={}",
        form_encode(&token),
        form_encode(username),
        form_encode(password)
    );
    let (status, set, _) = http(
        server,
        format!(
            "POST /login HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Cookie: {}\r\n\r\n{form}",
            form.len(),
            cookie_header(&jar)
        ),
    )
    .await?;
    if !status.contains(" 303 ") {
        return Err(format!("logging in {username}: {status}"));
    }
    merge(&mut jar, set);
    // A browser follows the redirect, and keeps the CSRF cookie the first logged-in page
    // binds to the new session; without it every later page would mint a new one.
    let (status, set, _) = http(
        server,
        format!(
            "GET /?keep=1 HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\nCookie: {}\r\n\r\n",
            cookie_header(&jar)
        ),
    )
    .await?;
    if !status.contains(" 200 ") {
        return Err(format!(
            "the first page after logging in {username}: {status}"
        ));
    }
    merge(&mut jar, set);
    Ok(cookie_header(&jar))
}
