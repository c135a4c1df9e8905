//! A fetch from the origin that clients read while it arrives, and that becomes an object
//! when it is complete.
//!
//! One fetch per key at a time: the first request for a missing object starts it; others
//! that come while it runs (request coalescing) wait for its head — at most the
//! coalescing wait — and then read the same body as it streams in. The fetch is driven by
//! a task of its own, so a slow or departed client neither slows it nor cuts it off for
//! the others; it keeps at most `max_object_bytes` (a fetch that grows past that stops
//! being kept, and only clients already reading it see it end early).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;

use super::object::Head;
use crate::body::ProxyBody;

/// How a fetch went, as readers see it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Still arriving.
    Running,
    /// Complete.
    Done,
    /// It failed or outgrew what is kept: readers end with an error.
    Failed,
}

#[derive(Debug)]
struct State {
    head: Option<Head>,
    /// The head will not come (the fetch failed before it, or the response is not one to
    /// share); waiters fetch on their own.
    no_head: bool,
    chunks: Vec<Bytes>,
    len: u64,
    outcome: Outcome,
}

/// One fetch in progress.
#[derive(Debug)]
pub struct Fill {
    state: Mutex<State>,
    /// Bumped on every change; readers wait on it.
    progress: tokio::sync::watch::Sender<u64>,
    /// The request headers of the client that started it, for `Vary` checks by waiters.
    pub request_headers: http::HeaderMap,
}

impl Fill {
    /// A fetch started for a request with `request_headers`.
    pub fn new(request_headers: http::HeaderMap) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                head: None,
                no_head: false,
                chunks: Vec::new(),
                len: 0,
                outcome: Outcome::Running,
            }),
            progress: tokio::sync::watch::Sender::new(0),
            request_headers,
        })
    }

    fn changed(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    /// The response head arrived and is to be shared.
    pub fn set_head(&self, head: Head) {
        if let Ok(mut s) = self.state.lock() {
            s.head = Some(head);
        }
        self.changed();
    }

    /// No shared head will come: waiters go to the origin themselves.
    pub fn no_head(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.no_head = true;
            s.outcome = Outcome::Failed;
        }
        self.changed();
    }

    /// Appends a body chunk.
    pub fn push(&self, chunk: Bytes) {
        if let Ok(mut s) = self.state.lock() {
            s.len += chunk.len() as u64;
            s.chunks.push(chunk);
        }
        self.changed();
    }

    /// Bytes so far.
    pub fn len(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.len)
    }

    /// Whether nothing arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The end of the body.
    pub fn finish(&self, outcome: Outcome) {
        if let Ok(mut s) = self.state.lock() {
            s.outcome = outcome;
        }
        self.changed();
    }

    /// The body's chunks once it is complete.
    pub fn chunks(&self) -> Option<Arc<[Bytes]>> {
        let s = self.state.lock().ok()?;
        matches!(s.outcome, Outcome::Done).then(|| Arc::from(s.chunks.clone()))
    }

    /// Waits for the head: `Some` to read this fill, `None` when there will be none.
    pub async fn head(&self) -> Option<Head> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let s = self.state.lock().ok()?;
                if let Some(h) = &s.head {
                    return Some(h.clone());
                }
                if s.no_head {
                    return None;
                }
            }
            rx.changed().await.ok()?;
        }
    }

    /// A body that reads this fill from its start, waiting for chunks as they come.
    pub fn reader(self: &Arc<Self>) -> ProxyBody {
        let rx = self.progress.subscribe();
        let stream = futures_util::stream::unfold(
            (self.clone(), 0usize, rx, false),
            |(fill, next, mut rx, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let step = {
                        let Ok(s) = fill.state.lock() else {
                            return None;
                        };
                        if let Some(c) = s.chunks.get(next) {
                            Some(Ok(c.clone()))
                        } else {
                            match s.outcome {
                                Outcome::Running => None,
                                Outcome::Done => return None,
                                Outcome::Failed => Some(Err(std::io::Error::other(
                                    "the origin fetch this response shared failed",
                                ))),
                            }
                        }
                    };
                    match step {
                        Some(Ok(chunk)) => {
                            return Some((Ok(Frame::data(chunk)), (fill, next + 1, rx, false)));
                        }
                        Some(Err(e)) => return Some((Err(e), (fill, next, rx, true))),
                        None => {
                            if rx.changed().await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            },
        );
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        Head {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
        }
    }

    #[tokio::test]
    async fn readers_get_the_body_as_it_arrives_and_late_ones_from_the_start() {
        let fill = Fill::new(http::HeaderMap::new());
        let early = fill.reader();
        let waiter = {
            let f = fill.clone();
            tokio::spawn(async move { f.head().await.is_some() })
        };
        fill.set_head(head());
        assert!(waiter.await.expect("join"));
        fill.push(Bytes::from_static(b"ab"));
        let collector = tokio::spawn(async move { early.collect().await.map(|c| c.to_bytes()) });
        tokio::task::yield_now().await;
        fill.push(Bytes::from_static(b"cd"));
        fill.finish(Outcome::Done);
        assert_eq!(&collector.await.expect("join").expect("body")[..], b"abcd");
        let late = fill.reader().collect().await.expect("body").to_bytes();
        assert_eq!(&late[..], b"abcd");
        assert_eq!(fill.chunks().map(|c| c.len()), Some(2));
    }

    #[tokio::test]
    async fn a_failed_fill_ends_its_readers_with_an_error_and_releases_waiters() {
        let fill = Fill::new(http::HeaderMap::new());
        fill.set_head(head());
        fill.push(Bytes::from_static(b"ab"));
        let reader = fill.reader();
        fill.finish(Outcome::Failed);
        assert!(reader.collect().await.is_err());
        let other = Fill::new(http::HeaderMap::new());
        other.no_head();
        assert!(other.head().await.is_none());
        assert!(other.chunks().is_none());
    }
}
