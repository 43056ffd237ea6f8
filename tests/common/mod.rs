//! Real software for end-to-end tests: a throwaway Postfix instance on
//! loopback with relayrate's milter attached, Postfix's smtp-sink as the
//! next hop, a `relayrate run` process, and a small SMTP client that binds
//! its source address (127.0.0.11, 127.0.0.12, ...).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

pub mod skip;
pub use skip::skip;

/// Where the tests look for Postfix's and Cyrus SASL's programs:
/// `/usr/sbin`, or `RELAYRATE_TEST_SBIN` (the skip tests point it at an
/// empty directory).
pub fn sbin(program: &str) -> PathBuf {
    let dir = std::env::var_os("RELAYRATE_TEST_SBIN").unwrap_or_else(|| "/usr/sbin".into());
    Path::new(&dir).join(program)
}

/// Whether this test can run a throwaway Postfix: Postfix is here and we
/// are root (its master starts daemons as user `postfix`, and the tests
/// hand it directories with chown). When not, the test is skipped loudly
/// ([`skip`]), or fails under `RELAYRATE_REQUIRE_MTA=1` (CI).
pub fn postfix_available(test: &str) -> bool {
    let found = sbin("postfix").exists() && sbin("smtp-sink").exists();
    if !found {
        skip(test, "Postfix is not installed (apt-get install postfix)");
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            test,
            "not root (a throwaway Postfix needs root: sudo cargo test)",
        );
        return false;
    }
    true
}

/// Whether Cyrus SASL's `saslpasswd2` is here too (package sasl2-bin), for
/// the tests of SMTP AUTH users; as [`postfix_available`].
pub fn sasl_available(test: &str) -> bool {
    if !postfix_available(test) {
        return false;
    }
    let found = sbin("saslpasswd2").exists();
    if !found {
        skip(
            test,
            "saslpasswd2 is not installed (apt-get install sasl2-bin)",
        );
    }
    found
}

/// libfaketime's preload library, as Debian's `faketime` package installs
/// it.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `relayratectl --node http://NODE ARGS...` as a process, with none of
/// the caller's RELAYRATE_NODE or token file: its output, whatever its
/// exit.
pub fn relayratectl<S: AsRef<std::ffi::OsStr>>(
    node: SocketAddr,
    args: &[S],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_relayratectl"))
        .arg("--node")
        .arg(format!("http://{node}"))
        .args(args)
        .env_remove("RELAYRATE_NODE")
        .env_remove("RELAYRATE_ADMIN_TOKEN_FILE")
        .output()
        .expect("run relayratectl")
}

/// Whether libfaketime is here; when not, the test is skipped loudly
/// ([`skip`]), or fails under `RELAYRATE_REQUIRE_MTA=1` (CI installs it).
pub fn faketime_available(test: &str) -> bool {
    let found = Path::new(LIBFAKETIME).exists();
    if !found {
        skip(
            test,
            "libfaketime is not installed (apt-get install faketime)",
        );
    }
    found
}

/// A loopback port free now, below Linux's ephemeral range (32768 and
/// up): a port from that range can be taken by any outgoing connection
/// between this call and the bind of the process it is meant for (seen:
/// "Address already in use" for a node started 0.1 s later). Ports of one
/// test process are distinct: a counter from a random start.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_768;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        AtomicU32::new((random % u64::from(HIGH - LOW)) as u32)
    });
    for _ in LOW..HIGH {
        let port = (LOW + next.fetch_add(1, Ordering::Relaxed) % (HIGH - LOW)) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{HIGH}");
}

/// A node that accepts connections and never answers, for as long as the
/// returned task runs: its URL and the task.
pub async fn hung_node() -> (String, tokio::task::JoinHandle<()>) {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", hung.local_addr().unwrap());
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    (url, holding)
}

/// Polls `cond` until it holds, or panics after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Raft timing for in-process clusters: elections in about a second.
pub fn fast_raft() -> relayrate::node::RaftTuning {
    relayrate::node::RaftTuning {
        heartbeat_ms: 250,
        election_min_ms: 750,
        election_max_ms: 1500,
        ..relayrate::node::RaftTuning::default()
    }
}

