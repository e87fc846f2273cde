//! A client connection that can tell a client which half-closed its socket (it sent the whole
//! request, then `shutdown(SHUT_WR)`, and waits for the answer) from one that went away.
//!
//! Both look the same on the wire (end of stream on reading), so hyper runs with `half_close`
//! (it then stops reading mid-request) and a request waiting for its whole answer watches the
//! socket itself ([`Client::gone`]): at end of stream it probes with an interim `100 Continue`
//! (every HTTP/1.1 client must accept unexpected 1xx responses before the final one; RFC 9110
//! §15.2). A socket the client closed answers data with a reset, which the next check sees; a
//! half-closed client keeps its socket and gets its answer. Streams need no probe: their own
//! writes fail.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often a request with a half-closed client checks that the client is still there.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a probe waits for the reset of a closed socket (a round trip).
const PROBE_WAIT: Duration = Duration::from_millis(300);
const PROBE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// hyper's view of an accepted connection.
pub struct ConnIo(Arc<TcpStream>);

/// A request's view of its connection: [`Client::gone`] resolves once the client is known gone.
#[derive(Debug, Clone)]
pub struct Client(Arc<TcpStream>);

/// Wraps an accepted stream.
pub fn split(stream: TcpStream) -> (ConnIo, Client) {
    let s = Arc::new(stream);
    (ConnIo(s.clone()), Client(s))
}

impl Client {
    /// Resolves when the client has closed its socket (not merely half-closed it). Never
    /// resolves while the client keeps the connection open. Only while hyper does not read (a
    /// request whose body was read and whose answer is not out yet).
    pub async fn gone(&self) {
        let s = &self.0;
        match s.peek(&mut [0u8; 1]).await {
            // The client's side ended: half-closed, or gone.
            Ok(0) => {}
            // It sent more (a pipelined request): it is there.
            Ok(_) => return std::future::pending().await,
            Err(_) => return,
        }
        loop {
            // A reset from the probe's bytes shows as a socket error (EPIPE in CLOSE_WAIT).
            match s.try_write(PROBE) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
                _ => {}
            }
            tokio::time::sleep(PROBE_WAIT).await;
            if !matches!(s.take_error(), Ok(None)) {
                return;
            }
            tokio::time::sleep(PROBE_EVERY - PROBE_WAIT).await;
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &self.0;
        loop {
            ready!(s.poll_read_ready(cx))?;
            match s.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let s = &self.0;
        loop {
            ready!(s.poll_write_ready(cx))?;
            match s.try_write(b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let s = &self.0;
        loop {
            ready!(s.poll_write_ready(cx))?;
            match s.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        // Already closed by the peer: nothing left to shut.
        Poll::Ready(match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
    }
}
