//! A deadline on writing answers: [`WriteDeadline`] fails a write, flush or shutdown that makes
//! no progress for its timeout ([`Limits::write_stall_timeout`](super::Limits)), which ends the
//! connection. The mirror of the header read deadline: a client that asks for a large answer
//! (a flame graph, `/metrics`) and never reads it would otherwise hold its connection, and its
//! place under the connection limit, forever once the socket buffers are full.
//!
//! Only a write the socket refuses counts; time spent preparing an answer (a 5-minute capture)
//! does not, since nothing is being written then, and neither does reading.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// A stream whose writes fail with [`io::ErrorKind::TimedOut`] once one has waited `timeout`
/// without the socket taking a byte.
pub struct WriteDeadline<S> {
    stream: S,
    timeout: Duration,
    /// Armed by the first write the socket refuses, disarmed by the next one it takes.
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            stalled_since: None,
        }
    }

    /// Passes a finished write through and disarms the deadline; on a refused write, arms it
    /// (once) and fails when it has passed.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled_since = None;
            return poll;
        }
        let timeout = self.timeout;
        let deadline = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {timeout:?}"),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_timeout() {
        let (near, _far) = tokio::io::duplex(64);
        let mut stream = WriteDeadline::new(near, TIMEOUT);
        let started = Instant::now();
        let error = stream.write_all(&[7; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= TIMEOUT);
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_never_timed_out() {
        let (near, mut far) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut chunk = [0; 64];
            let mut total = 0;
            loop {
                tokio::time::sleep(TIMEOUT / 3).await;
                match far.read(&mut chunk).await.unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let mut stream = WriteDeadline::new(near, TIMEOUT);
        // 1 KiB through a 64-byte pipe: 16 stalls, each shorter than the timeout, about 5 x
        // the timeout in all.
        stream.write_all(&[7; 1024]).await.unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
