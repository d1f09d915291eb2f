//! The TCP backend: separate processes over real sockets, for CPU ranks.
//!
//! Topology: a star around rank 0. Every peer keeps one connection to rank 0, opened at the
//! rendezvous ([`TcpCollective::establish`]). Each operation starts with a 17-byte header from
//! every side (`tag u8, sequence u64, byte length u64`, little-endian), so a rank that calls a
//! different operation, or the same one with another length, is reported as out of step
//! instead of reading garbage.
//!
//! - all-reduce: every peer streams its buffer to rank 0 in chunks (`chunk_bytes`); for each
//!   chunk rank 0 adds the peers' values to its own in rank order (`((b0 + b1) + b2) + ...`,
//!   element-wise) and streams the sum back. Every rank ends with rank 0's bits: results are
//!   bit-identical everywhere and equal to the sequential sum.
//! - broadcast: rank 0 writes the bytes to every peer.
//! - all-gather: peers send to rank 0, which sends the concatenation (by rank) to each.
//!
//! Failure: every socket has read and write timeouts (`op_timeout`): a stalled peer gives
//! every rank waiting on it an error within that bound, a dead one (closed socket) at once.
//! Rank 0 sees the peer that failed; the peers see rank 0's socket close when rank 0 gives up,
//! so the whole group stops. A follower waiting for rank 0's next command uses
//! [`Wait::For`] (rank 0 sends heartbeats while it is idle).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::rendezvous::{Hello, RendezvousError, Welcome};
use crate::{Collective, CollectiveError, Result, Traffic, Wait};

/// Tunables of the TCP backend.
#[derive(Clone, Copy, Debug)]
pub struct TcpConfig {
    /// Bound on waiting for a peer's data in an operation.
    pub op_timeout: Duration,
    /// Bound on the whole rendezvous (rank 0 waiting for every peer; a peer waiting for rank 0
    /// to listen and answer).
    pub rendezvous_timeout: Duration,
    /// All-reduce chunk: bounds the extra memory and lets rank 0 sum while peers still send.
    pub chunk_bytes: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_secs(120),
            rendezvous_timeout: Duration::from_secs(300),
            chunk_bytes: 4 << 20,
        }
    }
}

const HEADER: usize = 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Reduce = 1,
    Broadcast = 2,
    Gather = 3,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Reduce => "all_reduce",
            Op::Broadcast => "broadcast",
            Op::Gather => "all_gather",
        }
    }
    fn from_u8(b: u8) -> Option<Op> {
        match b {
            1 => Some(Op::Reduce),
            2 => Some(Op::Broadcast),
            3 => Some(Op::Gather),
            _ => None,
        }
    }
}

/// One connection, to rank `peer`.
struct Conn {
    peer: u32,
    stream: TcpStream,
    timeout: Duration,
}

impl Conn {
    fn err(&self, op: &'static str, e: std::io::Error) -> CollectiveError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
                peer: self.peer,
                op,
                timeout: self.timeout,
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => CollectiveError::Closed {
                peer: self.peer,
                op,
            },
            _ => CollectiveError::Io {
                peer: self.peer,
                op,
                source: e,
            },
        }
    }

    fn write(&mut self, op: &'static str, bytes: &[u8], traffic: &mut Traffic) -> Result<()> {
        self.stream.write_all(bytes).map_err(|e| self.err(op, e))?;
        traffic.sent += bytes.len() as u64;
        Ok(())
    }

    fn read(&mut self, op: &'static str, bytes: &mut [u8], traffic: &mut Traffic) -> Result<()> {
        self.stream.read_exact(bytes).map_err(|e| self.err(op, e))?;
        traffic.received += bytes.len() as u64;
        Ok(())
    }

    fn header(&mut self, op: Op, seq: u64, len: u64, traffic: &mut Traffic) -> Result<()> {
        let mut h = [0u8; HEADER];
        h[0] = op as u8;
        h[1..9].copy_from_slice(&seq.to_le_bytes());
        h[9..17].copy_from_slice(&len.to_le_bytes());
        self.write(op.name(), &h, traffic)
    }

    /// Reads a header and checks it is `op` number `seq`; returns its length (which must be
    /// `want_len` when given).
    fn expect(
        &mut self,
        op: Op,
        seq: u64,
        want_len: Option<u64>,
        me: u32,
        traffic: &mut Traffic,
    ) -> Result<u64> {
        let mut h = [0u8; HEADER];
        self.read(op.name(), &mut h, traffic)?;
        let seq_in = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(h[9..17].try_into().expect("8 bytes"));
        let theirs = Op::from_u8(h[0]).map_or("an unknown operation", Op::name);
        if Op::from_u8(h[0]) != Some(op) || seq_in != seq {
            return Err(CollectiveError::OutOfStep(format!(
                "rank {} is at operation #{seq_in} ({theirs}), rank {me} at #{seq} ({})",
                self.peer,
                op.name()
            )));
        }
        if let Some(want) = want_len {
            if want != len {
                return Err(CollectiveError::OutOfStep(format!(
                    "{} #{seq}: rank {me} has {want} bytes, rank {} has {len}",
                    op.name(),
                    self.peer
                )));
            }
        }
        Ok(len)
    }
}

