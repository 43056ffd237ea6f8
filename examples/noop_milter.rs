//! A milter that asks nothing and answers Continue to every stage, with
//! the same callbacks, macros and socket options as relayrate's milter.
//! `scripts/bench-postfix` runs it to measure what any milter costs
//! Postfix, so that relayrate's own cost can be told apart.
//!
//! Usage: cargo run --release --example noop_milter -- 127.0.0.1:PORT

use std::ffi::CString;

use indymilter::{Callbacks, Config, MacroStage, Status};
use relayrate::milter::NoDelay;
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
                // The macros relayrate's milter asks for.
                let ask = [
                    (MacroStage::Connect, "j {client_name} {client_addr}"),
                    (MacroStage::Helo, "{client_name}"),
                    (MacroStage::Mail, "i {auth_authen}"),
                    (MacroStage::Rcpt, "i {auth_authen}"),
                    (MacroStage::Eom, "i"),
                ];
                for (stage, names) in ask {
                    cx.requested_macros
                        .insert(stage, CString::new(names).expect("no NUL"));
                }
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
