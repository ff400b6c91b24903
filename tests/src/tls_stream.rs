//! A blocking TLS stream for the fake nsqd whose read and write halves live on different
//! threads, as nsqd's do.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use rustls::{ServerConfig, ServerConnection};

/// The session, shared by both halves; socket reads happen outside the lock.
#[derive(Debug)]
pub struct TlsShared {
    conn: Mutex<ServerConnection>,
    sock: TcpStream,
}

impl TlsShared {
    /// Runs the server side of the handshake on `sock`.
    pub fn handshake(config: Arc<ServerConfig>, sock: TcpStream) -> io::Result<Arc<Self>> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let shared = Arc::new(Self { conn: Mutex::new(conn), sock });
        let mut buf = [0u8; 16 * 1024];
        loop {
            let done = {
                let mut conn = shared.lock();
                shared.flush_locked(&mut conn)?;
                !conn.is_handshaking()
            };
            if done {
                return Ok(shared);
            }
            let n = (&shared.sock).read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut conn = shared.lock();
            // read_tls may take only part of what was read: feed it all.
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)?;
                if let Err(e) = conn.process_new_packets() {
                    let _ = shared.flush_locked(&mut conn);
                    return Err(io::Error::other(e));
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServerConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flush_locked(&self, conn: &mut ServerConnection) -> io::Result<()> {
        while conn.wants_write() {
            conn.write_tls(&mut &self.sock)?;
        }
        Ok(())
    }
}

/// The read half.
#[derive(Debug)]
pub struct TlsRead(pub Arc<TlsShared>);

impl Read for TlsRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Small raw reads: rustls refuses records once 16 KiB of plaintext wait unread.
        let mut raw = [0u8; 4 * 1024];
        loop {
            {
                let mut conn = self.0.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let n = (&self.0.sock).read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            let mut conn = self.0.lock();
            // read_tls may take only part of what was read: feed it all.
            let mut rest = &raw[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)?;
                conn.process_new_packets().map_err(io::Error::other)?;
            }
            self.0.flush_locked(&mut conn)?;
        }
    }
}

/// The write half.
#[derive(Debug)]
pub struct TlsWrite(pub Arc<TlsShared>);

impl Write for TlsWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut conn = self.0.lock();
        let n = conn.writer().write(buf)?;
        self.0.flush_locked(&mut conn)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut conn = self.0.lock();
        self.0.flush_locked(&mut conn)
    }
}