/// The TCP collective of one rank (see the module docs for the protocol).
pub struct TcpCollective {
    rank: u32,
    world_size: u32,
    /// Rank 0: the peers 1..N in rank order; another rank: rank 0 alone.
    conns: Vec<Conn>,
    seq: u64,
    config: TcpConfig,
    traffic: Traffic,
    unique_id: Vec<u8>,
}

fn send_msg<T: serde::Serialize>(s: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    s.write_all(&out)
}

fn recv_msg<T: serde::de::DeserializeOwned>(s: &mut TcpStream) -> std::io::Result<T> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > 1 << 20 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("handshake message of {n} bytes"),
        ));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

impl TcpCollective {
    /// Rendezvous as `hello.rank` of `hello.world_size`: rank 0 listens on `addr`'s port on
    /// every interface and accepts the peers; the others connect to `addr`. `unique_id` (rank 0
    /// only) is handed to every peer (the NCCL unique id for a device backend).
    pub fn establish(
        addr: &str,
        hello: Hello,
        unique_id: Vec<u8>,
        config: TcpConfig,
    ) -> Result<Self> {
        if hello.rank == 0 {
            let port = addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| RendezvousError::Malformed(format!("{addr:?} is not HOST:PORT")))?;
            let listener =
                TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).map_err(|source| {
                    RendezvousError::Io {
                        addr: addr.to_string(),
                        source,
                    }
                })?;
            Self::serve(listener, hello, unique_id, config)
        } else {
            Self::connect(addr, hello, config)
        }
    }

    /// Rank 0 on an already bound listener (tests bind port 0): accepts `world_size - 1`
    /// peers, checks their [`Hello`]s against its own and welcomes or refuses them all.
    pub fn serve(
        listener: TcpListener,
        hello: Hello,
        unique_id: Vec<u8>,
        config: TcpConfig,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let io = |source| RendezvousError::Io {
            addr: addr.clone(),
            source,
        };
        let deadline = Instant::now() + config.rendezvous_timeout;
        let timed_out = |what: String| RendezvousError::TimedOut {
            addr: addr.clone(),
            what,
            secs: config.rendezvous_timeout.as_secs(),
        };
        listener.set_nonblocking(true).map_err(io)?;
        let mut peers: Vec<Option<(TcpStream, Hello)>> =
            (1..hello.world_size).map(|_| None).collect();
        let mut problems = Vec::new();
        let mut strays = Vec::new();
        while peers.iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = peers
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_none())
                    .map(|(i, _)| (i + 1).to_string())
                    .collect();
                return Err(
                    timed_out(format!("rank(s) {} did not join", missing.join(", "))).into(),
                );
            }
            let (mut s, from) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Polling accept keeps the deadline simple; rendezvous happens once.
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(io(e).into()),
            };
            s.set_nonblocking(false).map_err(io)?;
            s.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(io)?;
            let peer: Hello = match recv_msg(&mut s) {
                Ok(h) => h,
                Err(e) => {
                    debug!(%from, error = %e, "ignoring a connection without a handshake");
                    continue;
                }
            };
            let slot = peer.rank.checked_sub(1).map(|i| i as usize);
            match slot.filter(|&i| i < peers.len()) {
                None => {
                    problems.push(format!(
                        "rank {} from {from} is not a peer rank of world size {}",
                        peer.rank, hello.world_size
                    ));
                    strays.push(s);
                }
                Some(i) if peers[i].is_some() => {
                    problems.push(format!(
                        "rank {} joined twice (again from {from})",
                        peer.rank
                    ));
                    strays.push(s);
                }
                Some(i) => {
                    problems.extend(hello.differences(&peer));
                    info!(rank = peer.rank, %from, "rank joined");
                    peers[i] = Some((s, peer));
                }
            }
            if !problems.is_empty() {
                break;
            }
        }
        if !problems.is_empty() {
            let reason = problems.join("; ");
            let refusal = Welcome::Refused {
                reason: reason.clone(),
            };
            for s in peers
                .iter_mut()
                .flatten()
                .map(|(s, _)| s)
                .chain(&mut strays)
            {
                let _ = send_msg(s, &refusal);
            }
            return Err(RendezvousError::Refused { addr, reason }.into());
        }
        let welcome = Welcome::Accepted {
            unique_id: unique_id.clone(),
        };
        let mut conns = Vec::with_capacity(peers.len());
        for (s, h) in peers.into_iter().flatten() {
            let mut s = s;
            send_msg(&mut s, &welcome).map_err(io)?;
            conns.push(Self::conn(s, h.rank, &config).map_err(io)?);
        }
        info!(world_size = hello.world_size, "every rank joined");
        Ok(Self {
            rank: 0,
            world_size: hello.world_size,
            conns,
            seq: 0,
            config,
            traffic: Traffic::default(),
            unique_id,
        })
    }

    /// A peer rank: connects to rank 0 at `addr` (retrying until it listens), says hello and
    /// waits for the welcome.
    pub fn connect(addr: &str, hello: Hello, config: TcpConfig) -> Result<Self> {
        let deadline = Instant::now() + config.rendezvous_timeout;
        let io = |source| RendezvousError::Io {
            addr: addr.to_string(),
            source,
        };
        let mut last_err = String::new();
        let mut stream = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(RendezvousError::TimedOut {
                    addr: addr.to_string(),
                    what: format!("rank 0 did not answer ({last_err})"),
                    secs: config.rendezvous_timeout.as_secs(),
                }
                .into());
            }
            // Resolved on every try: a Kubernetes headless Service name appears with its pod.
            let resolved = addr.to_socket_addrs().map(|a| a.collect::<Vec<_>>());
            let attempt = match resolved {
                Ok(addrs) if !addrs.is_empty() => addrs
                    .iter()
                    .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
                    .ok_or_else(|| "connection refused".to_string()),
                Ok(_) => Err("no address".into()),
                Err(e) => Err(e.to_string()),
            };
            match attempt {
                Ok(s) => break s,
                Err(e) => {
                    last_err = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(io)?;
        send_msg(&mut stream, &hello).map_err(io)?;
        let welcome: Welcome = recv_msg(&mut stream).map_err(io)?;
        let unique_id = match welcome {
            Welcome::Accepted { unique_id } => unique_id,
            Welcome::Refused { reason } => {
                return Err(RendezvousError::Refused {
                    addr: addr.to_string(),
                    reason,
                }
                .into())
            }
        };
        let conn = Self::conn(stream, 0, &config).map_err(io)?;
        Ok(Self {
            rank: hello.rank,
            world_size: hello.world_size,
            conns: vec![conn],
            seq: 0,
            config,
            traffic: Traffic::default(),
            unique_id,
        })
    }

    fn conn(s: TcpStream, peer: u32, config: &TcpConfig) -> std::io::Result<Conn> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(config.op_timeout))?;
        s.set_write_timeout(Some(config.op_timeout))?;
        Ok(Conn {
            peer,
            stream: s,
            timeout: config.op_timeout,
        })
    }

    /// The opaque bytes rank 0 handed out at the rendezvous (the NCCL unique id).
    pub fn unique_id(&self) -> &[u8] {
        &self.unique_id
    }

    fn all_reduce<T: Elem>(&mut self, buf: &mut [T]) -> Result<()> {
        self.seq += 1;
        let seq = self.seq;
        let me = self.rank;
        let nbytes = (buf.len() * T::SIZE) as u64;
        let chunk = (self.config.chunk_bytes / T::SIZE).max(1);
        let mut bytes = vec![0u8; chunk.min(buf.len()) * T::SIZE];
        let traffic = &mut self.traffic;
        let op = Op::Reduce.name();
        if me == 0 {
            for c in &mut self.conns {
                c.expect(Op::Reduce, seq, Some(nbytes), me, traffic)?;
            }
            for c in &mut self.conns {
                c.header(Op::Reduce, seq, nbytes, traffic)?;
            }
            for part in buf.chunks_mut(chunk) {
                let b = &mut bytes[..part.len() * T::SIZE];
                // Rank order: rank 0's values first, then each peer's added in turn.
                for c in &mut self.conns {
                    c.read(op, b, traffic)?;
                    for (x, v) in part.iter_mut().zip(b.chunks_exact(T::SIZE)) {
                        *x = x.add(T::decode(v));
                    }
                }
                for (x, v) in part.iter().zip(b.chunks_exact_mut(T::SIZE)) {
                    x.encode(v);
                }
                for c in &mut self.conns {
                    c.write(op, b, traffic)?;
                }
            }
        } else {
            let c = &mut self.conns[0];
            c.header(Op::Reduce, seq, nbytes, traffic)?;
            c.expect(Op::Reduce, seq, Some(nbytes), me, traffic)?;
            for part in buf.chunks_mut(chunk) {
                let b = &mut bytes[..part.len() * T::SIZE];
                for (x, v) in part.iter().zip(b.chunks_exact_mut(T::SIZE)) {
                    x.encode(v);
                }
                c.write(op, b, traffic)?;
                c.read(op, b, traffic)?;
                for (x, v) in part.iter_mut().zip(b.chunks_exact(T::SIZE)) {
                    *x = T::decode(v);
                }
            }
        }
        Ok(())
    }
}