/// Polls an asynchronous `cond` until it holds, or panics after `limit`.
pub async fn eventually_async<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a relayrate command with its output in `dir/stdout` and
/// `dir/stderr`, logging `log` (RELAYRATE_LOG).
fn spawn_logged(cmd: &mut Command, dir: &Path, log: &str) -> Child {
    cmd.env("RELAYRATE_LOG", log)
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// smtp-sink, dumping every message it accepts into a directory.
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Sink {
    pub fn start(root: &Path) -> Sink {
        let dir = root.join("sink");
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").arg("postfix").arg(&dir));
        let port = free_port();
        let child = Command::new("/usr/sbin/smtp-sink")
            .arg("-u")
            .arg("postfix")
            .arg("-d")
            .arg(format!("{}/%s.", dir.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink starts");
        Sink { port, dir, child }
    }

    /// The contents of every message received so far.
    pub fn messages(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The `Subject:` of every message received so far, sorted.
    pub fn subjects(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .messages()
            .iter()
            .filter_map(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(|s| s.trim().to_string()))
            })
            .collect();
        s.sort();
        s
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Postfix instance of its own in a temp dir, relaying everything to a
/// sink, with a milter attached.
pub struct Postfix {
    pub port: u16,
    pub dir: PathBuf,
    etc: PathBuf,
}

impl Postfix {
    pub fn start(root: &Path, name: &str, milter: &str, relayhost_port: u16) -> Postfix {
        Postfix::start_with(root, name, milter, relayhost_port, &[])
    }

    /// As `start`, with SMTP AUTH (PLAIN, LOGIN) for `users`, each a
    /// (name, password) pair: Cyrus SASL with a sasldb of this instance's
    /// own. A client logs in as `name@relay.test`, and the milter hears
    /// that as `{auth_authen}`. Needs `saslpasswd2` (see [`sasl_available`]).
    pub fn start_with_auth(
        root: &Path,
        name: &str,
        milter: &str,
        relayhost_port: u16,
        users: &[(&str, &str)],
    ) -> Postfix {
        // Debian's Postfix reads `$config_directory/sasl/smtpd.conf`;
        // others `cyrus_sasl_config_path`: the same directory for both.
        let sasl = root.join(name).join("etc").join("sasl");
        std::fs::create_dir_all(&sasl).unwrap();
        let db = sasl.join("sasldb2");
        for (user, password) in users {
            let mut add = Command::new("saslpasswd2")
                .arg("-f")
                .arg(&db)
                .args(["-c", "-p", "-u", "relay.test", user])
                .stdin(Stdio::piped())
                .spawn()
                .expect("saslpasswd2");
            use std::io::Write;
            add.stdin
                .take()
                .unwrap()
                .write_all(password.as_bytes())
                .unwrap();
            assert!(add.wait().unwrap().success(), "saslpasswd2 {user}");
        }
        run(Command::new("chown").arg("postfix").arg(&db));
        std::fs::write(
            sasl.join("smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {}\n",
                db.display()
            ),
        )
        .unwrap();
        let settings = [
            "smtpd_sasl_auth_enable = yes".to_string(),
            "smtpd_sasl_type = cyrus".into(),
            "smtpd_sasl_path = smtpd".into(),
            format!("cyrus_sasl_config_path = {}", sasl.display()),
            "smtpd_relay_restrictions = permit_sasl_authenticated, permit_mynetworks, reject"
                .into(),
        ];
        Postfix::start_with(root, name, milter, relayhost_port, &settings)
    }

    /// As `start`, with `extra` main.cf settings after the usual ones.
    pub fn start_with(
        root: &Path,
        name: &str,
        milter: &str,
        relayhost_port: u16,
        extra: &[String],
    ) -> Postfix {
        let dir = root.join(name);
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::create_dir_all(dir.join("queue")).unwrap();
        run(Command::new("chown").arg("postfix").arg(dir.join("data")));
        std::fs::copy("/etc/postfix/master.cf", etc.join("master.cf")).unwrap();
        std::fs::write(etc.join("main.cf"), "").unwrap();
        let port = free_port();
        let d = dir.display();
        let settings = [
            format!("queue_directory = {d}/queue"),
            format!("data_directory = {d}/data"),
            format!("maillog_file = {d}/maillog"),
            format!("maillog_file_prefixes = {d}"),
            "compatibility_level = 3.6".into(),
            format!("myhostname = {name}.relay.test"),
            "mydestination =".into(),
            "alias_maps =".into(),
            "alias_database =".into(),
            "inet_interfaces = 127.0.0.1".into(),
            "inet_protocols = ipv4".into(),
            "mynetworks = 127.0.0.0/8".into(),
            "smtpd_relay_restrictions = permit_mynetworks, reject".into(),
            format!("relayhost = [127.0.0.1]:{relayhost_port}"),
            "smtp_dns_support_level = disabled".into(),
            "smtpd_peername_lookup = no".into(),
            "in_flow_delay = 0".into(),
            "smtpd_client_connection_count_limit = 0".into(),
            format!("smtpd_milters = {milter}"),
            "milter_default_action = tempfail".into(),
            "milter_protocol = 6".into(),
            format!("syslog_name = postfix-{name}"),
        ];
        let mut cmd = Command::new("/usr/sbin/postconf");
        cmd.arg("-c")
            .arg(&etc)
            .arg("-e")
            .args(&settings)
            .args(extra);
        run(&mut cmd);
        run(Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(&etc)
            .args(["-M#", "smtp/inet"]));
        let service = format!("127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd");
        run(Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(&etc)
            .arg("-Me")
            .arg(service));
        run(Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(&etc)
            .args(["-F", "*/*/chroot = n"]));
        run(Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&etc)
            .arg("start"));
        Postfix { port, dir, etc }
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Waits until smtpd answers.
    pub async fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = Smtp::connect("127.0.0.1", self.port).await {
                if s.banner.starts_with("220") {
                    let _ = s.quit().await;
                    return;
                }
            }
            assert!(
                Instant::now() < until,
                "postfix never answered:\n{}",
                self.maillog()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&self.etc)
            .arg("stop")
            .output();
    }
}

/// `relayrate run` (node + milter) as a process.
pub struct Relayrate {
    pub node: SocketAddr,
    pub milter_port: u16,
    pub metrics_port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Relayrate {
    pub fn run(root: &Path, name: &str, policy: &str) -> Relayrate {
        Relayrate::run_with(root, name, policy, &[])
    }

    /// [`Relayrate::run`] with more arguments.
    pub fn run_with(root: &Path, name: &str, policy: &str, args: &[&OsStr]) -> Relayrate {
        let dir = root.join(format!("relayrate-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("policy.txt"), policy).unwrap();
        let node: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let milter_port = free_port();
        let metrics_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.arg("run")
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--listen")
            .arg(node.to_string())
            .arg("--milter-listen")
            .arg(format!("inet:127.0.0.1:{milter_port}"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--policy")
            .arg(dir.join("policy.txt"))
            .args(args);
        let child = spawn_logged(&mut cmd, &dir, relayrate::logs::DEFAULT_FILTER);
        Relayrate {
            node,
            milter_port,
            metrics_port,
            dir,
            child,
        }
    }

    pub fn milter(&self) -> String {
        format!("inet:127.0.0.1:{}", self.milter_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Waits until the node decides (its policy is in force) and the
    /// milter listens.
    pub async fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let milter_up = TcpStream::connect(("127.0.0.1", self.milter_port))
                .await
                .is_ok();
            if milter_up && self.log().contains("policy in force") {
                return;
            }
            assert!(
                Instant::now() < until,
                "relayrate never ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relayrate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal SMTP client that reads each reply whole.
pub struct Smtp {
    reader: BufReader<TcpStream>,
    pub banner: String,
}

impl Smtp {
    /// Connects from `source` (any 127.x.y.z is local) to Postfix.
    pub async fn connect(source: &str, port: u16) -> std::io::Result<Smtp> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(format!("{source}:0").parse().unwrap())?;
        let stream = socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await?;
        let mut s = Smtp {
            reader: BufReader::new(stream),
            banner: String::new(),
        };
        s.banner = s.reply().await?;
        Ok(s)
    }

    /// One reply, all its lines joined; "" when the server closed.
    pub async fn reply(&mut self) -> std::io::Result<String> {
        let mut whole = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Ok(whole);
            }
            whole.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(whole);
            }
        }
    }

    pub async fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.reader
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.reply().await
    }

    /// AUTH PLAIN as `user` (`name@relay.test`): the reply.
    pub async fn auth_plain(&mut self, user: &str, password: &str) -> String {
        use base64::Engine;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {token}")).await.unwrap()
    }

    pub async fn ehlo(&mut self) -> String {
        self.cmd("EHLO client.test").await.unwrap()
    }

    /// MAIL, RCPTs, DATA; returns the reply to MAIL, to each RCPT, and to
    /// the end of data (or "" when nothing was sent).
    pub async fn send(
        &mut self,
        from: &str,
        rcpts: &[&str],
        subject: &str,
    ) -> (String, Vec<String>, String) {
        let mail = self.cmd(&format!("MAIL FROM:<{from}>")).await.unwrap();
        if !mail.starts_with("250") {
            return (mail, Vec::new(), String::new());
        }
        let mut replies = Vec::new();
        for r in rcpts {
            replies.push(self.cmd(&format!("RCPT TO:<{r}>")).await.unwrap());
        }
        if !replies.iter().any(|r| r.starts_with("250")) {
            let _ = self.cmd("RSET").await;
            return (mail, replies, String::new());
        }
        let data = self.cmd("DATA").await.unwrap();
        assert!(data.starts_with("354"), "DATA: {data}");
        let body = format!("Subject: {subject}\r\nFrom: <{from}>\r\n\r\ntest message\r\n.");
        let end = self.cmd(&body).await.unwrap();
        (mail, replies, end)
    }

    pub async fn quit(&mut self) -> std::io::Result<String> {
        self.cmd("QUIT").await
    }
}

/// The test's directory; `RELAYRATE_KEEP=1` keeps it for a look after.
pub fn temp_root() -> TempDir {
    // Postfix's own processes (user postfix) must reach the directories.
    let mut dir = tempfile::Builder::new()
        .prefix("relayrate-e2e")
        .tempdir()
        .unwrap();
    if std::env::var("RELAYRATE_KEEP").as_deref() == Ok("1") {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    run(Command::new("chmod").arg("755").arg(dir.path()));
    dir
}

/// The cluster secret of the tests' clusters.
pub const TEST_SECRET: &str = "tests-cluster-secret-0123456789abcdef";

pub fn test_secret() -> relayrate::raft::peer_auth::ClusterSecret {
    relayrate::raft::peer_auth::ClusterSecret::new(TEST_SECRET.as_bytes(), "tests").unwrap()
}

/// Writes [`TEST_SECRET`] to `root/cluster-secret` (once) and returns the path.
pub fn test_secret_file(root: &Path) -> PathBuf {
    let path = root.join("cluster-secret");
    if !path.exists() {
        std::fs::write(&path, TEST_SECRET).unwrap();
    }
    path
}

/// A `relayrate node` process.
pub struct NodeProc {
    /// The client listener (Limiter, Admin).
    pub addr: SocketAddr,
    /// The peer listener: what `--join` takes.
    pub peer: SocketAddr,
    pub dir: PathBuf,
    child: Child,
}

impl NodeProc {
    /// Node `id`; the first bootstraps with `policy`, the others join
    /// `seed` (a node's peer address). All share [`TEST_SECRET`].
    pub fn start(root: &Path, id: u64, policy: Option<&str>, seed: Option<SocketAddr>) -> NodeProc {
        NodeProc::start_with_args(root, id, policy, seed, &[])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        run(Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string()));
    }

    /// Waits until the node decides events (a bench call of one second
    /// through it, for an address of 10.77/16, gets no error).
    pub async fn wait_deciding(&self) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new(env!("CARGO_BIN_EXE_relayrate"))
                .args([
                    "bench",
                    "--keys",
                    "1",
                    "--concurrency",
                    "1",
                    "--duration",
                    "1",
                    "--json",
                ])
                .arg("--target")
                .arg(format!("http://{}", self.addr))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("\"errors\":0") {
                return;
            }
            assert!(
                Instant::now() < until,
                "node never decided:\n{}",
                self.log()
            );
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `relayrate milter` process asking `node`.
pub struct MilterProc {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl MilterProc {
    pub fn start(root: &Path, name: &str, node: SocketAddr) -> MilterProc {
        let dir = root.join(format!("milter-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.arg("milter")
            .arg("--listen")
            .arg(format!("inet:127.0.0.1:{port}"))
            .arg("--node")
            .arg(format!("http://{node}"));
        let child = spawn_logged(&mut cmd, &dir, "info");
        MilterProc { port, dir, child }
    }

    pub fn addr(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    pub async fn wait_listening(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(
                Instant::now() < until,
                "milter never listened:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for MilterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProc {
    /// As `start`, with `extra` arguments for `relayrate node` (such as
    /// `--admin-token-file F`).
    pub fn start_with_args(
        root: &Path,
        id: u64,
        policy: Option<&str>,
        seed: Option<SocketAddr>,
        extra: &[&std::ffi::OsStr],
    ) -> NodeProc {
        NodeProc::start_with_env(root, id, policy, seed, extra, &[])
    }

    /// As `start_with_args`, with `env` added to the process's environment
    /// (such as libfaketime's `LD_PRELOAD` and `FAKETIME`).
    pub fn start_with_env(
        root: &Path,
        id: u64,
        policy: Option<&str>,
        seed: Option<SocketAddr>,
        extra: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> NodeProc {
        let dir = root.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.arg("node")
            .arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--peer-listen")
            .arg(peer.to_string())
            .arg("--cluster-secret-file")
            .arg(test_secret_file(root))
            .arg("--data-dir")
            .arg(dir.join("data"));
        if let Some(text) = policy {
            std::fs::write(dir.join("policy.txt"), text).unwrap();
            cmd.arg("--policy")
                .arg(dir.join("policy.txt"))
                .arg("--bootstrap");
        }
        if let Some(seed) = seed {
            cmd.arg("--join").arg(seed.to_string());
        }
        cmd.args(extra);
        cmd.envs(env.iter().copied());
        let child = spawn_logged(&mut cmd, &dir, relayrate::logs::DEFAULT_FILTER);
        NodeProc {
            addr,
            peer,
            dir,
            child,
        }
    }
}

/// Sends `proposal` to a node's peer listener as `auth` signs it (as the
/// nodes do), over `tls` if given.
pub async fn peer_propose(
    peer: &str,
    tls: Option<&relayrate::tls::Tls>,
    auth: &relayrate::raft::peer_auth::PeerAuth,
    proposal: relayrate::node::Proposal,
) -> Result<relayrate::node::ProposalReply, tonic::Status> {
    use relayrate::raft::network;
    let forwarded = relayrate::node::Forwarded {
        proposal,
        admin_token: None,
    };
    peer_call(peer, tls, auth, "propose", network::encode(&forwarded))
        .await
        .and_then(|reply| network::decode(&reply))
}

/// Calls `method` (`propose`, `vote`, `append_entries`) of a node's peer
/// listener with `payload`, signed by `auth`; the reply's payload.
pub async fn peer_call(
    peer: &str,
    tls: Option<&relayrate::tls::Tls>,
    auth: &relayrate::raft::peer_auth::PeerAuth,
    method: &'static str,
    payload: relayrate::proto::v1::RaftPayload,
) -> Result<relayrate::proto::v1::RaftPayload, tonic::Status> {
    use relayrate::raft::network;
    let channel =
        network::channel(peer, tls).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = network::client(channel);
    let mut request = network::signed_request(auth, method, payload);
    request.set_timeout(Duration::from_secs(5));
    let reply = match method {
        "propose" => client.propose(request).await,
        "vote" => client.vote(request).await,
        "append_entries" => client.append_entries(request).await,
        "install_snapshot" => client.install_snapshot(request).await,
        other => panic!("no peer method {other}"),
    };
    reply.map(|r| r.into_inner())
}

impl MilterProc {
    /// As `start`, run under `wrap` (a command that execs the rest, such
    /// as `prlimit --nofile=64:64 --`), with `extra` arguments for
    /// `relayrate milter`.
    pub fn start_with(
        root: &Path,
        name: &str,
        node: SocketAddr,
        wrap: &[&str],
        extra: &[&str],
    ) -> MilterProc {
        let dir = root.join(format!("milter-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let bin = env!("CARGO_BIN_EXE_relayrate");
        let mut cmd = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("milter")
            .arg("--listen")
            .arg(format!("inet:127.0.0.1:{port}"))
            .arg("--node")
            .arg(format!("http://{node}"))
            .args(extra);
        let child = spawn_logged(&mut cmd, &dir, "info");
        MilterProc { port, dir, child }
    }

    /// The process id (that of relayrate itself when `wrap` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Resident memory, in bytes (VmRSS of /proc/PID/status).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }
}

/// GET /metrics of a node or milter on loopback `port`, plain HTTP/1.1;
/// the whole reply, checked to be a 200.
pub async fn scrape(port: u16) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}
