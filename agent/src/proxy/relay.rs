//! The opaque relay: bytes both ways, zero-copy.
//!
//! Each direction moves data socket -> pipe -> socket with splice(2), so
//! bytes stay in the kernel. Readiness comes from tokio, so an idle
//! connection costs no CPU; a direction reads again only once its pipe is
//! drained (back-pressure); end of stream in one direction is passed on as
//! a half-close (shutdown of the write side) while the other goes on.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest},
    net::TcpStream,
};

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub up: u64,
    pub down: u64,
}

const CHUNK: usize = 1 << 20;
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Relay until both directions have ended, or one fails. The counts are
/// kept even when the relay ends with an error.
pub async fn relay(client: &TcpStream, upstream: &TcpStream) -> (Transferred, io::Result<()>) {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let result =
        tokio::try_join!(pump(client, upstream, &up), pump(upstream, client, &down)).map(|_| ());
    (
        Transferred {
            up: up.into_inner(),
            down: down.into_inner(),
        },
        result,
    )
}

async fn pump(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let (pipe_r, pipe_w) = pipe()?;
    loop {
        let n = src
            .async_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
            })
            .await?;
        if n == 0 {
            // The peer ends its side: pass the half-close on, keep the other way open.
            socket2::SockRef::from(dst)
                .shutdown(std::net::Shutdown::Write)
                .or_else(ignore_not_connected)?;
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = dst
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_raw_fd(), dst.as_raw_fd(), left)
                })
                .await?;
            left -= m;
            moved.fetch_add(m as u64, Ordering::Relaxed);
        }
    }
}

/// The same for streams the agent reads itself (TLS it terminated): copy
/// through a buffer, pass end of stream on as a close of the write side.
pub async fn relay_streams<A, B>(a: A, b: B) -> (Transferred, io::Result<()>)
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let result = tokio::try_join!(
        copy_counted(&mut a_read, &mut b_write, &up),
        copy_counted(&mut b_read, &mut a_write, &down)
    )
    .map(|_| ());
    (
        Transferred {
            up: up.into_inner(),
            down: down.into_inner(),
        },
        result,
    )
}

async fn copy_counted<R, W>(src: &mut R, dst: &mut W, moved: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match src.read(&mut buf).await {
            // Many TLS clients close without a close_notify; HTTP frames its
            // own bodies, so treat that as the end of the stream.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            read => read?,
        };
        if n == 0 {
            return dst.shutdown().await.or_else(ignore_not_connected);
        }
        dst.write_all(&buf[..n]).await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills both descriptors on success; we own them from here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe moves more per splice; where the kernel refuses (pipe
    // limits), the default 64 KiB still works.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

/// One non-blocking splice; WouldBlock tells tokio to wait for readiness.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        // app <-> (client side | relay | upstream side) <-> server
        let (mut app, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(&client_side, &upstream_side).await });

        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            let mut back = Vec::new();
            app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "upstream got every byte, then end of stream");
        server
            .write_all(b"reply after the client's half-close")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(
            writer.await.unwrap(),
            b"reply after the client's half-close"
        );
        let (moved, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!(
            moved,
            Transferred {
                up: 5_000_000,
                down: 35
            }
        );
    }
}