/// The element types an all-reduce sums.
trait Elem: Copy {
    const SIZE: usize;
    fn encode(self, out: &mut [u8]);
    fn decode(b: &[u8]) -> Self;
    fn add(self, other: Self) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn encode(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn encode(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf)
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(buf)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, wait: Wait) -> Result<()> {
        self.seq += 1;
        let seq = self.seq;
        let me = self.rank;
        let traffic = &mut self.traffic;
        let op = Op::Broadcast.name();
        if me == 0 {
            for c in &mut self.conns {
                c.header(Op::Broadcast, seq, buf.len() as u64, traffic)?;
                c.write(op, buf, traffic)?;
            }
            return Ok(());
        }
        let c = &mut self.conns[0];
        let io = |c: &Conn, e| c.err(op, e);
        if let Wait::For(d) = wait {
            c.stream
                .set_read_timeout(Some(d.max(Duration::from_millis(1))))
                .map_err(|e| io(c, e))?;
            c.timeout = d;
        }
        let got = c.expect(Op::Broadcast, seq, None, me, traffic);
        if let Wait::For(_) = wait {
            c.stream
                .set_read_timeout(Some(self.config.op_timeout))
                .map_err(|e| io(c, e))?;
            c.timeout = self.config.op_timeout;
        }
        let len = got? as usize;
        buf.clear();
        buf.resize(len, 0);
        c.read(op, buf, traffic)
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let seq = self.seq;
        let me = self.rank;
        let traffic = &mut self.traffic;
        let op = Op::Gather.name();
        if me == 0 {
            let mut all = vec![mine.to_vec()];
            for c in &mut self.conns {
                let n = c.expect(Op::Gather, seq, None, me, traffic)? as usize;
                let mut b = vec![0u8; n];
                c.read(op, &mut b, traffic)?;
                all.push(b);
            }
            let mut packed = Vec::new();
            for b in &all {
                packed.extend_from_slice(&(b.len() as u64).to_le_bytes());
                packed.extend_from_slice(b);
            }
            for c in &mut self.conns {
                c.header(Op::Gather, seq, packed.len() as u64, traffic)?;
                c.write(op, &packed, traffic)?;
            }
            return Ok(all);
        }
        let c = &mut self.conns[0];
        c.header(Op::Gather, seq, mine.len() as u64, traffic)?;
        c.write(op, mine, traffic)?;
        let n = c.expect(Op::Gather, seq, None, me, traffic)? as usize;
        let mut packed = vec![0u8; n];
        c.read(op, &mut packed, traffic)?;
        let mut all = Vec::with_capacity(self.world_size as usize);
        let mut rest = &packed[..];
        while rest.len() >= 8 {
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
            if rest.len() < 8 + len {
                break;
            }
            all.push(rest[8..8 + len].to_vec());
            rest = &rest[8 + len..];
        }
        if all.len() != self.world_size as usize || !rest.is_empty() {
            return Err(CollectiveError::OutOfStep(format!(
                "all_gather #{seq}: rank 0 sent {} parts for world size {}",
                all.len(),
                self.world_size
            )));
        }
        Ok(all)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}
