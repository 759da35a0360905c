//! Pages of a long list, both ways, over listings that only go forward (a backend's
//! `after` cursor, the message browser's `before` id).
//!
//! A page's link carries where the page starts (`from`) and the starts of the pages before
//! it (`back`, oldest last): "Newer" goes back one start, "Older" adds this page's start
//! and goes on after its last row. The listing is asked only for the page itself, however
//! deep the reader is; the trail is kept to [`MAX_TRAIL`] pages, beyond which "Newer" from
//! the deepest pages leads to the first page.

use serde::Serialize;

/// The most page starts a link remembers.
pub const MAX_TRAIL: usize = 50;

/// Where the current page starts and how to get back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trail {
    /// This page's start; empty for the first page.
    pub from: String,
    /// The starts of the pages before this one, nearest first; empty strings for the
    /// first page.
    pub back: Vec<String>,
}

/// The "Newer" and "Older" links of a page (query strings, starting with `?`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Links {
    /// The page before (newer rows), unless this is the first.
    pub newer: Option<String>,
    /// The page after (older rows), unless this is the last.
    pub older: Option<String>,
}

/// Whether `s` is a row id (a positive integer): a page start of a list in id order.
pub fn is_id(s: &str) -> bool {
    s.parse::<i64>().is_ok_and(|id| id > 0)
}

/// Keeps the first `size` of `rows`, which were read with one more to learn whether another
/// page follows, and returns that page's start (`start` of the last row kept) when one does.
pub fn cut_page<T>(rows: &mut Vec<T>, size: usize, start: impl Fn(&T) -> String) -> Option<String> {
    let more = rows.len() > size;
    rows.truncate(size);
    rows.last().filter(|_| more).map(start)
}

impl Trail {
    /// The trail of a request's `from` and `back` parameters; `None` when one of them is
    /// not made of `valid` starts.
    pub fn parse(
        from: Option<&str>,
        back: Option<&str>,
        valid: impl Fn(&str) -> bool,
    ) -> Option<Trail> {
        let from = from.unwrap_or("").to_string();
        if !from.is_empty() && !valid(&from) {
            return None;
        }
        let back: Vec<String> = match back {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split('.')
                .map(|s| {
                    if s == "first" {
                        String::new()
                    } else {
                        s.to_string()
                    }
                })
                .collect(),
        };
        if back.len() > MAX_TRAIL || back.iter().any(|s| !s.is_empty() && !valid(s)) {
            return None;
        }
        Some(Trail { from, back })
    }

    /// Whether this is the first page.
    pub fn is_first(&self) -> bool {
        self.from.is_empty()
    }

    /// The links of this page: "Newer" unless it is the first, "Older" when `next` (the
    /// start after its last row) is known.
    pub fn links(&self, next: Option<String>) -> Links {
        let newer = (!self.is_first()).then(|| match self.back.split_first() {
            Some((start, rest)) if !start.is_empty() => query(start, rest),
            _ => "?".to_string(),
        });
        let older = next.map(|next| {
            let mut back = vec![self.from.clone()];
            back.extend(self.back.iter().take(MAX_TRAIL - 1).cloned());
            query(&next, &back)
        });
        Links { newer, older }
    }
}

impl Links {
    /// The same links with `params` (an encoded query string such as `q=x`) in front, so
    /// that a search travels with its pages.
    pub fn with_params(self, params: &str) -> Links {
        let add = |link: String| match link.strip_prefix('?') {
            Some("") => format!("?{params}"),
            Some(rest) => format!("?{params}&{rest}"),
            None => link,
        };
        Links {
            newer: self.newer.map(add),
            older: self.older.map(add),
        }
    }
}

/// `?from=START&back=A.B` (`first` standing for the first page's empty start).
fn query(from: &str, back: &[String]) -> String {
    let mut out = format!("?from={from}");
    if !back.is_empty() {
        let names: Vec<&str> = back
            .iter()
            .map(|s| if s.is_empty() { "first" } else { s.as_str() })
            .collect();
        out.push_str("&back=");
        out.push_str(&names.join("."));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn pages_go_both_ways() {
        // the first page: older only
        let first = Trail::parse(None, None, digits).unwrap();
        let links = first.links(Some("30".into()));
        assert_eq!(links.newer, None);
        assert_eq!(links.older.as_deref(), Some("?from=30&back=first"));
        // the second: newer goes to the first page, older goes on
        let second = Trail::parse(Some("30"), Some("first"), digits).unwrap();
        let links = second.links(Some("20".into()));
        assert_eq!(links.newer.as_deref(), Some("?"));
        assert_eq!(links.older.as_deref(), Some("?from=20&back=30.first"));
        // the third, the last: newer goes to the second, no older
        let third = Trail::parse(Some("20"), Some("30.first"), digits).unwrap();
        let links = third.links(None);
        assert_eq!(links.newer.as_deref(), Some("?from=30&back=first"));
        assert_eq!(links.older, None);
    }

    #[test]
    fn bad_starts_are_refused() {
        assert_eq!(Trail::parse(Some("x<y"), None, digits), None);
        assert_eq!(Trail::parse(Some("1"), Some("1.<b>"), digits), None);
        let long = vec!["1"; MAX_TRAIL + 1].join(".");
        assert_eq!(Trail::parse(Some("1"), Some(&long), digits), None);
    }

    #[test]
    fn the_trail_is_bounded() {
        let back = vec!["1"; MAX_TRAIL].join(".");
        let deep = Trail::parse(Some("2"), Some(&back), digits).unwrap();
        let older = deep.links(Some("3".into())).older.unwrap();
        let back = older.split("&back=").nth(1).unwrap();
        assert_eq!(back.split('.').count(), MAX_TRAIL);
    }

    #[test]
    fn a_page_read_with_one_more_row_says_where_the_next_starts() {
        let mut rows = vec![9, 8, 7];
        assert_eq!(
            cut_page(&mut rows, 2, i32::to_string),
            Some("8".to_string())
        );
        assert_eq!(rows, [9, 8]);
        let mut last = vec![2, 1];
        assert_eq!(cut_page(&mut last, 2, i32::to_string), None);
        assert_eq!(last, [2, 1]);
        assert!(is_id("12") && !is_id("0") && !is_id("-3") && !is_id("x"));
    }
}
