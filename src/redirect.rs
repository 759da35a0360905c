//! Where a form may send the browser back to: [`local_path`].

use rocket::http::uri::Reference;

/// `next` as a path of this site that a redirect can carry, or `None` when it must not be
/// followed: it must start with one `/` (not `//host`, not a backslash, which browsers read
/// as another site), and hold no control characters. Characters a URI cannot carry as they
/// are (spaces, non-ASCII, quotes) are percent-encoded, so every accepted value is a valid
/// `Location` and a redirect to it never fails.
///
/// ```
/// use stored_messages::local_path;
///
/// assert_eq!(local_path("/inbox?page=2").as_deref(), Some("/inbox?page=2"));
/// assert_eq!(local_path("/x y").as_deref(), Some("/x%20y"));
/// assert_eq!(local_path("/❤").as_deref(), Some("/%E2%9D%A4"));
/// assert_eq!(local_path("//evil.example"), None);
/// assert_eq!(local_path("/a\tb"), None);
/// ```
pub fn local_path(next: &str) -> Option<String> {
    if !next.starts_with('/')
        || next.starts_with("//")
        || next.contains('\\')
        || next.chars().any(char::is_control)
    {
        return None;
    }
    let mut out = String::with_capacity(next.len());
    // One `#` starts the fragment; a later one is encoded.
    let fragment = next.find('#');
    for (i, c) in next.char_indices() {
        if c.is_ascii_alphanumeric()
            || "/-._~!$&'()*+,;=:@?%".contains(c)
            || (c == '#' && Some(i) == fragment)
        {
            out.push(c);
        } else {
            let mut bytes = [0u8; 4];
            for b in c.encode_utf8(&mut bytes).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    // A `%` not followed by two hex digits is itself encoded.
    let out = fix_stray_percents(&out);
    // What `Redirect::to` parses: a relative reference (a path, a query, a fragment).
    Reference::parse(&out).ok()?;
    Some(out)
}

fn fix_stray_percents(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.char_indices() {
        let escape = c == '%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit));
        if escape {
            out.push_str("%25");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_site_paths_that_a_redirect_can_carry() {
        for (raw, expected) in [
            ("/", Some("/")),
            ("/admin/jobs/3", Some("/admin/jobs/3")),
            ("/?keep=1&x=%20", Some("/?keep=1&x=%20")),
            ("/x y", Some("/x%20y")),
            ("/a\"b<c>", Some("/a%22b%3Cc%3E")),
            ("/50%", Some("/50%25")),
            ("/%zz", Some("/%25zz")),
            ("/page#part", Some("/page#part")),
            ("/page#a#b", Some("/page#a%23b")),
            ("//evil.example", None),
            ("/\\evil.example", None),
            ("https://evil.example", None),
            ("", None),
            ("relative", None),
            ("/a\tb", None),
            ("/a\nb", None),
            ("/a\u{1b}b", None),
        ] {
            assert_eq!(local_path(raw).as_deref(), expected, "{raw:?}");
        }
    }

    /// Generated values, heavy on the characters that broke redirects before: whatever
    /// comes in, the answer is `None` or a site path that a `Location` header carries.
    #[test]
    fn any_generated_value_is_refused_or_a_valid_site_path() {
        use rand::{Rng, SeedableRng};
        let pieces = [
            "/",
            "//",
            "\\",
            "%",
            "%2",
            "%zz",
            "%41",
            "#",
            "?",
            "&",
            "=",
            " ",
            "\t",
            "\n",
            "\r",
            "\u{0}",
            "\u{1b}",
            "\u{7f}",
            "\u{85}",
            "\u{2028}",
            "❤",
            "é",
            "\"",
            "<",
            ">",
            "`",
            "{",
            "}",
            "|",
            "^",
            "[",
            "]",
            "@",
            ":",
            "..",
            ".",
            "a",
            "Z",
            "9",
            "~",
            "'",
            "javascript:",
            "http://x",
            "\u{feff}",
            "\u{202e}",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261203);
        for _ in 0..50_000 {
            let len = rng.gen_range(0..12);
            let raw: String = (0..len)
                .map(|_| pieces[rng.gen_range(0..pieces.len())])
                .collect();
            let Some(path) = local_path(&raw) else {
                continue;
            };
            assert!(
                path.starts_with('/') && !path.starts_with("//"),
                "{raw:?} → {path:?}"
            );
            assert!(
                path.bytes().all(|b| b.is_ascii_graphic()) && !path.contains('\\'),
                "{raw:?} → {path:?}"
            );
            assert!(Reference::parse(&path).is_ok(), "{raw:?} → {path:?}");
            let location = rocket::http::Header::new("Location", path.clone());
            assert_eq!(location.value(), path);
        }
    }
}
