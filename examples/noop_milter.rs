//! A milter that asks nothing and answers Continue to every stage, with
//! the same callbacks, macros and socket options as relayrate's milter.
//! `scripts/bench-postfix` runs it to measure what any milter costs
//! Postfix, so that relayrate's own cost can be told apart.
//!
//! Usage: cargo run --release --example noop_milter -- 127.0.0.1:PORT

use indymilter::{Callbacks, Config, Status};
use relayrate::milter::{ask_for_macros, NoDelay};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8899".into());
    let listener = TcpListener::bind(&addr).await?;
    let callbacks: Callbacks<()> = Callbacks::new()
        .on_negotiate(|cx, _, _| {
            Box::pin(async move {
                ask_for_macros(&mut cx.requested_macros);
                Status::Continue
            })
        })
        .on_connect(|_, _, _| Box::pin(async { Status::Continue }))
        .on_helo(|_, _| Box::pin(async { Status::Continue }))
        .on_mail(|_, _| Box::pin(async { Status::Continue }))
        .on_rcpt(|_, _| Box::pin(async { Status::Continue }))
        .on_data(|_| Box::pin(async { Status::Continue }))
        .on_eom(|_| Box::pin(async { Status::Continue }))
        .on_abort(|_| Box::pin(async { Status::Continue }))
        .on_close(|_| Box::pin(async { Status::Continue }));
    let config = Config {
        max_connections: 1000,
        ..Default::default()
    };
    indymilter::run(
        NoDelay(listener),
        callbacks,
        config,
        tokio::signal::ctrl_c(),
    )
    .await
}
